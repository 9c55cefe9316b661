"""A frozen shared backbone with per-shard heads or LoRA: core set, digest in the recipe, exactness."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sisa.config.loader import load_config
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, CoreSetError, DataError, IntegrityError, ModelError
from sisa.serve import aggregate
from sisa.store.digests import recipe, recipe_digest, weights_digest
from sisa.train.adapters import AdaptedModel
from sisa.train.checkpoint import load_checkpoint
from sisa.train.trainer import train_shard
from tests.conftest import blobs, files_containing, live_state, nearest_centroid_accuracy, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

X, Y = blobs(600, d=10)
CORE = np.arange(0, 600, 10)  # 60 core ids, spread over every shard

HEAD = ("backbone.source=core", "backbone.name=mlp", "backbone.hidden=[16]", "backbone.epochs=3", "model.adapter=head")
LORA = (*HEAD[:-1], "model.adapter=lora", "model.rank=2", "model.hidden=[]")


def make(path: Path, *overrides: str, x: np.ndarray = X, y: np.ndarray = Y, ids: np.ndarray | None = None) -> Ensemble:
    ens = Ensemble.create(path, small_config(*overrides))
    ids = np.arange(len(x)) if ids is None else ids
    ens.ingest(x, y, ids, core=CORE[np.isin(CORE, ids)])
    ens.fit()
    return ens


def checkpoint_states(ens: Ensemble) -> list[dict[str, torch.Tensor]]:
    with ens.store.read() as txn:
        records = [r for s in range(ens.config.shards) for r in ens.store.stage_records(txn, s)]
        return [load_checkpoint(ens.store.checkpoint(txn, r))["model"] for r in records]


@pytest.mark.parametrize("adapter", [HEAD, LORA], ids=["head", "lora"])
def test_deletion_retrains_only_the_per_shard_part_and_verify_is_bit_exact(
    adapter: tuple[str, ...], tmp_path: Path
) -> None:
    with make(tmp_path / "st", *adapter) as ens:
        backbone = ens.store.meta()["backbone"]
        # Checkpoints hold the per-shard part only: the backbone's weights are stored once, beside them.
        for state in checkpoint_states(ens):
            assert state and all(k.startswith(("head.", "lora.")) for k in state)
        assert ("lora." in " ".join(checkpoint_states(ens)[0])) == ("model.adapter=lora" in adapter)
        victims = [5, 123, 461]
        cert = ens.delete(victims)
        assert cert["state"] == "applied"
        assert ens.store.meta()["backbone"] == backbone  # no deletable sample ever reached it
        report = ens.verify()
        assert report["ok"], report
        live = live_state(ens)
    # Retraining from scratch, without the deleted ids, gives the same bits: the backbone from the same
    # core set, and every shard from its remaining samples.
    keep = np.setdiff1d(np.arange(len(X)), victims)
    with make(tmp_path / "fresh", *adapter, x=X[keep], y=Y[keep], ids=keep) as fresh:
        assert fresh.store.meta()["backbone"]["digest"] == backbone["digest"]
        assert {s: w for s, (_, w) in live_state(fresh).items()} == {s: w for s, (_, w) in live.items()}


def test_a_core_set_deletion_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    with make(tmp_path / "st", *HEAD) as ens:
        before = store_digest(ens.path)
        for ids in ([int(CORE[3])], [7, int(CORE[0])]):  # a core id alone, or among others: the whole request
            with pytest.raises(CoreSetError, match=r"core set .* trained the shared backbone.*nothing changed"):
                ens.delete(ids)
            with pytest.raises(CoreSetError):
                ens.delete(ids, defer=True)
        assert store_digest(ens.path) == before
        assert ens.pending() == []
    cli = [sys.executable, "-m", "sisa.cli", "delete", "--store", str(tmp_path / "st"), "--ids", str(CORE[1])]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 2 and "core set" in done.stderr  # bad input: exit 2
    assert store_digest(tmp_path / "st") == before


def test_core_ids_are_checked_at_ingest_and_nothing_is_written(tmp_path: Path) -> None:
    with Ensemble.create(tmp_path / "st", small_config(*HEAD)) as ens:
        before = store_digest(ens.path)
        with pytest.raises(DataError, match="not among the samples of this ingest"):
            ens.ingest(X, Y, core=[5, 10_000])
        assert store_digest(ens.path) == before
    with Ensemble.create(tmp_path / "plain", small_config()) as ens:
        with pytest.raises(DataError, match="backbone.source is none"):
            ens.ingest(X, Y, core=True)
        assert ens.feature_shape is None
    with Ensemble.create(tmp_path / "none", small_config(*HEAD)) as ens:
        ens.ingest(X, Y)
        with pytest.raises(DataError, match="needs a core set"):
            ens.fit()


def test_new_core_samples_retrain_the_backbone_and_every_shard(tmp_path: Path) -> None:
    with make(tmp_path / "st", *HEAD) as ens:
        old = ens.store.meta()["backbone"]["digest"]
        keys = {s: r["key"] for s, r in live_records(ens).items()}
        extra_x, extra_y = blobs(30, d=10, seed=5)
        ids = np.arange(1000, 1030)
        report = ens.add(extra_x, extra_y, ids, core=ids[:10])
        assert ens.store.meta()["backbone"]["digest"] != old
        assert sorted(report.trained) == list(range(ens.config.shards))
        assert all(stages[0] == 1 for stages in report.trained.values())  # from scratch: every stage is stale
        with ens.store.read() as txn:
            assert not set(keys.values()) & set(ens.store.checkpoint_keys(txn))
        assert ens.verify()["ok"]


BACKBONE_MODULE = """
import torch
from torch import nn


