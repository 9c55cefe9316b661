"""``sisa serve`` for real: its own local Ray, Ray Serve replicas, HTTP on loopback, deletions from this process.

One store and one ``sisa serve --replicas 2`` process for the module (starting Serve costs
tens of seconds on 2 cores). Deletions are made here through a writable ``Ensemble`` (no Ray:
``address="local"``) while closed-loop clients load the service; ``sisa serve --await-replicas``
confirms that every replica serves the store as it is after the deletion, and the soak's
provenance checker (``scripts/soak.py``: ``served_retired``) replays every response's provenance
against the checkpoints each deletion retired.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sisa.ensemble import Ensemble
from sisa.errors import ConfigError
from tests.conftest import blobs, small_config
from tests.serve.service import Load, Service, get, post, post_large, post_timed, predict, start_service

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import soak  # noqa: E402

D = 10
X, _ = blobs(8, d=D, seed=7)
FEATURES = X.tolist()
CONFIG = ("shards=3", "slices=2")


def serve_app() -> Any:
    """``sisa.serve.app``, or skip: without Ray Serve importing it raises ConfigError (not ImportError)."""
    try:
        import sisa.serve.app as app
    except ConfigError as exc:
        pytest.skip(f"Ray Serve missing ({exc}): bash scripts/setup_env.sh installs it")
    return app


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    serve_app()
    work = tmp_path_factory.mktemp("serve")
    store = work / "store"
    x, y = blobs(600, d=D)
    with Ensemble.create(store, small_config(*CONFIG), address="local") as ens:
        ens.ingest(x, y)
        ens.fit()
    # Half a CPU each: a third replica (the builder test's second application) must still fit 2 cores
    svc = start_service(store, work, "--replicas", "2", "--lease", "8", "--num-cpus", "0.5")
    try:
        yield svc
    finally:
        svc.stop(signal.SIGKILL)


def live_keys(store: Path) -> dict[str, str]:
    with Ensemble.open(store, readonly=True) as ens, ens.store.read() as txn:
        return {str(s): r["key"] for s, r in ens.store.live(txn).items()}


def delete(store: Path, ids: list[int], *, defer: bool = False) -> dict[str, Any]:
    """Delete ``ids`` from this process; returns the request record the provenance checker reads."""
    with Ensemble.open(store, address="local", lock_timeout=60) as ens:
        before = soak.retired_keys(ens)
        cert = ens.delete(ids, defer=defer)
        return {"retired": soak.keys_retired_by(before, cert["shards"]), "cert": cert}


def test_predict_answers_like_the_in_process_ensemble_with_the_live_checkpoints(service: Service) -> None:
    status, out = predict(service.url, FEATURES)
    assert status == 200, out
    with Ensemble.open(service.store, readonly=True) as ens:
        expected = ens.predict_proba(X)
    np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, rtol=1e-5, atol=1e-6)
    assert out["labels"] == expected.argmax(axis=1).tolist()
    assert out["provenance"] == live_keys(service.store)
    # Each answer says where its time went (Server-Timing): receiving the body, the models, the whole handler.
    status, _, timing = post_timed(service.url, json.dumps({"features": FEATURES}).encode())
    assert status == 200 and set(timing) == {"body", "predict", "replica"}, timing
    assert 0 < timing["predict"] <= timing["replica"] and timing["body"] <= timing["replica"]
    # The same through an npy body, with the policy in the query string.
    buf = io.BytesIO()
    np.save(buf, X)
    status, npy = post(service.url + "?policy=exclude", buf.getvalue(), "application/x-npy")
    assert status == 200 and npy["labels"] == out["labels"] and npy["policy"] == "exclude"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "names"),
    [
        (json.dumps({"features": X[:, :4].tolist()}).encode(), "application/json", 400, "sample shape (4,)"),
        (b'{"features": [[NaN, 1, 2, 3, 4, 5, 6, 7, 8, 9]]}', "application/json", 400, "NaN"),
        (b"features=1,2,3", "application/json", 400, "not JSON"),
        (json.dumps({"features": FEATURES, "policy": "forget-later"}).encode(), "application/json", 400, "policy"),
        (json.dumps({"features": FEATURES, "method": "median"}).encode(), "application/json", 400, "method"),
        (json.dumps({"rows": FEATURES}).encode(), "application/json", 400, '"features"'),
        (json.dumps({"features": [[1, 2], [3]]}).encode(), "application/json", 400, "rows"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, "npy"),
    ],
    ids=["feature-count", "nan", "not-json", "policy", "method", "no-features", "ragged", "bad-npy"],
)
def test_a_bad_request_gets_a_4xx_naming_the_problem_and_the_service_keeps_serving(
    service: Service, body: bytes, content_type: str, status: int, names: str
) -> None:
    got, out = post(service.url, body, content_type)
    assert got == status, out
    assert names in out["error"], out
    ok, good = predict(service.url, FEATURES)
    assert ok == 200 and len(good["labels"]) == len(FEATURES)


def test_a_100_mb_body_gets_413_and_the_service_keeps_serving(service: Service) -> None:
    status, out = post_large(service.url, 100 * 2**20)
    assert status == 413 and "over the limit" in out["error"], out
    assert predict(service.url, FEATURES)[0] == 200


def test_replicas_without_a_gpu_run_their_models_on_the_cpu(service: Service) -> None:
    # --num-gpus 0 (the default): no GPU assigned, so every replica says it runs on the CPU.
    infos = service.replicas(2)
    assert len(infos) == 2 and {i["device"] for i in infos.values()} == {"cpu"}, infos


def test_every_replica_marks_its_node_as_serving(service: Service) -> None:
    # So that a deletion on this node trains niced by default (sisa.train.serving_node).
    from sisa.train import serving_node

    infos = service.replicas(2)
    marked = {p["pid"]: p["role"] for p in serving_node.serving_processes()}
    assert all(marked.get(i["pid"]) == "replica" for i in infos.values()), (infos, marked)
    assert service.ready["training_nice_here"] == 10  # what `sisa serve` said once its replicas were up


def test_unknown_paths_and_methods_are_refused(service: Service) -> None:
    assert get(service.base + "/nothing")[0] == 404
    assert get(service.url)[0] == 405


def test_deletions_reach_every_replica_and_no_retired_model_answers_after_confirmation(service: Service) -> None:
    load = Load(service.url, FEATURES, clients=2).start()
    requests = []
    try:
        time.sleep(1.0)
        for ids, defer in (([1, 2], False), ([40], True), ([300, 301], False)):
            rec = delete(service.store, ids, defer=defer)
            rec["acked_at"] = load.now()
            # Once through the command (`sisa serve --await-replicas`, joining Ray), then over HTTP (GET /await).
            confirm = service.await_replicas() if not requests else service.confirm()
            rec["confirmed_at"] = load.now()
            assert confirm["ok"] and (confirm.get("exit") == 0 or confirm.get("status") == 200), confirm
            assert len(confirm["replicas"]) == 2 and not confirm["lagging"]
            status, out = predict(service.url, FEATURES)
            assert status == 200
            # exclude (the store's policy): a deferred request's shard is out of every answer until applied
            assert out["provenance"] == live_keys(service.store)
            if defer:
                assert str(next(iter(rec["cert"]["shards"]))) not in out["provenance"]
            requests.append(rec)
        with Ensemble.open(service.store, address="local", lock_timeout=60) as ens:
            ens.apply()
        assert service.confirm()["ok"]
        time.sleep(1.0)
    finally:
        load.stop()
    reader = load.reader()
    # 503 only while every shard was out of service (exclude, a deferred request pending): never an error
    assert sum(1 for s in reader["status"] if s == 0) > 10 and 2 not in reader["status"], load.errors
    retired = [{**r, "journaled_at": r["confirmed_at"]} for r in requests]
    assert soak.served_retired(retired, reader, "confirmed_at") == []
    assert all(r["retired"] for r in requests)
    # Not vacuous: the retired checkpoints did answer, before their deletions.
    assert soak.served_retired([{**r, "confirmed_at": -1.0} for r in retired], reader, "confirmed_at")


def test_serving_policies_are_never_looser_than_the_store(service: Service) -> None:
    with Ensemble.open(service.store, address="local", lock_timeout=60) as ens:
        ens.reconfigure(small_config(*CONFIG, "unlearn.policy=serve-stale"))
    try:
        rec = delete(service.store, [77], defer=True)  # the shard keeps serving its (stale) model until applied
        assert service.confirm()["ok"]
        shard = str(next(iter(rec["cert"]["shards"])))
        stale = live_keys(service.store)[shard]
        assert stale in rec["retired"]
        answers = {p: predict(service.url, FEATURES, policy=p)[1] for p in ("serve-stale", "serve-clean", "exclude")}
        assert answers["serve-stale"]["provenance"][shard] == stale
        assert shard not in answers["serve-clean"]["provenance"] and shard not in answers["exclude"]["provenance"]
        assert predict(service.url, FEATURES)[1]["provenance"][shard] == stale  # no policy: the store's
    finally:
        with Ensemble.open(service.store, address="local", lock_timeout=60) as ens:
            ens.apply()
            ens.reconfigure(small_config(*CONFIG))
    assert service.confirm()["ok"]
    assert stale not in predict(service.url, FEATURES)[1]["provenance"].values()


def test_a_deployment_handle_answers_like_http(service: Service) -> None:
    code = (
        "from ray import serve\n"
        "h = serve.get_app_handle('sisa')\n"
        f"print(json.dumps(h.predict.remote({FEATURES!r}).result()))\n"
    )
    answer = json.loads(run_driver(service, code).strip().splitlines()[-1])
    assert answer["labels"] == predict(service.url, FEATURES)[1]["labels"]
    assert answer["provenance"] == live_keys(service.store)


def test_the_import_path_builder_deploys_a_second_application_on_the_same_store(service: Service) -> None:
    # What `serve run sisa.serve.app:build store=... replicas=1` calls: string arguments, as the Serve CLI passes them.
    args = {"store": str(service.store), "replicas": "1", "num_cpus": "0.25", "policy": "exclude"}
    run_driver(
        service,
        "from ray import serve\n"
        "from sisa.serve.app import build\n"
        f"serve.run(build({args!r}), name='second', route_prefix='/second')\n",
    )
    try:
        status, out = predict(service.base + "/second/predict", FEATURES)
        assert status == 200 and out["policy"] == "exclude", out
        assert out["provenance"] == live_keys(service.store)
        assert out["labels"] == predict(service.url, FEATURES)[1]["labels"]
    finally:
        run_driver(service, "from ray import serve\nserve.delete('second')\n")


def replicas_at(base: str, want: int, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """``GET base/info`` until ``want`` distinct replicas of that application answered."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(found) < want and time.monotonic() < deadline:
        status, info = get(base + "/info")
        if status == 200:
            found[info["replica"]] = info
    return found


