"""The stored input transform: raw feature values and a scale -> the float32 inputs a model sees.

A store keeps features in their own dtype, with an optional ``feature_scale`` (uint8 pixels
and 255, say); a model sees ``values.astype(float32) / scale``, divided in float32. Every path
that turns stored or given features into model inputs calls :func:`model_inputs` (training
slices, the core set, the loaders' scaled pixels, migration's check) or :func:`request_inputs`
(predict), so a store ingested raw with a scale and one ingested as the scaled floats train and
answer with the same bits.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from sisa.data.arrays import LabeledArrays

__all__ = ["as_model_inputs", "model_inputs", "request_inputs"]


def model_inputs(values: np.ndarray, scale: float | None, *, owned: bool = False) -> np.ndarray:
    """``values`` as the float32 model inputs they stand for: converted, then divided by ``scale``.

    The division is in float32 (the scale is cast to float32 first), the very operation a
    loader performs when it scales uint8 pixels, so raw values with a scale and the scaled
    floats give bit-identical inputs.

    Args:
        values: Raw feature values, any numeric dtype.
        scale: What they are divided by (a store's ``feature_scale``), or None / 0 for none.
        owned: The caller owns ``values`` and will not read them again: a float32 C-contiguous
            array is divided in place (saves a copy of, say, the whole core set).

    Returns:
        A C-contiguous float32 array of the same shape; ``values`` itself when it already is
        one and there is nothing to divide (callers must not write to the result then).
    """
    out = np.ascontiguousarray(values, dtype=np.float32)
    if not scale:
        return out
    divisor = np.float32(scale)
    if owned or not np.may_share_memory(out, values):
        out /= divisor  # our own copy (or the caller gave it up): no second array
        return out
    return out / divisor  # never divide the caller's memory


def request_inputs(values: np.ndarray, scale: float | None, stored_dtype: str | None = None) -> np.ndarray:
    """Inputs given to a store's models at predict time, as float32 model inputs.

    Integer inputs are raw values, as the store keeps them, and are scaled as a training
    slice is (uint8 pixels into a store of pixels with scale 255); float inputs are model
    inputs already (what a loader gives by default), whatever the store keeps. So the same
    images give the same predictions as uint8 and as the loader's floats.

    Integer inputs above 1 given to a store of float samples without a scale are taken as they
    are, which is right only if its models trained on such values: they warn (one
    ``UserWarning`` per call; what it costs is one ``max`` over the inputs).

    Args:
        values: The inputs, any numeric dtype.
        scale: The store's ``feature_scale``, or None.
        stored_dtype: The store's ``feature_dtype`` (its samples' dtype), or None when unknown.

    Returns:
        C-contiguous float32 model inputs.
    """
    if values.dtype.kind not in "iu":
        return model_inputs(values, None)
    if not scale and stored_dtype is not None and np.dtype(stored_dtype).kind == "f":
        _warn_unscaled_request(values)
    return model_inputs(values, scale)


def _warn_unscaled_request(values: np.ndarray) -> None:
    """Warn when integer inputs that look like raw pixels reach a store of float model inputs.

    Such a store's models trained on its floats as they are (the loaders' images are 0..1); the
    integers reach them unscaled (0..255), and the predictions are silently wrong. The inputs
    cannot say which was meant (the store may hold floats 0..255), so this warns instead of guessing.
    """
    if not values.size:
        return
    top = values.max()
    if top <= 1:
        return
    warnings.warn(
        f"these {values.dtype.name} inputs (max {int(top)}) go to a store of float samples without a scale, so "
        "the models see them as they are; if the models were trained on floats in [0, 1] (a loader's default "
        "images), these are likely raw pixels: pass x / 255 as float32 (or the loader's float images), or "
        "keep raw pixels in a new store ingested with scale=255, which scales integer inputs at predict",
        UserWarning,
        stacklevel=3,
    )


def as_model_inputs(data: LabeledArrays) -> LabeledArrays:
    """``data`` with its features as float32 model inputs and no scale (the same samples and ids).

    For code that feeds features to a model directly rather than through a store (the
    evaluation harness's monolithic models, say): raw values with a scale become what a
    store's model would see.
    """
    if data.scale is None and data.x.dtype == np.float32:
        return data
    return dataclasses.replace(data, x=model_inputs(data.x, data.scale), scale=None)