def build(input_shape, path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU())
    net.load_state_dict(torch.load(path, weights_only=True))
    return net
"""


def pretrained_file(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8), torch.nn.ReLU()
    )
    path = folder / "weights.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    (tmp_path / "my_backbone.py").write_text(textwrap.dedent(BACKBONE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = pretrained_file(tmp_path, 0)
    return (
        "backbone.source=pretrained",
        "backbone.name=my_backbone:build",
        f"backbone.options={{path: {path}}}",
    )


@pytest.mark.parametrize("adapter", ["head", "lora"])
def test_a_pretrained_backbone_from_a_local_file_and_its_change_invalidates_every_checkpoint(
    adapter: str, pretrained: tuple[str, ...], tmp_path: Path
) -> None:
    # 12 epochs: enough for the head to learn what the frozen random features hold
    config = small_config(*pretrained, f"model.adapter={adapter}", "train.epochs=12")
    with Ensemble.create(tmp_path / "st", config) as ens:
        ens.ingest(X, Y)
        ens.fit()
        stored = ens.store.meta()["backbone"]
        weights = torch.load(tmp_path / "weights.pt", weights_only=True)
        assert stored["digest"] == weights_digest(weights)  # the user's weights, hashed and stored as given
        first = {s: r["key"] for s, r in live_records(ens).items()}
        # The heads learned on the features: on held-out samples, the ensemble is about as good as a
        # reference fitted in the same run, a nearest-centroid classifier of the same backbone's
        # features (0.90 here), or better. No fixed number: kernels differ between machines.
        x_test, y_test = (a[len(X) :] for a in blobs(len(X) + 300, d=10))
        backbone = importlib.import_module("my_backbone").build((10,), tmp_path / "weights.pt")
        with torch.no_grad():
            features, test_features = (backbone(torch.from_numpy(a)).numpy() for a in (X, x_test))
        assert ens.score(x_test, y_test) >= nearest_centroid_accuracy(features, Y, test_features, y_test) - 0.05
        assert ens.verify()["ok"]
        unchanged = ens.fit()
        assert unchanged.trained == {} and sorted(unchanged.skipped) == [0, 1, 2]

        with ens.store.read() as txn:
            sealed = ens.store.sealed_checkpoint(txn, stored)
            assert sealed is not None
            with ens.store.key_snapshot(txn) as ktxn:
                old_key = ens.store.keys.checkpoint_key(ktxn, sealed[:16])
        assert old_key is not None and files_containing(ens.path, old_key)

        pretrained_file(tmp_path, 1)  # the user replaces the file: another backbone
        # A deletion runs on the stored backbone: it retrains one shard's part, never everything.
        cert = ens.delete([42])
        assert len(cert["retrained_shards"]) == 1
        assert ens.store.meta()["backbone"]["digest"] == stored["digest"]
        report = ens.fit()  # an explicit fit takes the new backbone
        assert ens.store.meta()["backbone"]["digest"] != stored["digest"]
        assert files_containing(ens.path, old_key) == []  # the replaced weights' key is on no file
        assert {s: stages[0] for s, stages in report.trained.items()} == {0: 1, 1: 1, 2: 1}
        with ens.store.read() as txn:
            assert not set(first.values()) & set(ens.store.checkpoint_keys(txn))
        assert ens.verify()["ok"]


def live_records(ens: Ensemble) -> dict[int, dict[str, object]]:
    with ens.store.read() as txn:
        return ens.store.live(txn)


def test_the_ensemble_computes_shared_features_once_and_matches_each_full_forward(tmp_path: Path) -> None:
    with make(tmp_path / "st", *HEAD) as ens:
        models = list(ens.live_models().values())
        assert all(isinstance(m, AdaptedModel) and m.shared_backbone is models[0].shared_backbone for m in models)
        x = torch.from_numpy(X[:100])
        with torch.no_grad():
            each = torch.stack([m.eval()(x) for m in models])
        assert torch.equal(aggregate.shard_logits(models, x, backend="loop"), each)
        assert np.array_equal(ens.predict(X[:100]), each.softmax(-1).mean(0).argmax(1).numpy())


def test_cnn_backbone_with_lora_on_its_convolutions(tmp_path: Path) -> None:
    images = np.random.default_rng(0).normal(size=(240, 1, 6, 6)).astype(np.float32)
    labels = (images[:, 0, :3].sum((1, 2)) > 0).astype(np.int64)
    cnn = ("backbone.source=core", "backbone.name=cnn", "backbone.channels=[3]", "backbone.hidden=[]")
    over = (*cnn, "backbone.epochs=2", "model.adapter=lora", "model.targets=['0']", "data.num_classes=2")
    ens = Ensemble.create(tmp_path / "st", small_config(*over, "shards=2", "slices=2"))
    with ens:
        ens.ingest(images, labels, core=np.arange(40))
        ens.fit()
        state = checkpoint_states(ens)[0]
        assert sorted(state)[:2] == ["head.0.bias", "head.0.weight"]
        assert state["lora.0.a"].shape == (4, 1, 3, 3) and state["lora.0.b"].shape == (3, 4, 1, 1)  # rank 4
        assert ens.verify()["ok"]


def test_bad_lora_targets_and_configs_say_how_to_fix_them(tmp_path: Path) -> None:
    lora = (*HEAD[:-1], "model.adapter=lora")
    with pytest.raises(ConfigError, match=r"model.targets\[0\] must be a string, got 9"):
        small_config(*lora, "model.targets=[9]")  # layer names are strings, even a Sequential's indices
    with Ensemble.create(tmp_path / "st", small_config(*lora, "model.targets=['9']")) as ens:
        ens.ingest(X, Y, core=CORE)
        with pytest.raises(ModelError, match=r"model.targets \['9'\].*layers are: \['1'\]"):
            ens.fit()
    with pytest.raises(ConfigError, match="set model.adapter: head"):
        load_config(None, list(HEAD[:-1]))
    with pytest.raises(ConfigError, match="backbone.source is none"):
        load_config(None, ["model.adapter=head"])
    with pytest.raises(ConfigError, match="needs backbone.name: 'package.module:callable'"):
        load_config(None, ["backbone.source=pretrained", "backbone.name=mlp", "model.adapter=head"])


FIT_IN_CHILD = """
import json, sys
import numpy as np
from sisa.ensemble import Ensemble
from tests.conftest import blobs, live_state, small_config
from tests.train.test_backbone import CORE, HEAD, X, Y
with Ensemble.create(sys.argv[1], small_config(*HEAD), address="local") as ens:
    ens.ingest(X, Y, np.arange(len(X)), core=CORE)
    ens.fit()
    print(json.dumps({"backbone": ens.store.meta()["backbone"]["digest"], "live": live_state(ens)}))
