"""The ids of a deletion request: validated, parsed from text, read from an ids file.

One rule for ids from every source (:func:`sisa.data.arrays.check_id_values`): a deletion
names exactly what was stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sisa.data.arrays import check_id_values, parse_id_text, to_numpy
from sisa.errors import DataError

__all__ = ["normalize_ids", "parse_id", "parse_id_args", "parse_ids_text", "read_ids_file"]


def normalize_ids(ids: Any) -> list[int]:
    """Validate a deletion request's ids.

    Args:
        ids: An int, or a sequence / array of ints.

    Returns:
        The distinct ids, in first-seen order.

    Raises:
        DataError: On an empty request, values that are not integers (bools, strings,
            fractional floats, floats too large for their type to hold exactly: the rule of
            :func:`sisa.data.arrays.check_id_values`) or ids outside ``[0, 2**63 - 2]``.
    """
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise DataError(f"ids must be a list of integers, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray) or hasattr(ids, "__array__"):
        ids = to_numpy(ids).reshape(-1)  # arrays and tensors keep their dtype: the rule for floats needs it
    else:
        ids = list(ids)
    if len(ids) == 0:
        raise DataError("the deletion request is empty: pass at least one id")
    # The same rule as at ingest (sisa.data.arrays.check_id_values): a deletion names exactly what was stored.
    return list(dict.fromkeys(check_id_values(ids).tolist()))


def parse_id(text: str) -> int:
    """One sample id written as text: the rule of :func:`sisa.data.arrays.parse_id_text`, as for CSV cells.

    Raises:
        ValueError: On anything but an ASCII decimal whole number (``17``, ``17.0``, ``1.7e1``),
            including ``17.5``, ``1_000``, ``+5``, ``0x10`` and non-ASCII digits.
    """
    return parse_id_text(text)


def read_ids_file(path: str | Path) -> list[int]:
    """Read an ids file: one integer per line; blank lines and ``#`` comments are skipped.

    Raises:
        DataError: If the file is missing or a line is not an integer (named by number).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read ids file {p}: {exc}") from exc
    return parse_ids_text(text, str(p))


def parse_ids_text(text: str, source: str) -> list[int]:
    """The ids of an ids file's text (one integer per line; blank lines and ``#`` comments skipped).

    Args:
        text: The file's contents.
        source: What the text came from, for errors (a path, "standard input").

    Raises:
        DataError: If a line is not an integer (named by number), or no id is given.
    """
    out: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            out.append(parse_id(item))
        except ValueError:
            raise DataError(
                f"{source} line {n}: {item[:40]!r} is not an integer id; put one integer id per line"
            ) from None
    return normalize_ids(out)


def parse_id_args(texts: Iterable[str], option: str = "--ids") -> list[int]:
    """The ids given on a command line (``--ids 17 4242``), each parsed by :func:`parse_id`.

    Args:
        texts: The words after the option.
        option: The option's name, for errors.

    Raises:
        DataError: On a word that is not an integer id (a comma-separated list is named as
            such, with the space-separated form to use), or no id at all.
    """
    out: list[int] = []
    for text in texts:
        try:
            out.append(parse_id(text))
        except ValueError:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            hint = ""
            if len(parts) > 1:
                # `--ids 1,2,3`: a habit from other tools; say what works instead.
                hint = f"; separate ids with spaces, not commas: {option} {' '.join(parts)}"
            raise DataError(f"{option}: {text[:40]!r} is not an integer id{hint}") from None
    return normalize_ids(out)
