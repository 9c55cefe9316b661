import dataclasses
import re
from pathlib import Path

import pytest

from sisa.config.fields import FIXED, FREE, RECIPE, config_fields, config_to_dict, field_roles, setting
from sisa.config.loader import config_from_dict, load_config
from sisa.config.settings import FIELD_ROLES, SisaConfig
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError
from sisa.evaluate.settings import EvaluateConfig, load_evaluate_config
from sisa.store.digests import recipe_digest
from tests.conftest import store_digest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["fashion_mnist.yaml", "fashion_mnist_cnn.yaml", "tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.data.dataset == "fashion-mnist"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_dotted_and_typed() -> None:
    cfg = load_config(
        ROOT / "configs/fashion_mnist.yaml", ["shards=16", "slices=2", "train.lr=0.01", "model.hidden=[64, 32]"]
    )
    assert (cfg.shards, cfg.slices, cfg.train.lr, cfg.model.hidden) == (16, 2, 0.01, (64, 32))


def test_recalibrated_epochs_follow_the_paper() -> None:
    cfg = load_config(None, ["train.epochs=10"])
    assert cfg.train.stage_epochs(4) == 4  # 2*10/(4+1)
    assert cfg.train.stage_epochs(1) == 10
    assert load_config(None, ["train.epoch_schedule=constant"]).train.stage_epochs(4) == 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("shard=3", "unknown config key.*shard.*allowed here: seed, shards"),
        ("train.optim=sgd", "unknown config key.*train.optim.*allowed here.*train.optimizer"),
        ("train.optimizer=rmsprop", "choose one of adam, sgd"),
        ("shards=0", r"shards=0 must be in \[1, 4096\]"),
        ("slices=-1", "slices=-1"),
        ("train.epochs=0", "train.epochs=0 must be >= 1"),
        ("train.lr=fast", "train.lr must be a number"),
        ("aggregate.method=median", "choose one of mean, vote, weighted"),
        ("resources.gpus_per_shard=1.5", "fraction"),
        ("data.dataset=imagenet", "choose one of fashion-mnist"),
        ("data.dataset=npz", "needs data.train=PATH"),
        ("model.name=resnet", "use 'mlp', 'cnn' or 'package.module:callable'"),
        ("noequals", "must look like key=value"),
        ("train=3", "train must be a mapping"),
    ],
)
def test_bad_values_name_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)


