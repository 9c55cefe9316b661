"""One stored input transform: raw pixels with a scale train and answer exactly as the scaled floats do.

For every kind of model (plain MLP and CNN, a head or LoRA on a core-trained backbone), a store
ingested as bare uint8 arrays with ``scale=255`` and one ingested as the loader's float images
train bit-identical live models, and the raw store gives the same probabilities for the same
images as uint8 and as floats. Real stores, the local runner (no Ray).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from sisa.config.settings import SisaConfig
from sisa.data.arrays import LabeledArrays
from sisa.data.loaders import load_fashion_mnist
from sisa.ensemble import Ensemble
from sisa.errors import DataError
from tests.conftest import live_state, small_config

N, CORE, TEST = 240, 80, 64

# Small networks and one or two epochs: the promises are about bits, not accuracy.
BACKBONE = ("backbone.source=core", "backbone.epochs=1", "backbone.hidden=[8]", "backbone.channels=[2,4]")
KINDS = {
    "mlp": (),
    "cnn": ("model.name=cnn", "model.channels=[2,4]"),
    "head": (*BACKBONE, "backbone.name=cnn", "model.adapter=head"),
    "lora": (*BACKBONE, "backbone.name=mlp", "model.adapter=lora", "model.rank=2", "model.hidden=[]"),
}


def config(kind: str) -> SisaConfig:
    base = ("shards=2", "slices=2", "data.num_classes=10", "model.hidden=[8]", "train.epochs=2")
    return small_config(*base, *KINDS[kind])


@pytest.fixture(scope="module")
def images() -> dict[str, LabeledArrays]:
    """The first Fashion-MNIST images, raw (uint8, scale 255) and as the default loader gives them."""
    raw, floats = load_fashion_mnist("train", raw=True), load_fashion_mnist("train")
    test_raw, test_floats = load_fashion_mnist("test", raw=True), load_fashion_mnist("test")
    assert raw.scale == 255.0 and raw.x.dtype == np.uint8 and floats.scale is None
    return {
        "raw": LabeledArrays(raw.x[:N], raw.y[:N], raw.ids[:N], scale=raw.scale),
        "floats": LabeledArrays(floats.x[:N], floats.y[:N], floats.ids[:N]),
        "test_raw": LabeledArrays(test_raw.x[:TEST], test_raw.y[:TEST], test_raw.ids[:TEST], scale=test_raw.scale),
        "test_floats": LabeledArrays(test_floats.x[:TEST], test_floats.y[:TEST], test_floats.ids[:TEST]),
    }


@pytest.fixture(scope="module", params=list(KINDS))
def pair(
    request: pytest.FixtureRequest, images: dict[str, LabeledArrays], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Ensemble, Ensemble]:
    """One store ingested as bare uint8 arrays with ``scale=255``, one as floats; both trained."""
    kind, root = request.param, tmp_path_factory.mktemp(request.param)
    cfg, raw, floats = config(kind), images["raw"], images["floats"]
    core = raw.ids[:CORE] if cfg.backbone.enabled else None
    a = Ensemble.create(root / "raw", cfg, address="local")
    # The call: the arrays taken out of the raw loader's result (they do not carry the scale).
    a.ingest(raw.x, raw.y, raw.ids, scale=255, core=core)
    a.fit()
    b = Ensemble.create(root / "floats", cfg, address="local")
    b.ingest(floats.x, floats.y, floats.ids, core=core)
    b.fit()
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    return kind, a, b


def test_raw_ingest_with_a_scale_trains_the_same_live_weights_as_float_ingest(
    pair: tuple[str, Ensemble, Ensemble],
) -> None:
    kind, raw, floats = pair
    meta = raw.store.meta()
    assert meta["feature_dtype"] == "|u1" and meta["feature_scale"] == 255.0  # one byte a pixel on disk
    assert floats.store.meta()["feature_dtype"] == "<f4" and "feature_scale" not in floats.store.meta()
    if kind in ("head", "lora"):  # the backbone trained on the core set, in the driver
        assert raw.store.meta()["backbone"]["digest"] == floats.store.meta()["backbone"]["digest"]
    assert live_state(raw) == live_state(floats)  # same checkpoint bytes and weight digests, every shard
    assert raw.verify()["ok"]


def test_a_raw_store_gives_the_same_probabilities_for_uint8_and_float_images(
    pair: tuple[str, Ensemble, Ensemble], images: dict[str, LabeledArrays]
) -> None:
    _, raw, floats = pair
    x_u8, x_f32 = images["test_raw"].x, images["test_floats"].x
    expected = floats.predict_proba(x_f32)
    assert np.array_equal(raw.predict_proba(x_u8), expected)
    assert np.array_equal(raw.predict_proba(x_f32), expected)
    assert np.array_equal(raw.predict_proba(images["test_raw"]), expected)  # a LabeledArrays: its x, as uint8
    y = images["test_floats"].y
    assert raw.score(x_f32, y) == raw.score(x_u8, y) == floats.score(x_f32, y)
    assert raw.shard_scores(x_f32, y) == raw.shard_scores(x_u8, y)


def test_integer_inputs_to_a_store_of_floats_warn_once_and_float_inputs_do_not(
    pair: tuple[str, Ensemble, Ensemble], images: dict[str, LabeledArrays]
) -> None:
    _, raw, floats = pair
    x_u8, x_f32 = images["test_raw"].x, images["test_floats"].x
    # Raw pixels given to a store whose models trained on the loader's 0..1 floats: garbage unless told.
    with pytest.warns(UserWarning, match=r"uint8 inputs \(max 255\) go to a store of float samples") as caught:
        floats.predict_proba(x_u8)
    ours = [str(w.message) for w in caught if "store of float samples" in str(w.message)]
    assert len(ours) == 1  # once per call, not per batch or shard
    assert "x / 255" in ours[0] and "scale=255" in ours[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        floats.predict_proba(x_f32)  # float inputs are model inputs: nothing to say
        raw.predict_proba(x_u8)  # the store has a scale: integers are scaled as its samples were
        floats.predict_proba((x_u8 > 127).astype(np.uint8))  # integers within 0..1 may well be meant


def test_bare_uint8_features_without_a_scale_warn_and_a_scale_is_checked(
    tmp_path: Path, images: dict[str, LabeledArrays]
) -> None:
    raw = images["raw"]
    with Ensemble.create(tmp_path / "bare", config("mlp"), address="local") as ens:
        with pytest.warns(UserWarning, match=r"uint8 features come without a scale.*pass scale=255"):
            ens.ingest(raw.x[:20], raw.y[:20], raw.ids[:20])
        assert "feature_scale" not in ens.store.meta()  # kept as given: the models see 0..255
    given = {"arrays and scale=255": ((raw.x, raw.y), {"scale": 255}), "the loader's LabeledArrays": ((raw,), {})}
    for n, (args, kwargs) in enumerate(given.values()):
        with Ensemble.create(tmp_path / f"scaled{n}", config("mlp"), address="local") as ens:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no warning when the scale is known
                ens.ingest(*args, **kwargs)
            assert ens.store.meta()["feature_scale"] == 255.0
    with Ensemble.create(tmp_path / "bad", config("mlp"), address="local") as ens:
        for bad in (0, -1, float("nan"), True, "255"):
            with pytest.raises(DataError, match=r"scale=.* must be a positive number"):
                ens.ingest(raw.x[:20], raw.y[:20], raw.ids[:20], scale=bad)
        with pytest.raises(DataError, match=r"carry scale 255 and scale=2 was given"):
            ens.ingest(raw, scale=2)
        assert ens.feature_shape is None  # nothing was written
