"""Shared fixtures: one Ray instance per test session, small synthetic datasets, store digests."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from sisa.config.loader import load_config
from sisa.config.settings import SisaConfig
from sisa.ensemble import Ensemble

ROOT = Path(__file__).resolve().parents[1]
# No warm worker (sisa.cli.worker) behind the `sisa` commands the tests run: each command runs in
# its own process, as the test means, and none outlives the session. tests/cli/test_cli_worker.py
# turns it on for its own commands.
os.environ["SISA_WORKER"] = "0"
# The operator's signing key of the whole session (created on first use), never the user's own key in
# ~/.config/sisa: children inherit it, so every process of the session signs with the same key.
os.environ["SISA_SIGNING_KEY_FILE"] = str(Path(tempfile.mkdtemp(prefix="sisa-test-key-")) / "signing.key")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Start Ray once for the whole session (about 4 s), shared by every test that trains."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def blobs(n: int = 600, d: int = 12, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable synthetic classification problem: Gaussian blobs around class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(classes, d))
    y = rng.integers(0, classes, size=n)
    x = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y.astype(np.int64)


def nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of the nearest-class-mean classifier fitted on ``(x, y)``: a reference outside our stack.

    A trained model's accuracy differs in its last bits between CPU kernel levels, so tests
    compare it with a reference computed in the same run from the same samples, not with a
    fixed number. This one is a few lines of NumPy, so a bug in our pipeline (labels, input
    scaling, a head that never trains) cannot move it along with the model.
    """
    flat, flat_test = x.reshape(len(x), -1).astype(np.float64), x_test.reshape(len(x_test), -1).astype(np.float64)
    classes = np.unique(y)
    centres = np.stack([flat[y == c].mean(axis=0) for c in classes])
    distances = ((flat_test[:, None, :] - centres[None]) ** 2).sum(axis=-1)
    return float((classes[distances.argmin(axis=1)] == y_test).mean())


def small_config(*overrides: str) -> SisaConfig:
    """A config that trains in well under a second per shard."""
    base = [
        "shards=3",
        "slices=3",
        "data.num_classes=3",
        "model.hidden=[16]",
        "train.epochs=4",
        "train.batch_size=32",
        "train.lr=0.01",
    ]
    return load_config(None, [*base, *overrides])


def trained_blobs_store(path: Path, *overrides: str, address: str | None = "local") -> Path:
    """A store at ``path`` trained on 600 blobs under :func:`small_config` with ``overrides`` (S=3, R=3)."""
    x, y = blobs(600, d=10)
    with Ensemble.create(path, small_config(*overrides), address=address) as ens:
        ens.ingest(x, y)
        ens.fit()
    return path


def npz_config(folder: Path, train: str = "", *, held_out: bool = False) -> Path:
    """A 300-sample blobs dataset in ``folder``/train.npz and a config training on it (S=2, R=2, MLP [8]).

    Args:
        folder: Where to write ``train.npz`` and ``config.yaml``.
        train: Extra YAML flow entries for the ``train`` section, e.g. ``"epochs: 2"``.
        held_out: Evaluate on 300 other samples of the same blobs (``test.npz``) instead of
            the training file (for tests that judge accuracy).
    """
    x, y = blobs(600 if held_out else 300, d=6)
    np.savez(folder / "train.npz", x=x[:300], y=y[:300])
    test = folder / ("test.npz" if held_out else "train.npz")
    if held_out:
        np.savez(test, x=x[300:], y=y[300:])
    config = folder / "config.yaml"
    data = f"{{dataset: npz, train: {folder / 'train.npz'}, test: {test}, num_classes: 3}}"
    config.write_text(f"shards: 2\nslices: 2\ndata: {data}\nmodel: {{hidden: [8]}}\ntrain: {{{train}}}\n")
    return config


def write_config(cfg: SisaConfig, path: Path) -> Path:
    """Write ``cfg`` as the YAML file ``path`` (for CLI tests that take ``--config``)."""
    import yaml

    from sisa.config.fields import config_to_dict

    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def store_digest(path: Path) -> str:
    """SHA-256 over every file of a store directory except lock files (readers touch those)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name not in ("lock.mdb", "writer.lock"):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def live_state(ens: Ensemble) -> dict[int, tuple[str, str]]:
    """Shard -> (live checkpoint sha256, weights digest): what "the same models" means in the tests."""
    with ens.store.read() as txn:
        return {s: (r["sha256"], r["weights"]) for s, r in ens.store.live(txn).items()}


def default_sigint() -> None:
    """``preexec_fn`` of a child the test will Ctrl-C: SIGINT back to its default action.

    A shell starts background jobs with SIGINT ignored, and a Python started with SIGINT
    ignored never raises KeyboardInterrupt: run under ``cmd &``, such a test would fail.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (the erasure checks grep with it)."""
    return [str(f) for f in root.rglob("*") if f.is_file() and needle in f.read_bytes()]


def sample_evidence(ens: Ensemble, sample_id: int) -> tuple[bytes, list[bytes]]:
    """A stored sample's ciphertext as on disk, and every key of its run (what could decrypt it)."""
    with ens.store.read() as txn:
        sealed = ens.store.sealed_sample(txn, sample_id)
        place = ens.store.place(txn, sample_id)
    assert place is not None
    with ens.store.keys.read() as ktxn:
        keys = [k.key for k in ens.store.keys.run_keys(ktxn, *place)]
    assert sealed is not None and keys
    return sealed, keys


def plaintexts(x: np.ndarray) -> list[bytes]:
    """The byte forms a sample's features could take on disk: float32, float32/255, uint8 when they fit."""
    forms = [x.astype("<f4").tobytes(), (x.astype("<f4") / 255).tobytes()]
    if np.array_equal(x, np.clip(np.round(x), 0, 255)):
        forms.append(x.astype(np.uint8).tobytes())
    return [f for f in forms if len(f) >= 8]


@pytest.fixture
def env_python() -> dict[str, str]:
    """Environment for child Python processes that import sisa."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def writer_in_child(path: Path, seconds: float, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A child process holding ``path``'s writer lock for ``seconds``, then releasing it and exiting.

    Yields once the child holds the lock. It prints ``held`` and, after closing the store,
    ``released``; the caller reads the rest of its output after ``wait()``.
    """
    code = (
        "import time\n"
        "from sisa.ensemble import Ensemble\n"
        f"ens = Ensemble.open({str(path)!r})\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
        "ens.close()\n"
        "print('released', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