def test_recipe_digest_tracks_training_settings_only() -> None:
    base = load_config(None)
    assert recipe_digest(base) == recipe_digest(load_config(None, ["aggregate.method=vote"]))
    assert recipe_digest(base) != recipe_digest(load_config(None, ["train.lr=0.01"]))
    assert recipe_digest(base) != recipe_digest(load_config(None, ["resources.threads_per_shard=2"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluate.retrain_seeds=1", "retrain_seeds=1 must be in"),
        ("evaluate.mia_folds=1", "mia_folds=1"),
        ("evaluate.mia_samples=5", "mia_samples=5"),
        ("evaluate.threads=-1", "threads=-1"),
        ("evaluate.gradient_ascent.lr=0", "gradient_ascent.lr=0.0 must be > 0"),
        ("evaluate.gradient_ascent.retain_weight=-1", "retain_weight=-1.0"),
        ("evaluate.finetune.epochs=-1", "finetune.epochs=-1"),
        ("evaluate.prune.fraction=1", "prune.fraction=1.0 must be in (0, 1)"),
        ("evaluate.prune.mode=melt", "choose one of zero, reinit"),
        ("evaluate.prune.batch_size=0", "prune.batch_size=0"),
        ("evaluate.unknown=1", "unknown config key(s) evaluate.unknown"),
    ],
)
def test_evaluate_section_is_validated_by_the_evaluate_layer(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_evaluate_config(None, [override])
    assert message in str(err.value)
    # sisa.load_config sets the section aside unread (the CLI checks it: tests/cli/test_cli.py).
    assert load_config(None, [override]) == SisaConfig()


def test_evaluate_section_is_not_part_of_the_ensemble_config() -> None:
    """The harness's settings stay out of SisaConfig: out of a store's meta, of every Ray task, of the recipe."""
    path = ROOT / "configs/fashion_mnist.yaml"
    cfg = load_config(path, ["evaluate.finetune.epochs=7", "evaluate.retrain_seeds=4"])
    assert not hasattr(cfg, "evaluate") and "evaluate" not in config_to_dict(cfg)
    assert not any(name.startswith("evaluate.") for name in FIELD_ROLES)
    assert cfg == load_config(path)
    # The same file and overrides give the harness its settings.
    settings = load_evaluate_config(path, ["evaluate.finetune.epochs=7", "evaluate.retrain_seeds=4"])
    assert (settings.finetune.epochs, settings.retrain_seeds) == (7, 4)
    assert settings.mia_folds == load_evaluate_config(path).mia_folds


def test_recipe_digest_is_unchanged_by_moving_the_evaluate_section() -> None:
    """Computed with the code before `evaluate` left SisaConfig: every stored checkpoint key still matches."""
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml")
    assert recipe_digest(cfg) == "cc2f3fcc5e8743ea5f04a265da9a6eeb6a792ca55c571af21ccb6484319b9d25"


def test_a_typo_at_the_top_level_is_still_refused_beside_an_evaluate_section() -> None:
    raw = {**config_to_dict(SisaConfig()), "evaluate": {"mia_folds": 3}, "evaluat": {"mia_folds": 3}}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) evaluat; allowed here: seed"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) evaluate\.mia_fold; allowed here"):
        load_evaluate_config({"evaluate": {"mia_fold": 3}})
    with pytest.raises(ConfigError, match="evaluate must be a mapping of keys, got 3"):
        load_evaluate_config(None, ["evaluate=3"])


def test_every_override_spelling_reaches_the_evaluate_section() -> None:
    assert load_evaluate_config(None, ["evaluate.mia_folds=3"]).mia_folds == 3
    assert load_evaluate_config(None, ["evaluate={mia_folds: 3, newton: {scope: full}}"]).newton.scope == "full"
    assert load_evaluate_config(None, ["evaluate.newton={l2: 0.5}"]).newton.l2 == 0.5
    assert load_evaluate_config({"evaluate": {"threads": 2}}, ["shards=2"]) == EvaluateConfig(threads=2)
    assert load_evaluate_config(None) == EvaluateConfig()


def test_a_store_whose_stored_config_holds_an_evaluate_section_still_opens(tmp_path: Path) -> None:
    """Stores written while SisaConfig had an `evaluate` field keep it in their meta; they open as before."""
    cfg = load_config(None, ["shards=2", "slices=2"])
    with Ensemble.create(tmp_path / "st", cfg) as ens:
        old = {**config_to_dict(cfg), "evaluate": {**config_to_dict(EvaluateConfig()), "mia_folds": 3}}
        ens.store.write(lambda txn: ens.store.put_meta(txn, config=old))
    with Ensemble.open(tmp_path / "st", readonly=True) as reopened:
        assert reopened.store.meta()["config"]["evaluate"]["mia_folds"] == 3  # the old meta, as written
        assert reopened.config == cfg and recipe_digest(reopened.config) == recipe_digest(cfg)
    with Ensemble.open(tmp_path / "st") as ens:
        ens.reconfigure(load_config(None, ["shards=2", "slices=2", "train.lr=0.01"]))
    with Ensemble.open(tmp_path / "st", readonly=True) as reopened:
        assert "evaluate" not in reopened.store.meta()["config"]  # a rewrite drops it


# A config whose shards share a backbone trained on a core set (a recipe then also takes its digest).
CORE_BACKBONE = ["backbone.source=core", "backbone.name=mlp", "model.adapter=head"]

