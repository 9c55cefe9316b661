"""The core-trained combiner (``aggregate.method: combiner``): exact after deletions, refitted, verified, refused."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sisa import unlearn
from sisa.cli.render import print_status, print_verify
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError, IntegrityError
from sisa.serve.modelset import ModelView, read_models, read_state
from sisa.store.cipher import TOKEN_SIZE
from sisa.store.digests import sha256
from sisa.train import combiner, stacking
from sisa.train.adapters import build_shard_model
from sisa.train.backbone import build_network, freeze
from sisa.train.combiner import Basis, fit_on_core, read_core
from sisa.train.stacking import STACKING_FORMAT, Stacker, apply_weights, fit_stacker, log_probs
from tests.conftest import blobs, small_config

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)
CORE = np.arange(0, 600, 10)  # 60 core ids, spread over every shard
COMBINER = (
    "backbone.source=core",
    "backbone.name=mlp",
    "backbone.hidden=[16]",
    "backbone.epochs=3",
    "model.adapter=head",
    "aggregate.method=combiner",
)
VICTIMS = [5, 123, 461]


def make(path: Path, *overrides: str, keep: np.ndarray | None = None) -> Ensemble:
    ids = np.arange(len(X)) if keep is None else keep
    ens = Ensemble.create(path, small_config(*COMBINER, *overrides))
    ens.ingest(X[ids], Y[ids], ids, core=CORE[np.isin(CORE, ids)])
    ens.fit()
    return ens


def stored(ens: Ensemble) -> tuple[dict[str, object], bytes]:
    """The stored combiner's record and bytes (it must exist)."""
    with ens.store.read() as txn:
        got = ens.store.combiner_bytes(txn)
    assert got is not None, "no combiner stored"
    return got


def ckpt_keys(ens: Ensemble) -> list[str]:
    with ens.store.read() as txn:
        return ens.store.checkpoint_keys(txn)


def sealing_key(ens: Ensemble, token: bytes) -> bytes | None:
    with ens.store.read() as txn, ens.store.key_snapshot(txn) as ktxn:
        return ens.store.keys.checkpoint_key(ktxn, token)


def test_a_deletion_refits_the_combiner_bit_identical_to_a_fresh_store_without_the_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with make(tmp_path / "st") as ens:
        old_record, old_bytes = stored(ens)
        assert old_record["key"] in ckpt_keys(ens)
        with ens.store.read() as txn:
            token = bytes(ens.store.sealed_checkpoint(txn, old_record) or b"")[:TOKEN_SIZE]
        assert sealing_key(ens, token) is not None
        with caplog.at_level(logging.INFO, logger="sisa.train.combiner"):
            cert = ens.delete(VICTIMS)
        # The refit ran forwards over the core set for the retrained models only; the others' logits were
        # the fit's (and the bytes below equal a fresh store's, whose fit computed every model's).
        retrained, shards = len(cert["retrained_shards"]), ens.config.shards
        assert 0 < retrained < shards
        assert f"core-set logits computed for {retrained}, reused for {shards - retrained}" in caplog.text
        record, blob = stored(ens)
        # Refitted on the new live models: a new key, and the old one's bytes gone from the store.
        assert record["key"] != old_record["key"] and blob != old_bytes
        assert old_record["key"] not in ckpt_keys(ens)
        assert sealing_key(ens, token) is None  # and the key that sealed it destroyed by the deletion's sweep
        with ens.store.read() as txn:
            live = {s: r["key"] for s, r in ens.store.live(txn).items()}
        assert record["basis"] == Basis(live, CORE).digest
        report = ens.verify()
        assert report["ok"] and report["combiner"]["ok"], report
        probabilities = ens.predict_proba(X[:50])
    keep = np.setdiff1d(np.arange(len(X)), VICTIMS)
    with make(tmp_path / "fresh", keep=keep) as fresh:
        fresh_record, fresh_bytes = stored(fresh)
        assert fresh_bytes == blob and fresh_record["key"] == record["key"]
        np.testing.assert_array_equal(fresh.predict_proba(X[:50]), probabilities)


