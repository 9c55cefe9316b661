"""The harness on raw pixels with a scale: the same sets, models and unlearning as on the loader's floats.

``evaluate`` loads floats, but its parts are public and take any LabeledArrays: one given raw
uint8 pixels with ``scale=255`` must give what the scaled floats give, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sisa.data.arrays import LabeledArrays
from sisa.data.loaders import load_fashion_mnist
from sisa.evaluate.approximate import APPROXIMATE_METHODS
from sisa.evaluate.forgets import parse_forget
from sisa.evaluate.monolithic import train_monolithic
from sisa.evaluate.sets import build_sets
from sisa.evaluate.settings import EvaluateConfig
from tests.conftest import small_config

N, TEST = 200, 100
SETS = ("forget", "retain", "retain_eval", "test", "heldout", "train", "attack")


def cut(data: LabeledArrays, start: int, stop: int) -> LabeledArrays:
    """Rows ``start:stop`` of ``data``, keeping its scale."""
    part = slice(start, stop)
    return LabeledArrays(data.x[part], data.y[part], data.ids[part], scale=data.scale)


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[LabeledArrays, LabeledArrays]]:
    """(train, test) as raw uint8 pixels with their scale, and as the default loader's floats."""
    raw = (cut(load_fashion_mnist("train", raw=True), 0, N), cut(load_fashion_mnist("test", raw=True), 0, TEST))
    floats = (cut(load_fashion_mnist("train"), 0, N), cut(load_fashion_mnist("test"), 0, TEST))
    assert raw[0].scale == 255.0 and floats[0].scale is None
    return {"raw": raw, "floats": floats}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("forget", ["random:0.1", "backdoor:rate=0.1,target=0"])
def test_raw_pixels_build_the_same_sets_and_models_as_floats(
    splits: dict[str, tuple[LabeledArrays, LabeledArrays]], forget: str
) -> None:
    cfg = small_config("data.num_classes=10", "model.hidden=[8]", "train.epochs=1")
    spec = parse_forget(forget)
    raw, floats = (build_sets(spec, *splits[k], cfg) for k in ("raw", "floats"))
    for name in SETS:
        a, b = getattr(raw, name), getattr(floats, name)
        if b is None:
            continue
        assert a.x.dtype == np.float32 and a.scale is None, name  # what a model is fed directly
        assert np.array_equal(a.x, b.x) and np.array_equal(a.ids, b.ids) and np.array_equal(a.y, b.y), name
    # A monolithic model and an approximate method fed raw pixels with a scale see x / 255, as a store's do.
    model, _ = train_monolithic(cfg, splits["raw"][0], seed=0, threads=1)
    reference, _ = train_monolithic(cfg, splits["floats"][0], seed=0, threads=1)
    assert same_state(model, reference)
    ascent, settings = APPROXIMATE_METHODS["gradient_ascent"], EvaluateConfig()
    outs = [
        ascent(m, cut(splits[k][0], 0, 20), cut(splits[k][0], 20, N), cfg, seed=0, threads=1, settings=settings)
        for m, k in ((model, "raw"), (reference, "floats"))
    ]
    assert same_state(*outs)