AUTO_DETAILS = (
    "from ray.serve.context import _get_global_client\n"
    "d = _get_global_client().get_serve_details()['applications']['auto']['deployments']['sisa-ensemble']\n"
    "print(json.dumps({'autoscaling': d['deployment_config'].get('autoscaling_config'), "
    "'target': d['target_num_replicas'], 'running': sum(r['state'] == 'RUNNING' for r in d['replicas'])}))\n"
)


def test_autoscaling_reaches_the_deployment_and_replicas_added_later_serve_the_current_state(
    service: Service,
) -> None:
    # Through the command's options (--min-replicas/--max-replicas), as `sisa serve` builds them.
    argv = ["serve", "--store", str(service.store), "--min-replicas", "1", "--max-replicas", "2", "--num-cpus", "0.25"]
    first = run_driver(
        service,
        "from ray import serve\n"
        "from sisa.cli.cmd_serve import _options\n"
        "from sisa.cli.parser import build_parser\n"
        "from sisa.serve.app import build_app\n"
        f"options = _options(build_parser().parse_args({argv!r}))\n"
        "serve.run(build_app(options), name='auto', route_prefix='/auto')\n" + AUTO_DETAILS,
    )
    auto = service.base + "/auto"
    try:
        details = json.loads(first.strip().splitlines()[-1])
        scaling = details["autoscaling"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (1, 2, 1), details
        assert details["target"] == details["running"] == 1
        before = replicas_at(auto, 1)
        delete(service.store, [120, 121])  # the store moves on before the next replica exists
        assert service.confirm()["ok"]
        # Through the import-path builder (string arguments, as `serve run` passes them): at least 2 replicas now.
        args = {
            "store": str(service.store),
            "autoscaling": json.dumps({"min_replicas": 2, "max_replicas": 3}),
            "num_cpus": "0.25",
        }
        second = run_driver(
            service,
            "from ray import serve\n"
            "from sisa.serve.app import build\n"
            f"serve.run(build({args!r}), name='auto', route_prefix='/auto')\n" + AUTO_DETAILS,
        )
        details = json.loads(second.strip().splitlines()[-1])
        assert (details["autoscaling"]["min_replicas"], details["autoscaling"]["max_replicas"]) == (2, 3), details
        assert details["target"] == details["running"] == 2
        after = replicas_at(auto, 2)
        assert len(after) == 2 and set(after) - set(before), (before, after)  # a replica that started later
        assert {i["state"] for i in after.values()} == {replicas_at(service.base, 1).popitem()[1]["state"]}
        assert predict(auto + "/predict", FEATURES)[1]["provenance"] == live_keys(service.store)
        # And it keeps following: the next deletion reaches it, the service's replicas and the first one.
        delete(service.store, [122])
        confirm = service.confirm()
        assert confirm["ok"] and not confirm["lagging"], confirm
        assert set(after) <= set(confirm["replicas"])
        assert {i["state"] for i in replicas_at(auto, 2).values()} == {
            replicas_at(service.base, 1).popitem()[1]["state"]
        }
        assert predict(auto + "/predict", FEATURES)[1]["provenance"] == live_keys(service.store)
    finally:
        run_driver(service, "from ray import serve\nserve.delete('auto')\n")


# A shared frozen backbone trained on a core set (ids that are multiples of 10), a head per shard.
BACKBONE = ("backbone.source=core", "backbone.name=mlp", "backbone.hidden=[16]", "backbone.epochs=3")


def test_a_store_with_a_shared_backbone_is_served_and_follows_deletions(service: Service, tmp_path: Path) -> None:
    store = tmp_path / "backbone"
    x, y = blobs(600, d=D)
    with Ensemble.create(store, small_config(*CONFIG, *BACKBONE, "model.adapter=head"), address="local") as ens:
        ens.ingest(x, y, np.arange(len(x)), core=np.arange(0, len(x), 10))
        ens.fit()
    args = {"store": str(store), "replicas": "1", "num_cpus": "0.25"}
    run_driver(
        service,
        "from ray import serve\n"
        "from sisa.serve.app import build\n"
        f"serve.run(build({args!r}), name='backbone', route_prefix='/backbone')\n",
    )
    base = service.base + "/backbone"

    def answers_like_in_process() -> None:
        status, out = predict(base + "/predict", FEATURES)
        assert status == 200, out
        with Ensemble.open(store, readonly=True) as ens:
            expected = ens.predict_proba(X)
        np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, rtol=1e-5, atol=1e-6)
        assert out["provenance"] == live_keys(store)

    try:
        answers_like_in_process()
        retired = delete(store, [3, 4])["retired"]  # not core ids: only the heads of their shards retrain
        status, confirm = get(base + "/await?timeout=90", timeout=150)
        assert status == 200 and confirm["ok"], confirm
        answers_like_in_process()
        assert retired and not set(retired) & set(live_keys(store).values())
    finally:
        run_driver(
            service,
            "from ray import serve\n"
            "from sisa.serve.client import stop_publisher\n"
            f"serve.delete('backbone')\nstop_publisher({str(store)!r})\n",
        )


