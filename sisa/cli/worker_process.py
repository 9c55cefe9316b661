"""``python -m sisa.cli.worker_process SOCKET LOCK``: the warm worker's own process (see :mod:`sisa.cli.worker`).

Its own module so that the worker, which the command line's launcher imports, never imports
the command line back: this one claims the worker's lock, then loads the commands and serves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sisa.cli import worker

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Claim the lock ``argv[1]``, then serve commands on the socket ``argv[0]`` until idle."""
    if worker.claim(Path(argv[1])) is None:
        return 0  # another worker of this key is up (or starting)
    from sisa.cli.main import run  # the heavy imports, once the lock is ours: what the worker keeps warm

    return worker.serve(Path(argv[0]), worker.idle_seconds(), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
