"""The deletion prior: each sample's probability of a deletion request, read from a file.

Distribution-aware sharding needs it (``partition.probabilities``). Two formats: a CSV
with the header ``id,probability``, or an ``.npz`` with the arrays ``ids`` and
``probability``. Every problem raises a :class:`~sisa.errors.DataError` naming its fix.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from sisa.errors import DataError

__all__ = ["check_probabilities", "load_prior", "read_prior", "write_prior"]

_FORMATS = "a .csv with the header id,probability, or an .npz with arrays 'ids' and 'probability'"


def _read_csv(p: Path) -> tuple[np.ndarray, np.ndarray]:
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if header != ["id", "probability"]:
            raise DataError(f"{p} starts with {','.join(header) or 'nothing'}; its header must be id,probability")
        ids: list[int] = []
        probs: list[float] = []
        for row in reader:
            if not row or not "".join(row).strip():
                continue  # blank lines (a trailing newline) carry no sample
            if len(row) != 2:
                raise DataError(f"{p} line {reader.line_num} has {len(row)} cells; write id,probability")
            try:
                ids.append(int(row[0].strip(), 10))
            except ValueError:
                raise DataError(f"{p} line {reader.line_num}: id {row[0]!r} is not an integer; fix that row") from None
            try:
                probs.append(float(row[1]))
            except ValueError:
                raise DataError(
                    f"{p} line {reader.line_num}: probability {row[1]!r} is not a number; fix that row"
                ) from None
    if not ids:
        raise DataError(f"{p} has a header but no rows; give one id,probability row per sample")
    if any(not 0 <= i < 2**63 for i in ids):
        bad = next(i for i in ids if not 0 <= i < 2**63)
        raise DataError(f"{p}: id {bad} is outside the range of sample ids [0, 2**63); fix that row")
    return np.asarray(ids, dtype=np.int64), np.asarray(probs, dtype=np.float64)


def _read_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(p):
        raise DataError(f"{p} is not an .npz archive; save it with np.savez(path, ids=..., probability=...)")
    try:
        with np.load(p, allow_pickle=False) as f:
            keys = list(f.files)
            if "ids" not in keys or "probability" not in keys:
                raise DataError(f"{p} holds arrays {keys}; it needs 'ids' and 'probability' of the same length")
            ids, probs = f["ids"], f["probability"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"cannot read {p} as .npz ({exc}); save it with np.savez(path, ids=..., probability=...)"
        ) from exc
    if ids.ndim != 1 or probs.ndim != 1 or len(ids) != len(probs):
        raise DataError(f"{p}: 'ids' {ids.shape} and 'probability' {probs.shape} must be 1-D arrays of the same length")
    if ids.dtype.kind not in "iu":
        raise DataError(f"{p}: 'ids' has dtype {ids.dtype}; store integer sample ids")
    if probs.dtype.kind not in "iuf":
        raise DataError(f"{p}: 'probability' has dtype {probs.dtype}; store numbers")
    if len(ids) == 0:
        raise DataError(f"{p} holds no rows; give one probability per sample")
    if (ids < 0).any():
        raise DataError(f"{p}: id {int(ids[ids < 0][0])} is negative; sample ids are non-negative")
    return ids.astype(np.int64), probs.astype(np.float64)


def check_probabilities(probabilities: np.ndarray, where: str) -> None:
    """Require every probability to be a finite number in ``[0, 1]``.

    Args:
        probabilities: float64 array.
        where: What holds them, for the message (a file name, or ``probabilities``).

    Raises:
        DataError: Naming the count and the first bad value's position.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    for bad, what in (
        (~np.isfinite(p), "NaN/inf"),
        (np.isfinite(p) & (p < 0), "negative"),
        (np.isfinite(p) & (p > 1), "> 1"),
    ):
        if bad.any():
            first = int(np.argmax(bad))
            raise DataError(
                f"{where} holds {int(bad.sum())} {what} probabilit{'y' if bad.sum() == 1 else 'ies'} "
                f"(first at row {first}: {p[first]!r}); a deletion probability must be a number in [0, 1]"
            )


def read_prior(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a deletion prior file.

    Args:
        path: A ``.csv`` (header ``id,probability``) or ``.npz`` (arrays ``ids``,
            ``probability``) file.

    Returns:
        ``(ids, probability)``: int64 and float64 arrays, in file order.

    Raises:
        DataError: On a missing file, unknown extension, malformed content, duplicate
            ids, NaN/inf, values outside ``[0, 1]``, or a total probability of 0.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"deletion prior {p} does not exist; set partition.probabilities to {_FORMATS}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        ids, probs = _read_csv(p)
    elif suffix == ".npz":
        ids, probs = _read_npz(p)
    else:
        raise DataError(f"deletion prior {p} has the unknown extension {p.suffix!r}; use {_FORMATS}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise DataError(
            f"{p} lists {len(dup)} id(s) more than once (first: {int(dup[0])}); give each id exactly one probability"
        )
    check_probabilities(probs, str(p))
    if math.fsum(probs.tolist()) <= 0:
        raise DataError(f"{p}: every probability is 0; a deletion prior needs some positive probability")
    return ids, probs


def load_prior(path: str | os.PathLike[str], ids: np.ndarray) -> np.ndarray:
    """The deletion probabilities of ``ids``, read from a prior file.

    The file may list more ids than asked for (a prior written once for data added later).

    Args:
        path: The prior file (see :func:`read_prior`).
        ids: Sample ids whose probabilities are wanted.

    Returns:
        float64 probabilities aligned with ``ids``.

    Raises:
        DataError: As :func:`read_prior`, or if some of ``ids`` are not in the file.
    """
    prior_ids, probs = read_prior(path)
    order = np.argsort(prior_ids, kind="stable")
    sorted_ids = prior_ids[order]
    want = np.asarray(ids, dtype=np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, want), 0, len(sorted_ids) - 1)
    missing = sorted_ids[pos] != want
    if missing.any():
        raise DataError(
            f"deletion prior {path} has no probability for {int(missing.sum())} of the {len(want)} sample id(s) "
            f"(first: {int(want[missing][0])}); add a row for every sample id"
        )
    return probs[order][pos]


def write_prior(path: str | os.PathLike[str], ids: np.ndarray, probabilities: np.ndarray) -> Path:
    """Write a deletion prior file, ``.csv`` or ``.npz`` by the path's extension.

    Args:
        path: Destination.
        ids: Sample ids.
        probabilities: Their deletion probabilities.

    Returns:
        The path written.

    Raises:
        DataError: On an unknown extension or probabilities outside ``[0, 1]``.
    """
    p = Path(path)
    ids = np.asarray(ids, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    check_probabilities(probs, "probabilities")
    if p.suffix.lower() == ".npz":
        np.savez(p, ids=ids, probability=probs)
    elif p.suffix.lower() == ".csv":
        with p.open("w", newline="") as fh:
            fh.write("id,probability\n")
            # repr round-trips a float exactly, so the file holds the very prior used.
            fh.writelines(f"{i},{v!r}\n" for i, v in zip(ids.tolist(), probs.tolist(), strict=True))
    else:
        raise DataError(f"cannot write a deletion prior to {p}: use a .csv or .npz path")
    return p