def test_a_refit_keeps_the_backbones_core_features_chunk_by_chunk_and_verify_recomputes_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A core set of several FEATURE_CHUNKs (512 rows each): a refit that took the wrong kept chunk, or kept
    # features of another backbone, would store a combiner that verify's full recompute does not match.
    x, y = blobs(1400, d=10, seed=3)
    core = np.arange(0, 1400, 1)[np.arange(1400) % 7 != 0]  # 1,200 core ids: three chunks
    victims = [7, 700]  # not in the core set
    with Ensemble.create(tmp_path / "st", small_config(*COMBINER)) as ens:
        ens.ingest(x, y, np.arange(1400), core=core)
        ens.fit()
        with caplog.at_level(logging.INFO, logger="sisa.train.combiner"):
            ens.delete(victims)
        assert "backbone features of the core set reused" in caplog.text
        report = ens.verify()
        assert report["ok"] and report["combiner"]["ok"], report
        blob = stored(ens)[1]
    keep = np.setdiff1d(np.arange(1400), victims)
    with Ensemble.create(tmp_path / "fresh", small_config(*COMBINER)) as fresh:
        fresh.ingest(x[keep], y[keep], keep, core=core)
        fresh.fit()
        assert stored(fresh)[1] == blob


def test_a_pending_deletion_never_serves_the_old_combiner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with make(tmp_path / "st", "unlearn.policy=exclude") as ens:
        old_record, _ = stored(ens)
        assert ens.status()["aggregate"] == {
            "method": "combiner",
            "combiner": {"key": old_record["key"], "current": True, "domain": old_record["domain"]},
        }
        before = ens.predict_proba(X[:40])
        # Its shard leaves the ensemble until the retrain. Journaled as another process would (this handle's
        # caches are not told), so the prediction below finds the change in the store alone.
        unlearn.delete(ens.planner, [VICTIMS[0]], defer=True)
        # Dropped with the live record, in the journal's transaction; its key swept by the erasure.
        assert ens.store.meta().get("combiner") is None
        assert old_record["key"] not in ckpt_keys(ens)
        # A prediction fits one on exactly the shards it serves, and stores nothing.
        got = ens.predict_proba(X[:40])
        served = ens.live_models()
        assert len(served) == ens.config.shards - 1
        with ens.store.read() as txn:
            keys = {s: r["key"] for s, r in ens.store.live(txn).items()}
            core = read_core(ens.store, ens.config, txn)
        expected, head = Stacker.decode(fit_on_core(ens.config, {s: (keys[s], m) for s, m in served.items()}, core))
        assert head["models"] == {str(s): k for s, k in keys.items()}
        logits = torch.stack([m(torch.from_numpy(X[:40])) for _, m in sorted(served.items())]).detach()
        np.testing.assert_allclose(got, apply_weights(logits, expected).numpy(), rtol=1e-5, atol=1e-6)
        assert not np.array_equal(got, before)
        assert ens.store.meta().get("combiner") is None
        status = ens.status()
        assert status["aggregate"]["combiner"] == {"key": None, "current": False, "domain": None}
        print_status(status)
        shown = capsys.readouterr().out
        assert "aggregation: combiner (fitted on the core set), none stored for the live models" in shown
        verdict = ens.verify()
        assert not verdict["ok"] and not verdict["combiner"]["ok"]
        ens.apply()
        record, _ = stored(ens)
        assert record["key"] != old_record["key"]
        print_status(ens.status())
        shown = capsys.readouterr().out
        assert f"combiner (fitted on the core set), stored {record['key'][:25]}..., fitted on the live" in shown
        assert ens.verify()["ok"]


def verify_combiner(ens: Ensemble) -> dict[str, object]:
    verdict = ens.verify()
    assert verdict["ok"] == (all(v["ok"] for v in verdict["shards"].values()) and verdict["combiner"]["ok"])
    return dict(verdict["combiner"])