# For every config field: (overrides of the base, overrides giving the field another value). A field
# added to the config needs a line here (its role is declared on the field itself: sisa.config.fields.setting).
OTHER_VALUE: dict[str, tuple[list[str], list[str]]] = {
    "seed": ([], ["seed=1"]),
    "shards": ([], ["shards=4"]),
    "slices": ([], ["slices=2"]),
    "partition.strategy": ([], ["partition.strategy=distribution-aware"]),
    "partition.bound": (["partition.strategy=distribution-aware"], ["partition.bound=2"]),
    "partition.slice_order": ([], ["partition.slice_order=probability"]),
    "partition.graph": ([], ["partition.graph=ring:1"]),
    "partition.probabilities": (
        ["partition.slice_order=probability", "partition.probabilities=a.csv"],
        ["partition.probabilities=b.csv"],
    ),
    "data.num_classes": ([], ["data.num_classes=5"]),
    "data.dataset": ([], ["data.dataset=npz", "data.train=t.npz"]),
    "data.train": ([], ["data.train=t.npz"]),
    "data.test": ([], ["data.test=t.npz"]),
    "data.train_labels": ([], ["data.train_labels=l.idx"]),
    "data.test_labels": ([], ["data.test_labels=l.idx"]),
    "data.root": ([], ["data.root=/elsewhere"]),
    "data.label_column": ([], ["data.label_column=y"]),
    "data.id_column": ([], ["data.id_column=id"]),
    "data.feature_columns": (["data.dataset=parquet", "data.train=t.parquet"], ["data.feature_columns=[a, b]"]),
    "data.train_limit": ([], ["data.train_limit=100"]),
    "data.test_limit": ([], ["data.test_limit=100"]),
    "model.name": ([], ["model.name=cnn"]),
    "model.hidden": ([], ["model.hidden=[64]"]),
    "model.channels": ([], ["model.channels=[8]"]),
    "model.dropout": ([], ["model.dropout=0.5"]),
    "model.options": ([], ["model.options={width: 3}"]),
    "train.epochs": ([], ["train.epochs=3"]),
    "train.epoch_schedule": ([], ["train.epoch_schedule=constant"]),
    "train.batch_size": ([], ["train.batch_size=16"]),
    "train.optimizer": ([], ["train.optimizer=sgd"]),
    "train.lr": ([], ["train.lr=0.5"]),
    "train.weight_decay": ([], ["train.weight_decay=0.1"]),
    "train.momentum": ([], ["train.momentum=0.5"]),
    "train.precision": ([], ["train.precision=bf16"]),
    "aggregate.method": ([], ["aggregate.method=vote"]),
    "aggregate.backend": ([], ["aggregate.backend=loop"]),
    "unlearn.policy": ([], ["unlearn.policy=serve-clean"]),
    "resources.cpus_per_shard": ([], ["resources.cpus_per_shard=2"]),
    "resources.gpus_per_shard": ([], ["resources.gpus_per_shard=0.5"]),
    "resources.threads_per_shard": ([], ["resources.threads_per_shard=2"]),
    "resources.max_retries": ([], ["resources.max_retries=0"]),
    "resources.custom": ([], ["resources.custom={sisa_worker: 1}"]),
    "resources.stream_slices": ([], ["resources.stream_slices=true"]),
    "resources.max_shards_in_flight": ([], ["resources.max_shards_in_flight=1"]),
    "resources.cpu_isa": ([], ["resources.cpu_isa=baseline"]),
    "resources.on_missing_domain": ([], ["resources.on_missing_domain=refuse"]),
    "model.adapter": (CORE_BACKBONE, ["model.adapter=lora"]),
    "model.rank": ([*CORE_BACKBONE, "model.adapter=lora"], ["model.rank=8"]),
    "model.alpha": ([*CORE_BACKBONE, "model.adapter=lora"], ["model.alpha=2"]),
    "model.targets": ([*CORE_BACKBONE, "model.adapter=lora"], ["model.targets=[a]"]),
    "backbone.source": (CORE_BACKBONE, ["backbone.source=pretrained", "backbone.name=m:f"]),
    "backbone.name": (CORE_BACKBONE, ["backbone.name=cnn"]),
    "backbone.options": (CORE_BACKBONE, ["backbone.options={width: 3}"]),
    "backbone.hidden": (CORE_BACKBONE, ["backbone.hidden=[64]"]),
    "backbone.channels": (CORE_BACKBONE, ["backbone.channels=[8]"]),
    "backbone.epochs": (CORE_BACKBONE, ["backbone.epochs=3"]),
}


