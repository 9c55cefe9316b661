"""Determinism domains: measured, recorded, pinned by default, and honoured by verify and deletion.

A store trained with the defaults (workers pinned to ``resources.cpu_isa: avx2``) verifies from a
process of another kernel level; a ``native`` store trained here cannot be replayed from a process
of another level, so verify says which domain it needs (exit 2, not FAIL), ``refuse`` keeps a
deletion pending, and ``rebind`` retrains the shard from scratch where it can, then verifies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sisa.config.loader import load_config
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DomainMismatchError
from sisa.store.digests import checkpoint_key, recipe, recipe_digest
from sisa.train import domain as domains
from sisa.train.local_runner import LocalRunner
from sisa.train.trainer import train_shard
from tests.conftest import ROOT, blobs, files_containing, live_state, sample_evidence, small_config, store_digest

X, Y = blobs()

DOMAIN_OF_CHILD = (
    "import json, sys\n"
    "from sisa.train import domain\n"
    "d = domain.current(1)\n"
    "print(json.dumps({**d.to_dict(), 'pinned': domain.pinned_from_start('avx2')}))\n"
)


def child_env(**extra: str) -> dict[str, str]:
    """The test process's environment without pins or a Ray address, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in domains.PIN_VARS and k != "RAY_ADDRESS"}
    env.update(extra)
    return env