def test_verify_catches_a_combiner_that_is_not_the_refit_of_the_live_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with make(tmp_path / "st") as ens:
        record, blob = stored(ens)
        assert verify_combiner(ens)["ok"]
        # Fitted by a driver in another determinism domain: not replayed here, neither a match nor a mismatch.
        ens.store.write(lambda txn: ens.store.put_meta(txn, combiner={**record, "domain": "0123456789abcdef"}))
        verdict = ens.verify()
        assert verdict["combiner"]["reason"] == "domain_unavailable"
        assert verdict["reason"] == "domain_unavailable"  # not checkable here, not a failed check (CLI exit 2)
        ens.fit()  # a fit in this driver refits it here: the same bytes, the same key, this domain
        assert stored(ens) == (record, blob) and verify_combiner(ens)["ok"]
        stacker, head = Stacker.decode(blob)
        # A validly sealed combiner, recorded for the live models, with other weights (a forged fit).
        forged = Stacker(stacker.weights + 1e-9, stacker.bias, stacker.steps).encode(
            {k: v for k, v in head.items() if k in ("models", "core")}
        )
        sealed = ens.store.seal_checkpoint(forged, str(record["key"]))
        ens.store.write(lambda txn: ens.store.put_combiner(txn, {**record, "sha256": sha256(forged)}, sealed))
        verdict = ens.verify()
        assert all(v["ok"] for v in verdict["shards"].values())  # every shard model is fine ...
        assert not verdict["ok"]  # ... and the combiner is not
        assert verdict["combiner"]["key"] == record["key"]
        assert "combiner" in verdict["combiner"]["reason"] and "differs" in verdict["combiner"]["reason"]
        assert "reason" not in verdict  # a failed check (CLI exit 1), named on its own line
        print_verify(verdict)
        assert f"combiner {record['key'][:25]}: FAIL, the stored combiner" in capsys.readouterr().out
        # Bytes changed on disk under the seal: refused as damaged, named.
        ens.store.write(lambda txn: txn.put(str(record["key"]).encode(), sealed[:-1] + b"x", db=ens.store.db("ckpt")))
        verdict = ens.verify()
        assert not verdict["ok"] and "damaged" in verdict["combiner"]["reason"]


def test_a_combiner_an_older_sisa_stored_in_format_1_verifies_and_the_next_refit_writes_format_2(
    tmp_path: Path,
) -> None:
    with make(tmp_path / "st") as ens:
        record, blob = stored(ens)
        assert Stacker.decode(blob)[0].format == STACKING_FORMAT == 2
        # What a sisa before format 2 stored for these live models: the same fit, its Hessian summed by
        # numpy's loops, refitted here in the shards' domain as verify does.
        with ens.store.read() as txn:
            core = read_core(ens.store, ens.config, txn)
            models, backbone = combiner._live_models(ens.store, ens.config, txn)
            keys = {s: r["key"] for s, r in ens.store.live(txn).items()}
        old, _, _ = combiner.fit_in_domain(ens.config, keys, models, core, backbone, fmt=1)
        v1, v2 = Stacker.decode(old)[0], Stacker.decode(blob)[0]
        assert v1.format == 1 and old != blob  # other bytes ...
        np.testing.assert_allclose(v1.weights, v2.weights, rtol=0, atol=1e-8)  # ... of the same optimum
        sealed = ens.store.seal_checkpoint(old, str(record["key"]))
        ens.store.write(lambda txn: ens.store.put_combiner(txn, {**record, "sha256": sha256(old)}, sealed))
        verdict = ens.verify()
        assert verdict["ok"] and verdict["combiner"]["sha256"] == sha256(old), verdict  # refitted in format 1
        # A format-1 combiner refitted in format 2 is not its replay: verify compares in the stored format.
        forged = Stacker(v2.weights, v2.bias, v2.steps, 1).encode(Stacker.decode(old)[1])
        sealed = ens.store.seal_checkpoint(forged, str(record["key"]))
        ens.store.write(lambda txn: ens.store.put_combiner(txn, {**record, "sha256": sha256(forged)}, sealed))
        assert not ens.verify()["combiner"]["ok"]
        ens.delete(VICTIMS)  # the refit after the deletion writes the current format
        assert Stacker.decode(stored(ens)[1])[0].format == 2 and ens.verify()["ok"]