def test_every_config_field_declares_its_role_and_has_another_value_here() -> None:
    fields = set(config_fields(SisaConfig()))
    assert set(FIELD_ROLES) == fields and set(FIELD_ROLES.values()) <= {RECIPE, FIXED, FREE}
    assert not fields - set(OTHER_VALUE), (
        f"give these fields another value in OTHER_VALUE: {sorted(fields - set(OTHER_VALUE))}"
    )


def test_a_config_field_without_a_role_is_refused() -> None:
    """A role is part of a field's declaration, so no field can ship without one."""

    @dataclasses.dataclass(frozen=True)
    class Section:
        kept: int = setting(1, role=FREE)
        forgot: int = 2

    with pytest.raises(TypeError, match="config field forgot has no role"):
        field_roles(Section)
    with pytest.raises(ValueError, match="role 'sometimes'"):
        setting(1, role="sometimes")


@pytest.mark.parametrize("name", sorted(OTHER_VALUE))
def test_each_field_behaves_as_classified_on_an_existing_store(name: str, tmp_path: Path) -> None:
    """Recipe fields change the checkpoint keys; fixed ones are refused on a store; free ones change neither."""
    base_overrides, other = OTHER_VALUE[name]
    base = load_config(None, base_overrides)
    changed = load_config(None, [*base_overrides, *other])
    assert config_fields(changed)[name] != config_fields(base)[name]
    with Ensemble.create(tmp_path / "st", base) as ens:
        before = store_digest(ens.path)
        if FIELD_ROLES[name] == FIXED:
            with pytest.raises(ConfigError, match=rf"{re.escape(name)}.*cannot change after creation"):
                ens.reconfigure(changed)
            assert store_digest(ens.path) == before and ens.config == base
            return
        ens.reconfigure(changed)
    with Ensemble.open(tmp_path / "st", readonly=True) as reopened:
        assert reopened.config == changed
    digest = "0" * 64  # a stored backbone's, where the config shares one: the same on both sides
    moved = recipe_digest(changed, digest if changed.backbone.enabled else None) != recipe_digest(
        base, digest if base.backbone.enabled else None
    )
    assert moved == (FIELD_ROLES[name] == RECIPE)


@pytest.mark.parametrize(
    ("shards", "graph", "message"),
    [
        (4, "ring:0", "is not allowed; use none, ring:k or random:k"),
        (4, "ring:4", r"links each shard to 4 others.*use k in \[1, 3\]"),
        (4, "random:9", r"links each shard to 9 others.*use k in \[1, 3\]"),
        (4, "random:x", "is not allowed; use none, ring:k or random:k"),
        (4, "star:1", "is not allowed; use none, ring:k or random:k"),
        (4, "ring", "is not allowed; use none, ring:k or random:k"),
        (4, "ring:-1", "is not allowed; use none, ring:k or random:k"),
        (1, "ring:1", "with one shard only none is allowed"),
    ],
)
def test_a_bad_shard_graph_is_refused_at_load_naming_the_allowed_forms(shards: int, graph: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"shards={shards}", f"partition.graph={graph}"])


def test_the_shard_graph_is_not_in_the_recipe_so_none_keeps_every_key() -> None:
    # The manifests cover what each shard trains on, links included; the recipe (every checkpoint key's first
    # part) stays what it was before the field existed, under every graph.
    before = "cc2f3fcc5e8743ea5f04a265da9a6eeb6a792ca55c571af21ccb6484319b9d25"  # main before the field existed
    for graph in ("none", "ring:1", "random:3"):
        assert recipe_digest(load_config(None, ["shards=4", f"partition.graph={graph}"])) == before
    assert FIELD_ROLES["partition.graph"] == FIXED
