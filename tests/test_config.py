from pathlib import Path

import pytest

from sisa.config import config_from_dict, config_to_dict, load_config
from sisa.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


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
    assert base.recipe_digest() == load_config(None, ["aggregate.method=vote"]).recipe_digest()
    assert base.recipe_digest() != load_config(None, ["train.lr=0.01"]).recipe_digest()
    assert base.recipe_digest() != load_config(None, ["resources.threads_per_shard=2"]).recipe_digest()


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
def test_evaluate_section_is_validated(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_evaluate_section_does_not_change_the_recipe() -> None:
    base = load_config(None)
    tuned = load_config(None, ["evaluate.finetune.epochs=7", "evaluate.retrain_seeds=4"])
    assert tuned.evaluate.finetune.epochs == 7 and tuned.recipe_digest() == base.recipe_digest()