def test_the_builder_refuses_unknown_arguments_and_bad_values() -> None:
    app = serve_app()
    with pytest.raises(ConfigError, match="takes store="):
        app.build({"store": "x", "replica": 2})
    with pytest.raises(ConfigError, match="unknown serving policy 'later'"):
        app.ServeOptions(store="x", policy="later")
    with pytest.raises(ConfigError, match="lease must be longer"):
        app.ServeOptions(store="x", lease=1.0)


def test_killed_replica_then_killed_publisher_the_next_state_still_reaches_every_replica(service: Service) -> None:
    load = Load(service.url, FEATURES, clients=2).start()
    try:
        before = service.replicas(2)
        assert len(before) == 2
        victim = next(iter(before.values()))
        os.kill(victim["pid"], signal.SIGKILL)
        delete(service.store, [500])
        confirm = service.confirm()
        assert confirm["ok"], confirm
        after = service.replicas(2)
        assert len(after) == 2 and victim["replica"] not in after  # Serve replaced it; both serve the new state
        assert {i["version"] for i in after.values()} == {max(confirm["replicas"].values())}

        publisher = victim["publisher_pid"]
        os.kill(publisher, signal.SIGKILL)  # Ray restarts it on the store's node; replicas find it by name
        delete(service.store, [501])
        confirm = service.confirm(timeout=120)
        assert confirm["ok"], confirm
        infos = service.replicas(2)
        assert all(i["publisher_pid"] not in (0, publisher) for i in infos.values())
        assert predict(service.url, FEATURES)[1]["provenance"] == live_keys(service.store)
        mark = load.now()
        time.sleep(2.0)
    finally:
        load.stop()
    settled = [r for r in load.records if r[0] > mark]
    assert settled and all(r[2] == 200 for r in settled), load.errors


