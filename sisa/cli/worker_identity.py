"""Who a warm ``sisa`` worker is: the key a caller must share with it, its files, and the environment it keeps.

A worker may run a caller's command only if it is the process the caller would have been:
the same Python, the same sisa code, the same installed distributions (an upgraded torch,
numpy or Ray would train in another determinism domain) and the same environment where a
process reads it once at start (kernel pins, thread pools, devices, the module path, the
dynamic loader). All of that goes into :func:`worker_key`, which names the worker's socket.
"""

from __future__ import annotations

import hashlib
import os
import site
import sys
from collections.abc import Mapping
from pathlib import Path

from sisa.user_folder import private_folder

__all__ = ["REEXEC_ENV", "command_env", "reads_at_start", "start_env", "worker_key", "worker_paths"]

# Set by the launcher in the environment of a `sisa` process it restarted with the store's pins
# (:func:`sisa.cli.launch.reexec_pinned`): never re-execute twice. Never part of a worker's environment.
REEXEC_ENV = "SISA_PINNED_EXEC"

# Environment variables a process reads once, when it starts or loads a library: a worker started
# under other values is not the process its caller would be, and a command run in the worker gets
# the worker's values for these (never the caller's, which could not take effect there).
_START_NAMES = frozenset({"PYTHONPATH", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "GLIBC_TUNABLES"})
_START_PREFIXES = (
    "ATEN_",  # torch's CPU kernel level
    "MKL_",
    "ONEDNN_",
    "DNNL_",
    "OMP_",
    "KMP_",
    "GOMP_",
    "OPENBLAS_",
    "CUDA_",
    "TORCH_",
    "LD_",  # the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...
    "MALLOC_",
    "PYTHON",  # the interpreter's own start-up settings (PYTHONMALLOC, PYTHONOPTIMIZE, ...)
)


def reads_at_start(name: str) -> bool:
    """Whether ``name`` is an environment variable a process reads once at start (see the list above)."""
    return name in _START_NAMES or name.startswith(_START_PREFIXES)


def start_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that a process reads at start."""
    return {k: v for k, v in env.items() if reads_at_start(k)}


def command_env(caller: Mapping[str, str], worker: Mapping[str, str]) -> dict[str, str]:
    """The environment a command runs in inside the worker.

    The caller's variables (its ``RAY_ADDRESS``, ``SISA_*`` settings, ``HOME``, ...), except
    those read at start, which are the worker's own: a variable the worker started without is
    removed, so it cannot reach the command's child processes (Ray workers) as if it applied.
    """
    return {**{k: v for k, v in caller.items() if not reads_at_start(k)}, **start_env(worker)}


def _distributions() -> list[str]:
    """The installed distributions of this interpreter's site directories, with their install times.

    Read from the ``*.dist-info`` / ``*.egg-info`` folder names (``name-version``, PEP 376) and
    their modification times, so a reinstall of the same version (another build) counts too.
    Listing the folders is what every command can afford; reading every distribution's metadata
    through ``importlib.metadata`` is not (docs/benchmarks.md, "Start-up costs the command line is
    shaped around").
    """
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    found: list[str] = []
    for folder in sorted(set(dirs)):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith((".dist-info", ".egg-info", ".egg-link", ".pth")):
                try:
                    found.append(f"{folder}/{entry.name}:{entry.stat().st_mtime_ns}")
                except OSError:
                    continue
    return sorted(found)


def worker_key(pins: Mapping[str, str], env: Mapping[str, str] | None = None, nice: int = 0) -> str:
    """What a worker must share with its caller, as a short hex key.

    Args:
        pins: The store's kernel pins, applied over ``env``.
        env: The environment (default: this process's).
        nice: The niceness the worker runs at, the command's (:func:`sisa.cli.launch.command_nice`): a
            process cannot lower its niceness, so a command that trains at 0 never goes to a niced worker.

    Returns:
        16 hex digits over the interpreter, the sisa code (every file's size and mtime: an
        upgrade or an edit starts a new worker), the installed distributions, and the
        variables read at start.
    """
    # The interpreter and its environment, however it was named (`python`, `python3`, a console script).
    h = hashlib.sha256(f"{os.path.realpath(sys.executable)}\n{sys.prefix}\n{sys.version}\n".encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for dist in _distributions():
        h.update(f"{dist}\n".encode())
    merged = {**(os.environ if env is None else env), **pins}
    for name, value in sorted(start_env(merged).items()):
        h.update(f"{name}={value}\n".encode())
    h.update(f"nice={nice}\n".encode())
    return h.hexdigest()[:16]


def worker_paths(key: str) -> tuple[Path, Path, Path] | None:
    """Socket, lock and log of the worker ``key``, in ``$TMPDIR/sisa-<uid>/``.

    None when that folder is not this user's own, mode 0700: a worker's socket must not be
    reachable by anyone else.
    """
    folder = private_folder()
    if folder is None:
        return None
    return folder / f"worker-{key}.sock", folder / f"worker-{key}.lock", folder / f"worker-{key}.log"