"""


def test_the_core_backbone_trains_in_the_shards_domain_however_the_driver_was_started(
    tmp_path: Path, env_python: dict[str, str]
) -> None:
    # The same fit from this process and from one started with other CPU kernels (ATEN_CPU_CAPABILITY=default):
    # a backbone trained in the driver would differ in its last bits, and every head with it.
    with Ensemble.create(tmp_path / "here", small_config(*HEAD), address="local") as ens:
        ens.ingest(X, Y, np.arange(len(X)), core=CORE)
        ens.fit()
        record = ens.store.meta()["backbone"]
        here = {"backbone": record["digest"], "live": live_state(ens)}
        with ens.store.read() as txn:
            shard_domains = {r["domain"]["id"] for r in ens.store.live(txn).values()}
    env = {**env_python, "ATEN_CPU_CAPABILITY": "default"}
    code = [sys.executable, "-c", FIT_IN_CHILD, str(tmp_path / "there")]
    done = subprocess.run(code, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(here))
    assert shard_domains == {record["domain"]}  # the backbone's record names the shards' domain


def test_the_backbone_digest_is_part_of_the_recipe() -> None:
    cfg = small_config(*HEAD)
    assert recipe_digest(cfg, "a" * 64) != recipe_digest(cfg, "b" * 64)
    assert recipe(cfg, "a" * 64)["backbone"]["digest"] == "a" * 64
    with pytest.raises(ConfigError):
        recipe_digest(cfg)
    plain = small_config()
    assert "adapter" not in recipe(plain)["model"]  # stores from before adapters keep their keys


class Payload:
    """Unpickling this creates a file: the marker that a crafted pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_backbone(path: Path, blob: bytes) -> None:
    """Store ``blob`` as the backbone, sealed and recorded with its sha256 (as one who holds the keys would)."""
    with Ensemble.open(path) as ens:
        store = ens.store
        with store.read() as txn:
            record = dict(store.meta(txn)["backbone"])
        record.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
        sealed = store.seal_checkpoint(blob, record["key"])
        store.write(lambda txn: store.put_backbone(txn, record, sealed))


