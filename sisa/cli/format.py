"""Plain-text output helpers shared by the CLI commands: aligned tables and stderr progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["ADDRESS_HELP", "VERBOSE_HELP", "progress_bar", "stage_progress", "table"]

ADDRESS_HELP = (
    "Ray cluster address, or `local` to train on this machine without Ray. Default: RAY_ADDRESS; without "
    "either, the plan decides: a job that trains one shard (a typical deletion, a one-shard verify) runs "
    "without Ray, in the store's pinned determinism domain (same bytes as Ray), and a bigger one starts a "
    "local Ray instance; SISA_RUNNER=ray (or =local) forces one. --json reports it as `runner`"
)
VERBOSE_HELP = "log progress, and Ray's own lines, to stderr (default: Ray's go to $TMPDIR/sisa-UID/ray-COMMAND.log)"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Right-aligned columns under a header and a rule.

    Args:
        headers: Column titles.
        rows: Cells; anything with ``str``.

    Returns:
        The table as one string without a trailing newline.
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress_bar(total: int | None, desc: str, unit: str = "stage") -> Any:
    """A tqdm bar on stderr that switches itself off when stderr is not a terminal.

    Args:
        total: Expected number of updates (None: unknown).
        desc: Label.
        unit: What one update counts.

    Returns:
        The tqdm instance.
    """
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)


@contextmanager
def stage_progress(quiet: bool, desc: str, total: int | None = None) -> Iterator[Callable[[Any], None] | None]:
    """A progress bar over committed stages for the block, closed however the block ends.

    Args:
        quiet: No bar (``--json``): the block gets None as its callback.
        desc: Label.
        total: Expected number of stages (None: unknown).

    Yields:
        The callback that advances the bar by one stage (what ``fit``/``delete`` take as
        ``progress``), or None.
    """
    if quiet:
        yield None
        return
    with progress_bar(total, desc) as bar:
        yield lambda _result: bar.update(1)