def run_driver(service: Service, code: str) -> str:
    """Run ``code`` as a Ray driver joined to the service's Ray instance; returns its stdout."""
    import subprocess

    from tests.serve.service import serve_env

    prologue = (
        "import json, sys, ray\n"
        "from sisa.serve.deps import require_serve\n"
        "require_serve()\n"
        f"ray.init(address={service.ray_address!r}, log_to_driver=False)\n"
    )
    env = {**serve_env(), "RAY_AUTH_MODE": "token"}  # the local instance's token is ~/.ray/auth_token
    out = subprocess.run([sys.executable, "-c", prologue + code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_replica_cut_off_from_the_publisher_stops_answering_after_its_lease_then_recovers(service: Service) -> None:
    store = str(service.store)
    run_driver(
        service,
        "from sisa.serve.publisher import NAMESPACE, publisher_name\n"
        f"ray.kill(ray.get_actor(publisher_name({store!r}), namespace=NAMESPACE), no_restart=True)\n",
    )
    deadline = time.monotonic() + 60
    while True:  # lease 8 s: every replica refuses once its last answered poll is older
        statuses = {predict(service.url, FEATURES)[0] for _ in range(6)}
        if statuses == {503} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    status, out = predict(service.url, FEATURES)
    assert status == 503 and "has not reached the store's publisher" in out["error"], out
    run_driver(service, f"from sisa.serve.publisher import start_publisher\nstart_publisher({store!r}, lease=8.0)\n")
    assert service.confirm(timeout=120)["ok"]
    assert predict(service.url, FEATURES)[1]["provenance"] == live_keys(service.store)


def test_sigterm_stops_the_application_and_exits_143(service: Service) -> None:
    code = service.stop(signal.SIGTERM)
    assert code == 143, service.log.read_text()[-3000:]
    assert "stopping application" in service.log.read_text()
    with pytest.raises(OSError):
        post(service.url, b"{}", timeout=5)