def child_domain(**extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", DOMAIN_OF_CHILD], env=child_env(**extra), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def cli(*args: str, **extra: str) -> tuple[int, dict[str, Any], str]:
    """Run ``sisa ... --json`` in a child process under ``extra`` env; returns (rc, JSON, stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "sisa.cli", *args, "--json"],
        env=child_env(**extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, (json.loads(lines[-1]) if lines else {}), out.stderr


def stage_records(ens: Ensemble) -> list[dict[str, Any]]:
    with ens.store.read() as txn:
        return [r for s in range(ens.config.shards) for r in ens.store.stage_records(txn, s)]


def id_in_second_slice(ens: Ensemble, shard: int) -> int:
    """A sample of ``shard``'s second slice: deleting it continues from the stage-1 checkpoint."""
    with ens.store.read() as txn:
        return int(ens.store.slice_ids(txn, shard, 1)[0])


# ---------------------------------------------------------------------------------------------- units


def test_pins_and_the_config_key() -> None:
    assert domains.pin_env("native") == {}
    assert domains.pin_env("avx2") == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    assert set(domains.pin_env("baseline")) == set(domains.PIN_VARS)
    with pytest.raises(ValueError, match="native, avx2, baseline"):
        domains.pin_env("avx512")
    assert load_config(None).resources.cpu_isa == "avx2"  # pinned by default
    with pytest.raises(ConfigError, match="resources.cpu_isa"):
        load_config(None, ["resources.cpu_isa=sse"])
    with pytest.raises(ConfigError, match="resources.on_missing_domain"):
        load_config(None, ["resources.on_missing_domain=wait"])
    # The level is part of the recipe (other bits); what to do without a node is not.
    digests = {isa: recipe_digest(load_config(None, [f"resources.cpu_isa={isa}"])) for isa in domains.CPU_ISAS}
    assert len(set(digests.values())) == 3
    refuse = load_config(None, ["resources.on_missing_domain=refuse"])
    assert recipe_digest(refuse) == recipe_digest(load_config(None))
    # Stores from before the key trained natively and keep their checkpoint keys.
    assert "cpu_isa" not in recipe(load_config(None, ["resources.cpu_isa=native"]))


def test_the_domain_is_what_the_process_runs_and_pins_set_at_start_count() -> None:
    plain = child_domain(ATEN_CPU_CAPABILITY="avx2")
    baseline = child_domain(ATEN_CPU_CAPABILITY="default")
    pinned = child_domain(**domains.pin_env("avx2"))
    assert (plain["cpu_kernels"], baseline["cpu_kernels"], pinned["cpu_kernels"]) == ("AVX2", "DEFAULT", "AVX2")
    assert len({plain["id"], baseline["id"], pinned["id"]}) == 3  # MKL and oneDNN pins are part of it too
    assert pinned["mkl_cbwr"] == "AVX2,STRICT" and pinned["onednn_isa"] == "AVX2" and plain["mkl_cbwr"] == ""
    assert pinned["pinned"] is True and plain["pinned"] is False
    # The id is a digest of every field: recomputed from them, it matches.
    fields = {k: v for k, v in pinned.items() if k not in ("id", "pinned")}
    assert domains.Domain(**fields).id == pinned["id"]
    assert domains.Domain(**{**fields, "threads": 2}).id != pinned["id"]


def test_a_worker_in_another_domain_refuses_before_training() -> None:
    from tests.train.test_trainer import make_job

    here = domains.current(1)
    job = dataclasses.replace(make_job(), domain="0123456789abcdef")
    stages = train_shard(job)
    with pytest.raises(DomainMismatchError, match=f"shard 1: this worker is in determinism domain {here.id}"):
        next(stages)  # the first stage is never trained
    result = next(train_shard(dataclasses.replace(job, domain=here.id)))
    assert result.domain == here.to_dict() and result.stage == 1
    assert "checkpoint=" not in repr(result) and len(repr(result)) < 300  # no bytes in logs or progress


def test_local_child_survives_an_abandoned_job() -> None:
    # A commit that raises (or Ctrl-C) abandons a job mid-stream: the next job on the same runner
    # must not read the rest of the old answer.
    from tests.train.test_trainer import make_job

    with LocalRunner("avx2", 1, "cpu") as runner:  # the child is ended on leaving the block
        if runner.in_process:
            pytest.skip("this test process started with the avx2 pins: it trains in place, no child to test")
        job = make_job()
        first = runner.train(job)
        abandoned = next(first)
        first.close()
        again = [r.stage for r in runner.train(job)]
        assert again == [1, 2, 3] and runner.domain.cpu_kernels == "AVX2"
        replay = list(runner.train(job))
        assert replay[0].key == abandoned.key and [r.key for r in replay] == [r.key for r in runner.train(job)]
    assert runner._child is None


# ------------------------------------------------------------------ a store trained with the defaults


@pytest.fixture(scope="module")
def default_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained with address=local from this (unpinned) process: in a child pinned to avx2."""
    path = tmp_path_factory.mktemp("dom") / "st"
    with Ensemble.create(path, small_config(), address="local") as ens:
        ens.ingest(X, Y)
        ens.fit()
    return path


def test_every_stage_records_its_pinned_domain_and_its_key_names_it(default_store: Path) -> None:
    with Ensemble.open(default_store, readonly=True) as ens:
        records = stage_records(ens)
        status = ens.status()
        recipe = recipe_digest(ens.config)
    assert len(records) == 9
    ids = {r["domain"]["id"] for r in records}
    assert len(ids) == 1
    (domain,) = {json.dumps(r["domain"], sort_keys=True) for r in records}
    recorded = json.loads(domain)
    assert recorded["cpu_kernels"] == "AVX2" and recorded["mkl_cbwr"] == "AVX2,STRICT"
    assert recorded["threads"] == 1 and recorded["device"] == "cpu"
    for shard in status["per_shard"]:
        assert shard["domain"] == recorded
    by_stage = {(r["shard"], r["stage"]): r for r in records}
    for (shard, stage), r in by_stage.items():
        parent = by_stage[(shard, stage - 1)]["key"] if stage > 1 else None
        assert r["key"] == checkpoint_key(recipe, shard, stage, r["manifest"], parent, recorded["id"])
        assert r["key"] != checkpoint_key(recipe, shard, stage, r["manifest"], parent)  # the domain is in it


def test_local_child_and_ray_workers_share_the_pinned_domain_and_the_bytes(
    default_store: Path, tmp_path: Path, ray_session: None
) -> None:
    with Ensemble.create(tmp_path / "ray", small_config()) as ens:
        ens.ingest(X, Y)
        ens.fit()
        on_ray = live_state(ens)
        ray_domains = {s["domain"]["id"] for s in ens.status()["per_shard"]}
    with Ensemble.open(default_store, readonly=True) as ens:
        assert live_state(ens) == on_ray
        assert {s["domain"]["id"] for s in ens.status()["per_shard"]} == ray_domains


def kernel_level_under(level: str) -> str:
    """The kernel level torch runs at in a new process started with ``ATEN_CPU_CAPABILITY=level``.

    A level the CPU lacks falls back to the best it has: on an AVX2-only machine ``avx512`` runs as
    AVX2, the level a default store is pinned to, and proves nothing about "another level".
    """
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


# Levels other than AVX2, the default store's pinned level: `default` everywhere, AVX-512 where the CPU has it.
@pytest.mark.parametrize("level", ["default", "avx512"])
def test_a_default_store_verifies_from_a_process_of_another_kernel_level(default_store: Path, level: str) -> None:
    if kernel_level_under(level) == "AVX2":
        pytest.skip(f"this CPU runs ATEN_CPU_CAPABILITY={level} at AVX2, the store's own level")
    before = store_digest(default_store)
    rc, result, err = cli("verify", "--store", str(default_store), "--address", "local", ATEN_CPU_CAPABILITY=level)
    assert rc == 0 and result["ok"] is True, err
    for shard in result["shards"].values():
        assert shard["replay_domain"]["id"] == shard["domain"]["id"] and shard["ok"]
    assert store_digest(default_store) == before


def test_sisa_domains_lists_where_each_shard_can_be_replayed(default_store: Path) -> None:
    rc, found, err = cli("domains", "--store", str(default_store), "--address", "local", ATEN_CPU_CAPABILITY="default")
    assert rc == 0, err
    (available,) = found["available"]
    assert available["shards"] == [0, 1, 2] and available["nodes"] == ["local"] and found["missing"] == []
    assert available["domain"]["cpu_kernels"] == "AVX2" and found["cpu_isa"] == "avx2"
    rc, found, err = cli(
        "domains", "--config", str(ROOT / "configs" / "tiny.yaml"), "resources.cpu_isa=baseline", "--address", "local"
    )
    assert rc == 0 and found["available"][0]["domain"]["cpu_kernels"] == "DEFAULT", err
    rc, found, err = cli("domains", "--store", str(default_store), "resources.cpu_isa=native")
    assert rc == 2 and "overrides go with --config" in found["message"]


def test_a_default_store_verifies_on_ray_started_under_another_kernel_level(default_store: Path) -> None:
    # `default`: never the AVX2 the store is pinned to, whatever this CPU's native level is.
    rc, result, err = cli("verify", "--store", str(default_store), "--shard", "0", ATEN_CPU_CAPABILITY="default")
    assert rc == 0 and result["ok"] is True, err


def test_certificate_shows_the_domain_of_each_retrained_shard(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "st", small_config(), address="local") as ens:
        ens.ingest(X, Y)
        ens.fit()
        victim = id_in_second_slice(ens, 1)
        cert = ens.delete([victim])
        live = {s["shard"]: s["domain"] for s in ens.status()["per_shard"]}
    info = cert["shards"]["1"]
    assert info["rebound"] is False and info["from_slice"] == 2 and info["restart_stage"] == 1
    assert info["domain"] == live[1] and info["domain"]["cpu_kernels"] == "AVX2"


# ------------------------------------------------ a native store, seen from another kernel level


def test_native_store_elsewhere_verify_refuses_then_refuse_waits_and_rebind_retrains(tmp_path: Path) -> None:
    path = tmp_path / "native"
    here = domains.current(1)  # this process, unpinned: native trains in place
    with Ensemble.create(path, small_config("resources.cpu_isa=native"), address="local") as ens:
        ens.ingest(X, Y)
        ens.fit()
        assert {s["domain"]["id"] for s in ens.status()["per_shard"]} == {here.id}
        victim = id_in_second_slice(ens, 2)
        _, victim_keys = sample_evidence(ens, victim)  # what decrypts the victim's ciphertext
        ens.reconfigure(small_config("resources.cpu_isa=native", "resources.on_missing_domain=refuse"))
    # A process at another kernel level than this one (native: no pins), so in another domain.
    other = "avx2" if here.cpu_kernels == "DEFAULT" else "default"
    elsewhere = {"ATEN_CPU_CAPABILITY": other}

    # verify: not FAIL but "cannot check here", exit 2, naming the shard, the domain and what exists
    before = store_digest(path)
    rc, result, err = cli("verify", "--store", str(path), "--address", "local", **elsewhere)
    assert rc == 2 and result["ok"] is False and result["reason"] == "domain_unavailable", (result, err)
    for key, shard in result["shards"].items():
        assert shard["reason"] == "domain_unavailable" and shard["replay_weights"] is None
        assert shard["needs"]["id"] == here.id and [d["cpu_kernels"] for d in shard["available"]] == [other.upper()]
        assert f"shard {key}: no node here trains in its determinism domain {here.id}" in shard["message"]
        assert "add a node in that domain" in shard["message"]
    text = subprocess.run(
        [sys.executable, "-m", "sisa.cli", "verify", "--store", str(path), "--address", "local", "--shard", "1"],
        env=child_env(**elsewhere),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert text.returncode == 2 and "NOT CHECKED" in text.stdout and "FAIL" not in text.stdout
    assert "verify: INCOMPLETE, no tampering found" in text.stdout
    assert "shard 1: no node here trains in its determinism domain" in text.stderr
    rc, found, err = cli("domains", "--store", str(path), "--address", "local", **elsewhere)
    assert rc == 0 and [m["shards"] for m in found["missing"]] == [[0, 1, 2]], (found, err)
    assert found["missing"][0]["domain"]["id"] == here.id and found["available"][0]["shards"] == []
    assert store_digest(path) == before

    # refuse: the request is journaled (its sample is gone), the retrain refused, the request pending
    rc, result, err = cli("delete", "--store", str(path), "--ids", str(victim), "--address", "local", **elsewhere)
    assert rc == 2 and result["error"] == "DomainUnavailableError", (result, err)
    assert f"shard 2: no node here trains in its determinism domain {here.id}" in result["message"]
    assert "stay pending" in result["message"] and "their samples are erased from the store" in result["message"]
    # The retrain failed, the erasure did not wait for it: the victim's key is in no file already.
    assert all(files_containing(path, k) == [] for k in victim_keys)
    with Ensemble.open(path, readonly=True) as ens:
        assert [r["shards"] for r in ens.pending()] == [{"2": ens.pending()[0]["shards"]["2"]}]
        untouched = live_state(ens)
    assert 2 not in untouched and set(untouched) == {0, 1}

    # rebind: the shard is retrained from scratch in the domain that exists, and says so
    with Ensemble.open(path, resume=False) as ens:
        ens.reconfigure(small_config("resources.cpu_isa=native"))
    rc, result, err = cli("apply", "--store", str(path), "--address", "local", **elsewhere)
    assert rc == 0, err
    (cert,) = result["applied"]
    info = cert["shards"]["2"]
    assert info["rebound"] is True and info["from_slice"] == 1 and info["restart_stage"] == 0
    assert here.id in info["rebind_reason"] and info["domain"]["cpu_kernels"] == other.upper()
    assert len(info["new_checkpoints"]) == 3  # every stage of the new chain
    with Ensemble.open(path, readonly=True) as ens:
        records = {r["stage"]: r["domain"]["id"] for r in stage_records(ens) if r["shard"] == 2}
        assert len(set(records.values())) == 1 and records[1] == info["domain"]["id"]  # one chain, one domain
        assert live_state(ens)[0] == untouched[0] and live_state(ens)[1] == untouched[1]
    rc, result, err = cli("verify", "--store", str(path), "--address", "local", "--shard", "2", **elsewhere)
    assert rc == 0 and result["ok"] is True, err
    # ... and from here, the rebound shard is the one that cannot be replayed
    with Ensemble.open(path, readonly=True, address="local") as ens:
        report = ens.verify()
    assert report["reason"] == "domain_unavailable"
    assert [k for k, v in report["shards"].items() if not v["ok"]] == ["2"]


def test_a_rebind_is_certified_even_when_the_retrain_and_the_certificate_are_two_runs(tmp_path: Path) -> None:
    # A crash after the rebinding retrain but before the certificate: the next apply retrains
    # nothing, and must still say the shard was rebound (read from the live record, not the run).
    path = tmp_path / "native"
    here = domains.current(1)
    with Ensemble.create(path, small_config("resources.cpu_isa=native"), address="local") as ens:
        ens.ingest(X, Y)
        ens.fit()
        victim = id_in_second_slice(ens, 1)
    other = "avx2" if here.cpu_kernels == "DEFAULT" else "default"
    code = (
        "import json, sys\n"
        "from sisa.ensemble import Ensemble\n"
        "with Ensemble.open(sys.argv[1], address='local', resume=False) as ens:\n"
        "    ens.delete([int(sys.argv[2])], defer=True)\n"
        "    rebound = sorted(ens.fit().rebound)\n"  # the retrain of the apply that 'crashed'
        "with Ensemble.open(sys.argv[1], address='local') as ens:\n"
        "    (cert,) = ens.apply()\n"
        "print(json.dumps({'rebound': rebound, 'cert': cert}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(victim)],
        env=child_env(ATEN_CPU_CAPABILITY=other),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["rebound"] == [1]
    info = result["cert"]["shards"]["1"]
    assert info["rebound"] is True and info["from_slice"] == 1 and info["restart_stage"] == 0
    assert here.id in info["rebind_reason"] and len(info["new_checkpoints"]) == 3  # the new chain, all stages
    assert info["domain"]["cpu_kernels"] == other.upper()