def test_format_2_sums_the_same_hessian_as_format_1() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, size=600)
    logits = torch.from_numpy(rng.normal(size=(16, 600, 10)))
    logits[::4, torch.arange(600), torch.from_numpy(y)] += 2.0  # every 4th shard knows the labels
    logp = log_probs(logits)
    one, two = fit_stacker(logp, y, 1), fit_stacker(logp, y, 2)
    assert (one.format, two.format) == (1, 2) and one.encode({}) != two.encode({})
    np.testing.assert_allclose(one.weights, two.weights, rtol=0, atol=1e-8)
    np.testing.assert_allclose(one.bias, two.bias, rtol=0, atol=1e-8)
    # The Hessians themselves, at one point: equal up to the order of float64 sums.
    s, n, c = logp.shape
    z = np.concatenate([logp.transpose(1, 2, 0), np.ones((n, c, 1))], axis=2)
    proba = np.full((n, c), 1.0 / c)
    np.testing.assert_allclose(
        stacking._hessian(z, proba, n), stacking._hessian_mm(z, proba, n), rtol=1e-12, atol=1e-14
    )
    with pytest.raises(IntegrityError, match="unknown combiner format 3"):
        fit_stacker(logp, y, 3)
    with pytest.raises(IntegrityError, match="unknown format"):
        Stacker.decode(Stacker(one.weights, one.bias, one.steps, 3).encode({}))


def test_the_sisa_command_verifies_a_combiner_this_process_fitted(tmp_path: Path, env_python: dict[str, str]) -> None:
    # The `sisa` command pins its own process to resources.cpu_isa; this one may not be pinned, and then
    # fits the stored combiner in the pinned child the shards train in: the command's refit is the same bytes.
    with make(tmp_path / "st") as ens:
        record, _ = stored(ens)
    cli = [sys.executable, "-m", "sisa.cli", "verify", "--store", str(tmp_path / "st"), "--address", "local", "--json"]
    done = subprocess.run(cli, capture_output=True, text=True, env=env_python, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(done.stdout)["combiner"] == {"ok": True, "key": record["key"], "sha256": record["sha256"]}


def test_the_combiner_is_refused_without_a_core_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"combiner.*set backbone\.source: core"):
        small_config("aggregate.method=combiner")
    with pytest.raises(ConfigError, match=r"combiner.*set backbone\.source: core"):
        small_config(
            "aggregate.method=combiner", "backbone.source=pretrained", "backbone.name=pkg.mod:net", "model.adapter=head"
        )
    with Ensemble.create(tmp_path / "plain", small_config()) as ens:
        ens.ingest(X, Y)
        ens.fit()
        # A per-call method on a store without a core set: refused, never answered by another method.
        with pytest.raises(ConfigError, match=r"combiner is fitted on the core set.*mean, vote or weighted"):
            ens.predict_proba(X[:5], method="combiner")


def test_ray_serve_replicas_refuse_the_combiner(tmp_path: Path) -> None:
    with make(tmp_path / "st") as ens, ens.store.read() as txn:
        digest, state = read_state(ens.store, txn)
        weights = read_models(ens.store, txn, state, set())
    view = ModelView(1, digest, state, weights)
    for method in (None, "combiner"):  # the store's own method, or asked for by name
        with pytest.raises(DataError, match="combiner is not served by Ray Serve replicas"):
            view.predict(X[:3].tolist(), method=method)
    assert view.predict(X[:3].tolist(), method="mean")["labels"]


