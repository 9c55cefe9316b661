"""Ray Serve's dependencies: the ``sisa[serve]`` extra, or the folder ``scripts/setup_env.sh`` puts beside the venv."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from sisa.errors import ConfigError

__all__ = ["SERVE_DIR", "require_serve"]

# scripts/setup_env.sh installs Ray Serve's extra packages here rather than into the venv: in the
# venv they would make every local Ray start of the test suite start the full dashboard agent.
SERVE_DIR = Path(sys.prefix) / "ray-serve"


def require_serve(workers: bool = False) -> None:
    """Make ``ray.serve`` importable here, or say how to install it.

    Args:
        workers: Also put the folder beside the venv on ``PYTHONPATH``, so that the workers of a
            local Ray instance this process starts afterwards find Serve too.

    Raises:
        ConfigError: If Ray Serve is not installed (``pip install 'sisa[serve]'``).
    """
    try:
        importlib.import_module("ray.serve")
        return
    except ImportError:
        pass
    if SERVE_DIR.is_dir():
        sys.path.insert(0, str(SERVE_DIR))
        if workers:  # a local Ray instance started after this inherits the variable
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SERVE_DIR), os.environ.get("PYTHONPATH")) if p)
        importlib.invalidate_caches()
        for name in [m for m in sys.modules if m == "ray.serve" or m.startswith("ray.serve.")]:
            del sys.modules[name]  # half-imported before its dependencies were found
        # Ray decided once, at its first import, that pydantic was missing; now it is importable,
        # and a Ray module imported later (ray.util.state, which ray.data reaches) would mix the
        # two answers and fail. Let Ray decide again.
        compat = sys.modules.get("ray._common.pydantic_compat")
        if compat is not None:
            importlib.reload(compat)
        try:
            importlib.import_module("ray.serve")
            return
        except ImportError:
            pass
    raise ConfigError(
        "serving needs Ray Serve: pip install 'sisa[serve]' (or bash scripts/setup_env.sh, which puts it in "
        f"{SERVE_DIR}); on a cluster every node needs it"
    )