def test_stored_backbone_bytes_are_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "st"
    with make(path, *HEAD) as ens:
        with ens.store.read() as txn:
            record, blob = ens.store.backbone_bytes(txn)  # type: ignore[misc]
        state = torch.load(io.BytesIO(blob), weights_only=True)
        assert weights_digest(state["state"]) == record["digest"]
        assert record["core"] == len(CORE) and record["bytes"] == len(blob)
    assert record["sha256"] == hashlib.sha256(blob).hexdigest()  # plant_backbone records what the store does
    # A shard task checks the backbone it was handed, whatever carried it there.
    with Ensemble.open(path) as ens:
        with ens.store.read() as txn:
            job = ens.planner.shard_job(txn, 0, 0)
        with torch.no_grad():
            next(iter(job.backbone.module.parameters())).view(-1)[0] += 1.0  # type: ignore[union-attr]
        with pytest.raises(IntegrityError, match="modified after it was stored"):
            next(iter(train_shard(job)))
    # A crafted pickle with the right format, digest and weights: only weights_only loading refuses it.
    marker = tmp_path / "payload-ran"
    evil = io.BytesIO()
    torch.save({**state, "extra": Payload(marker)}, evil)
    # The right format and digest, but one weight changed: only the digest check refuses it.
    flipped = {k: v.clone() for k, v in state["state"].items()}
    first = next(iter(flipped))
    flipped[first].view(-1)[0] += 1.0
    altered = io.BytesIO()
    torch.save({**state, "state": flipped}, altered)
    for planted, match in ((evil.getvalue(), "decoded safely"), (altered.getvalue(), "do not hash")):
        plant_backbone(path, planted)
        with Ensemble.open(path) as ens:
            with pytest.raises(IntegrityError, match=match):
                ens.predict(X[:4])
        with Ensemble.open(path) as ens:
            with pytest.raises(IntegrityError, match=match):
                ens.fit()
        with Ensemble.open(path) as ens, ens.store.read() as txn:
            with pytest.raises(IntegrityError, match=match):
                ens.planner.shard_job(txn, 0, 0)  # what each shard's training task is built from
        assert not marker.exists()


def test_live_models_of_another_network_are_refused_with_the_fix(tmp_path: Path) -> None:
    with make(tmp_path / "st", *HEAD) as ens:
        before = ens.predict(X[:20])
        ens.reconfigure(small_config(*LORA))  # another per-shard network: the live heads no longer fit it
        with pytest.raises(ModelError, match=r"shard 0 was trained as another network.*sisa train --store"):
            ens.predict(X[:20])
        ens.reconfigure(small_config(*HEAD))
        assert np.array_equal(ens.predict(X[:20]), before)