def test_the_fit_is_deterministic_and_learns_which_shard_to_trust() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    logits = torch.from_numpy(rng.normal(size=(3, 200, 3))).float()
    logits[0, np.arange(200), y] += 4.0  # shard 0 knows the labels; shards 1 and 2 are noise
    logp = log_probs(logits)
    first, again = fit_stacker(logp, y), fit_stacker(copy.deepcopy(logp), y.copy())
    assert first.encode({}) == again.encode({})
    assert (first.weights[0] > first.weights[1:]).all()
    accuracy = (apply_weights(logits, first).argmax(1).numpy() == y).mean()
    mean = (torch.softmax(logits, -1).mean(0).argmax(1).numpy() == y).mean()
    assert accuracy >= mean


def test_kept_backbone_features_give_the_same_logits_and_respect_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config(*COMBINER)
    torch.manual_seed(0)
    backbone = freeze(build_network(cfg, (10,)), {}).module
    models = [build_shard_model(cfg, (10,), 3, backbone).eval() for _ in range(2)]
    x = torch.from_numpy(blobs(1100, d=10)[0])  # three chunks of FEATURE_CHUNK rows
    monkeypatch.setattr(combiner, "_features", {})
    first, reused = combiner._core_logits(models, x, ("backbone", "core"))
    assert not reused and len(combiner._features[("backbone", "core")]) == 3
    again, reused = combiner._core_logits(models[1:], x, ("backbone", "core"))
    assert reused and torch.equal(again[0], first[1])  # the kept features give the bytes a forward gives
    assert not combiner._core_logits(models, x, ("other backbone", "core"))[1]  # kept for another: computed
    # Over the cap nothing is kept; without a name nothing is kept or reused.
    monkeypatch.setattr(combiner, "_features", {})
    monkeypatch.setattr(combiner, "FEATURE_CACHE_BYTES", 0)
    combiner._core_logits(models, x, ("backbone", "core"))
    assert combiner._features == {}
    monkeypatch.setattr(combiner, "FEATURE_CACHE_BYTES", 1 << 28)
    combiner._core_logits(models, x, None)
    assert combiner._features == {}


def test_scores_compare_every_aggregation_from_one_pass_of_the_shard_models(tmp_path: Path) -> None:
    x, y = X[:200], Y[:200]
    with make(tmp_path / "st") as ens:
        alone = {m: ens.predict_proba(x, method=m) for m in ("mean", "vote", "weighted", "combiner")}
        # Count the shard models' forwards: each pass runs every live head once on these 200 rows (the
        # shared backbone's features are computed once per chunk for all of them).
        calls = {"n": 0}

        def count(*_: object) -> None:
            calls["n"] += 1

        hooks = [m.head.register_forward_hook(count) for m in ens.live_models().values()]
        try:
            scores = ens.scores(x, y)
            assert calls["n"] == ens.config.shards  # one pass for four methods and every shard
            together = ens._serving.predict_probas(x, ["combiner", "mean", "vote", "weighted"], 1024)
            assert calls["n"] == 2 * ens.config.shards
        finally:
            for h in hooks:
                h.remove()
        assert list(scores["accuracy"]) == ["mean", "vote", "weighted", "combiner"]  # every method it serves
        for method, proba in alone.items():
            np.testing.assert_array_equal(together[method], proba)  # the bytes of each method alone
            assert scores["accuracy"][method] == ens.score(x, y, method=method)
        assert scores["per_shard_accuracy"] == ens.shard_scores(x, y)
        chosen = ens.scores(x, y, methods=["vote"])
        assert chosen["accuracy"] == {"vote": scores["accuracy"]["vote"]}
        with pytest.raises(ConfigError, match="unknown method 'median'"):
            ens.scores(x, y, methods=["mean", "median"])
        with pytest.raises(DataError, match=r"len\(y\)=10 != len\(x\)=200"):
            ens.scores(x, y[:10])


def test_scores_leave_the_combiner_out_of_a_store_without_a_core_set(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "plain", small_config()) as ens:
        ens.ingest(X, Y)
        ens.fit()
        assert list(ens.scores(X[:100], Y[:100])["accuracy"]) == ["mean", "vote", "weighted"]
        with pytest.raises(ConfigError, match="core set"):
            ens.scores(X[:100], Y[:100], methods=["mean", "combiner"])
