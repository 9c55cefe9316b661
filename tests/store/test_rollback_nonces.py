"""A taken-back ingest, killed at each of its steps, never lets a (key, nonce) pair seal two plaintexts.

Each trial copies one store (300 published samples), runs an ingest in a child process whose
source fails after 200 staged samples, SIGKILLs the child at one step of taking them back, reopens
the store in a second child (which finishes the work) and re-ingests *other* bytes under the same
ids. Every child logs each seal it makes (key, nonce, digest of the plaintext, associated data) by
wrapping :func:`sisa.store.samples.seal_records` (every sample seal goes through it); the test then
checks, over all of them:

- no (key, nonce) pair sealed two different plaintexts;
- no key that sealed a taken-back sample is left anywhere in the key file (its bytes, free pages
  included), so the taken-back bytes lying in ``data.mdb``'s free pages are unrecoverable;
- the store holds the new bytes, and no recovery marker is left behind.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import lmdb
import numpy as np
import pytest

from sisa.ensemble import Ensemble
from tests.conftest import ROOT, blobs

pytestmark = pytest.mark.faults

X, Y = blobs(500, d=6)
BASE, TAKEN = range(300), range(300, 500)  # published first; then staged by the ingest that fails
OVERRIDES = ["shards=3", "slices=3", "data.num_classes=3", "model.hidden=[8]"]

CHILD = r"""
import hashlib, json, os, signal, sys
import numpy as np
import sisa.store.keyring as keyring
import sisa.store.samples as samples
from sisa import load_config
from sisa.ensemble import Ensemble
from sisa.store.database import Store

path, mode, phase, log_path, data_path = sys.argv[1:6]
data = np.load(data_path)
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
rolling = [False]
seals = [0]


def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


real_seal = samples.seal_records


def seal_records(key, items):
    sealed = real_seal(key, items)
    for (plaintext, associated), record in zip(items, sealed):
        line = [mode, key.hex(), record[:12].hex(), hashlib.sha256(bytes(plaintext)).hexdigest(), associated.hex()]
        os.write(log, (json.dumps(line) + "\n").encode())  # one write per line: a SIGKILL loses none written
    if rolling[0]:
        seals[0] += len(items)
        if mode == "fail" and phase == "reencrypt" and seals[0] >= 3:
            die()  # the new keys are committed; the re-encryption's transaction is not
    return sealed


samples.seal_records = seal_records

real_roll_back = Store.roll_back_ingest


def roll_back(self, batch=10_000):
    return real_roll_back(self, batch=50 if mode == "fail" else batch)  # several unstage transactions


Store.roll_back_ingest = roll_back
if mode == "fail":
    calls = [0]
    real_unstage = samples.SampleRecords.unstage

    def unstage(self, txn, limit):
        calls[0] += 1
        if phase == "unstage" and calls[0] == 2:
            die()  # the first unstage transaction (and its runs, recorded) committed; the rest staged
        return real_unstage(self, txn, limit)

    samples.SampleRecords.unstage = unstage
    if phase == "rotate":
        keyring.KeyRing.add_generations = die  # everything unstaged; no run re-keyed yet
    if phase == "drop":
        keyring.KeyRing.drop_keys = die  # re-encrypted under the new keys; old keys still there
    if phase == "compact":
        keyring.KeyRing.compact = die  # old keys dropped; their bytes still in the key file's free pages

if mode == "setup":
    with Ensemble.create(path, load_config(None, json.loads(phase)), address="local") as ens:
        ens.ingest(data["x"][:300], data["y"][:300], data["ids"][:300])
elif mode == "fail":
    def source():
        for start in range(300, 500, 50):
            if phase == "staging" and start == 400:
                die()  # two batches staged, the ingest still running
            yield data["x"][start : start + 50], data["y"][start : start + 50], data["ids"][start : start + 50]
        rolling[0] = True  # from here on, the seals are the take-back's re-encryption
        raise RuntimeError("the source failed")

    with Ensemble.open(path, address="local") as ens:
        try:
            ens.ingest(source())
        except RuntimeError:
            print("rolled back")
else:  # recover: the next writable open finishes what the kill cut short; then other bytes, same ids
    with Ensemble.open(path, address="local") as ens:
        ens.ingest(data["x"][300:] + 1.0, data["y"][300:], data["ids"][300:])
"""
PHASES = ("staging", "unstage", "rotate", "reencrypt", "drop", "compact", "none")


def _child(path: Path, mode: str, phase: str, log: Path, data: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode, phase, str(log), str(data)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A store holding the first 300 samples, the seal log of its ingest, and the data file."""
    work = tmp_path_factory.mktemp("rollback")
    data = work / "data.npz"
    np.savez(data, x=X, y=Y, ids=np.arange(len(X)))
    done = _child(work / "store", "setup", json.dumps(OVERRIDES), work / "seals.log", data)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "store", work / "seals.log", data


def _key_file_keys(path: Path) -> tuple[set[bytes], bytes]:
    """Every key the key environment holds now, and the key file's raw bytes (free pages included)."""
    env = lmdb.open(str(path / "keys"), readonly=True, lock=False, max_dbs=8)
    with env.begin() as txn:
        held = {bytes(v[:32]) for name in (b"slice", b"ckpt") for _, v in txn.cursor(db=env.open_db(name, txn=txn))}
    env.close()
    return held, (path / "keys" / "data.mdb").read_bytes()


@pytest.mark.parametrize("phase", PHASES)
def test_a_taken_back_ingest_killed_at_each_step_never_reuses_a_key_and_nonce(
    phase: str, base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    store, setup_log, data = base
    path, log = tmp_path / "store", tmp_path / "seals.log"
    shutil.copytree(store, path)
    shutil.copy(setup_log, log)

    failed = _child(path, "fail", phase, log, data)
    if phase == "none":
        assert failed.returncode == 0 and "rolled back" in failed.stdout, failed.stderr[-3000:]
    else:
        assert failed.returncode == -signal.SIGKILL, (failed.returncode, failed.stderr[-3000:])
    recovered = _child(path, "recover", phase, log, data)
    assert recovered.returncode == 0, recovered.stderr[-3000:]

    plaintexts: dict[tuple[str, str], set[str]] = defaultdict(set)
    taken_back_keys: set[bytes] = set()
    for line in log.read_text().splitlines():
        mode, key, nonce, digest, associated = json.loads(line)
        plaintexts[(key, nonce)].add(digest)
        sid = struct.unpack(">Q", bytes.fromhex(associated)[8:16])[0]
        if mode == "fail" and sid in TAKEN:
            taken_back_keys.add(bytes.fromhex(key))
    reused = {pair: seen for pair, seen in plaintexts.items() if len(seen) > 1}
    assert not reused, f"{len(reused)} (key, nonce) pair(s) sealed two plaintexts"
    assert taken_back_keys  # the failed ingest did seal samples that were then taken back

    held, key_file = _key_file_keys(path)
    assert not taken_back_keys & held, "a key that sealed taken-back samples is still in keys/"
    assert not [k for k in taken_back_keys if k in key_file], "a taken-back sample's key is in a free page of keys/"

    with Ensemble.open(path, readonly=True) as ens:
        meta = ens.store.meta()
        assert "rollback_runs" not in meta and not meta.get("keys_compaction_pending")
        with ens.store.read() as txn:
            x, _ = ens.store.load_samples(txn, np.asarray(TAKEN, dtype=np.int64), (6,))
        assert np.array_equal(x, X[300:] + 1.0)  # the new bytes, under the same ids
        assert ens.status()["samples"] == len(X)
