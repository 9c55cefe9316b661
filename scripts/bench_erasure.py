"""What erasure costs, for the old store (cipher and layout) and this checkout's, side by side in one run.

For each N and each layout, a fresh child process builds a store of N synthetic samples
(784 ``uint8`` features, a pure function of the id; labels ``id % 10``; uniform partition,
S=8 shards, R=4 slices, MLP 784-128-10, ``train.epochs=1``), ingested as a stream of
8192-sample batches, fits it, and then deletes one id, and then 100 ids in one call. It
records:

* ingest seconds and the child's peak anonymous memory (``RssAnon``, sampled every 20 ms);
* the store's bytes on disk (``st_blocks * 512``) and apparent bytes (``st_size``), in all
  and per file, after the fit and after the deletions;
* per deletion: the call's wall seconds, the certificate's retrain seconds
  (``cert["batch"]["retrain_seconds"]``), the rest (``non_retrain_s`` = wall - retrain:
  journal, erasure, compaction, certificate), the bytes the process wrote during the call
  (``write_bytes`` of ``/proc/self/io``: bytes it dirtied in the page cache, i.e. that go to
  storage; ``wchar``, the bytes of its write calls, beside it), the bytes of the checkpoints
  the retrain committed (the sizes of the new stage checkpoints, read back from the store),
  and ``erasure_bytes`` = written - checkpoint bytes, the estimate of what the erasure
  itself wrote.

Besides the deletions, each child measures, through the store's own code:

* ``rekey``: re-encryption records/s: :func:`sisa.store.erasure.rotate` (``fresh=True``) of
  the first runs of the store, up to :data:`REKEY_SAMPLES` samples (new keys, every sample
  opened and sealed again in bounded LMDB transactions, old keys dropped);
* ``checkpoints``: checkpoint open MB/s (``store.checkpoint`` of every stage: read, decrypt,
  check) and seal MB/s (``store.seal_checkpoint`` of the same bytes: a fresh key committed to
  ``keys/``, then the cipher), best of 3;
* ``deferred``: the time from ``delete(defer=True)`` to the deleted id's old run key being gone
  from ``keys/``: the call alone where the request is erased when accepted, the call plus the
  ``apply`` (retrain included) where erasure waits for the retrain.

And the parent times the two ciphers alone, without a store (``cipher``): re-encrypting a
788-byte Fashion-MNIST record (open + seal) and sealing / opening a 5 MiB blob, with format 3's
SHAKE-256 keystream and BLAKE2b check value (a copy of its code is kept in this script) against
this checkout's :mod:`sisa.store.cipher` (AES-256-GCM).

The layouts:

* ``old``: git revision 8d0ec4a (store format 3: SHAKE-256 keystream, unkeyed BLAKE2b check
  values, erasure after the retrain), run from a git worktree the script creates
  (``--old-worktree``, default ``/tmp/sisa-erasure-old``) with that worktree first on
  ``sys.path``. ``--old-rev 710eb75`` compares with the layout before encryption (every apply
  compacts the whole ``data.mdb``) as docs/benchmarks.md's older section did;
* ``new``: this checkout's working tree (HEAD plus any uncommitted changes; recorded).

Each child checks that ``sisa`` was imported from its layout's tree and records
``sisa.__file__`` and the tree's git revision. The retrains run on the local runner
(``address="local"``: no Ray, everything in the child, so ``/proc/self/io`` covers the
training and the store writes); ``--runner auto`` lets the planner start Ray. Stores go in
a temporary folder (``--workdir``) and are removed after each child unless ``--keep``.
Free disk space is checked before each child.

Usage:
    python scripts/bench_erasure.py                        # N = 60k, 600k, 3M (long: 3M takes minutes)
    python scripts/bench_erasure.py --quick                # N = 6k, 30k
    python scripts/bench_erasure.py --sizes 60000          # one size
    python scripts/bench_erasure.py --quick --layouts new shards=2 slices=2   # only this checkout

Writes ``docs/bench/erasure.json`` and ``docs/bench/erasure.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "8d0ec4a"  # store format 3: the SHAKE-256 keystream that AES-256-GCM replaced (issue 26)
LAYOUTS = ("old", "new")
FEATURES = 784
BATCH = 8192
SIZES = [60_000, 600_000, 3_000_000]
QUICK_SIZES = [6_000, 30_000]
BATCH_DELETE = 100
DEFAULT_WORKTREE = Path("/tmp/sisa-erasure-old")
REKEY_SAMPLES = 60_000  # samples re-encrypted by the rekey measurement (all of a smaller store)
CIPHER_RECORD = 788  # bytes of a Fashion-MNIST sample's plaintext: int32 label + 784 uint8 pixels
CIPHER_BLOB = 5 << 20  # bytes of the blob the cipher-only checkpoint measurement seals and opens
# The store's config before the command line's overrides: the default MLP (784-128-10), S=8, R=4.
BASE_OVERRIDES = [
    "shards=8",
    "slices=4",
    "model.name=mlp",
    "model.hidden=[128]",
    "train.epochs=1",
    "partition.strategy=uniform",
]
# Disk a child needs before anything was measured: bytes per sample of the old layout (float32
# features and LMDB overhead, about 4.3 kB), twice (a compaction writes a whole copy), plus slack.
GUESS_BYTES_PER_SAMPLE = 4400
COPIES = 2.2
SLACK_BYTES = 512 << 20
ERASURE_BYTES_METHOD = (
    "write_bytes delta of /proc/self/io around the call (bytes the process dirtied in the page cache: "
    "store, journal, compaction copy, checkpoints) minus the summed sizes of the stage checkpoints the "
    "retrain committed (read back from the store); LMDB page and B-tree overhead of those checkpoints "
    "stays in the estimate"
)


# --------------------------------------------------------------------------- child side
def make_batch(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``start..stop-1``: uint8 features a pure function of the id, labels ``id % 10``."""
    ids = np.arange(start, stop, dtype=np.int64)
    x = ((ids[:, None] * 2654435761 + np.arange(FEATURES)) % 256).astype(np.uint8)
    return x, (ids % 10).astype(np.int64), ids


def batches(n: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The ``n`` samples as a stream of :data:`BATCH`-sample batches (never all at once)."""
    for start in range(0, n, BATCH):
        yield make_batch(start, min(n, start + BATCH))


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``RssAnon``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def proc_io() -> dict[str, int]:
    """This process's I/O counters (``/proc/self/io``: all its threads)."""
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


class PeakAnon:
    """Samples ``RssAnon`` every 20 ms in a thread and keeps the peak of each named phase."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _note(self) -> None:
        kib = proc_status_kib("RssAnon")
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), kib)

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self._note()

    def start(self, phase: str) -> None:
        """Start sampling (the first phase is ``phase``)."""
        self.phase = phase
        self._note()
        self._thread.start()

    def enter(self, phase: str) -> None:
        """Close the current phase (one last sample) and open ``phase``."""
        self._note()
        self.phase = phase
        self._note()

    def stop(self) -> dict[str, float]:
        """Stop sampling; the peak of each phase in MiB."""
        self._note()
        self._done.set()
        self._thread.join()
        return {phase: kib / 1024 for phase, kib in self.peaks.items()}


def disk_usage(path: Path) -> dict[str, Any]:
    """Bytes of every file under ``path``: on disk (``st_blocks * 512``) and apparent (``st_size``).

    Returns:
        ``bytes_on_disk``, ``bytes_apparent`` (totals) and ``files``: relative path ->
        ``[on_disk, apparent]``.
    """
    files: dict[str, list[int]] = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = Path(dirpath) / name
            st = full.lstat()
            files[str(full.relative_to(path))] = [st.st_blocks * 512, st.st_size]
    return {
        "bytes_on_disk": sum(v[0] for v in files.values()),
        "bytes_apparent": sum(v[1] for v in files.values()),
        "files": dict(sorted(files.items())),
    }


def pick_ids(ens: Any, n: int, slices: int, count: int) -> tuple[list[int], str]:
    """Ids to delete: stored in their shard's last slice where possible, so the retrains are the shortest.

    Ids from the first 20000 are looked up with the public ``Ensemble.locate``; those in the
    last slice are taken round-robin over the shards. Without ``locate`` (or not enough
    of them), ids spread evenly over ``0..n-1`` fill up.

    Returns:
        ``count`` distinct ids, and how they were chosen.
    """
    candidates = list(range(min(n, 20_000)))
    try:
        where = ens.locate(candidates)
    except Exception:  # noqa: BLE001 - a layout without locate: fall back to spread ids
        where = {}
    by_shard: dict[int, list[int]] = {}
    for sid, (shard, slice_) in sorted(where.items()):
        if slice_ == slices - 1:
            by_shard.setdefault(int(shard), []).append(int(sid))
    chosen: list[int] = []
    while len(chosen) < count and any(by_shard.values()):
        for shard in sorted(by_shard):
            if by_shard[shard] and len(chosen) < count:
                chosen.append(by_shard[shard].pop(0))
    how = f"{len(chosen)} in the last slice (Ensemble.locate)"
    if len(chosen) < count:
        taken = set(chosen)
        spread = [i for i in np.linspace(0, n - 1, 4 * count).astype(int).tolist() if i not in taken]
        filled = list(dict.fromkeys(spread))[: count - len(chosen)]
        chosen += filled
        how += f", {len(filled)} spread over 0..N-1"
    return chosen, how


def checkpoint_bytes(ens: Any, cert: dict[str, Any]) -> int | None:
    """Summed size of the stage checkpoints a deletion's retrain committed (``None`` if unreadable)."""
    try:
        total = 0
        with ens.store.read() as txn:
            for key, info in cert["shards"].items():
                for rec in ens.store.stage_records(txn, int(key)):
                    if rec["stage"] > info["restart_stage"]:
                        total += len(ens.store.checkpoint(txn, rec))
        return total
    except Exception:  # noqa: BLE001 - an estimate; the JSON says when it is missing
        return None


def stored_checkpoint_bytes(ens: Any, shards: int) -> int | None:
    """Summed size of every stage checkpoint the store holds (``None`` if unreadable)."""
    try:
        with ens.store.read() as txn:
            return sum(
                len(ens.store.checkpoint(txn, rec)) for s in range(shards) for rec in ens.store.stage_records(txn, s)
            )
    except Exception:  # noqa: BLE001 - an estimate; the JSON says when it is missing
        return None


def best_of(runs: int, fn: Any) -> float:
    """The fastest of ``runs`` timed calls of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_checkpoints(ens: Any, shards: int) -> dict[str, Any] | None:
    """Open MB/s (``store.checkpoint`` of every stage) and seal MB/s (``store.seal_checkpoint`` of the same bytes)."""
    store = ens.store
    with store.read() as txn:
        records = [rec for s in range(shards) for rec in store.stage_records(txn, s)]
    if not records:
        return None

    def open_all() -> list[bytes]:
        with store.read() as txn:
            return [store.checkpoint(txn, rec) for rec in records]

    blobs = open_all()
    total = sum(len(b) for b in blobs)
    named = len(inspect.signature(store.seal_checkpoint).parameters) > 1  # format 4 binds the seal to a name

    def seal_all() -> None:
        for rec, blob in zip(records, blobs, strict=True):
            store.seal_checkpoint(blob, rec["key"]) if named else store.seal_checkpoint(blob)

    open_s, seal_s = best_of(3, open_all), best_of(3, seal_all)
    return {
        "checkpoints": len(records),
        "bytes": total,
        "open_s": open_s,
        "seal_s": seal_s,
        "open_mb_s": total / open_s / 1e6,
        "seal_mb_s": total / seal_s / 1e6,
        "seal_note": "each seal commits a fresh key to keys/ (one LMDB write transaction) before the cipher runs",
    }


def measure_rekey(ens: Any, limit: int) -> dict[str, Any] | None:
    """Re-encryption records/s: rotate the store's first runs (up to ``limit`` samples) with fresh keys."""
    try:
        from sisa.store.erasure import rotate
    except ImportError:  # a layout before keys (710eb75)
        return None
    store = ens.store
    with store.keys.read() as ktxn:
        runs = sorted(store.keys.all_runs(ktxn))
    chosen, count = [], 0
    with store.read() as txn:
        for run in runs:
            size = len(store.run_ids(txn, *run))
            if chosen and count + size > limit:
                break
            chosen.append(run)
            count += size
    t0 = time.perf_counter()
    report = rotate(store, chosen, fresh=True)
    seconds = time.perf_counter() - t0
    return {
        "runs": len(chosen),
        "reencrypted": report.reencrypted,
        "seconds": seconds,
        "records_per_s": report.reencrypted / seconds if seconds > 0 else None,
    }


def run_key_of(ens: Any, sample_id: int) -> tuple[tuple[int, int, int], bytes] | None:
    """Where ``sample_id`` lives and its run's newest key now (``None`` for a layout without keys)."""
    store = ens.store
    if not hasattr(store, "keys"):
        return None
    with store.read() as txn:
        place = store.place(txn, sample_id)
    with store.keys.read() as ktxn:
        keys = store.keys.run_keys(ktxn, *place)
    return tuple(place), keys[0].key


def key_gone(ens: Any, place: tuple[int, int, int], key: bytes) -> bool:
    """Whether ``key`` is no longer a key of run ``place`` (and not in the key file's bytes)."""
    with ens.store.keys.read() as ktxn:
        held = [k.key for k in ens.store.keys.run_keys(ktxn, *place)]
    return key not in held and key not in (Path(ens.store.path) / "keys" / "data.mdb").read_bytes()


def measure_deferred(ens: Any, sample_id: int) -> dict[str, Any] | None:
    """Seconds from ``delete(defer=True)`` to the id's old run key being destroyed (applied after either way)."""
    before = run_key_of(ens, sample_id)
    if before is None:
        return None
    place, key = before
    t0 = time.perf_counter()
    ens.delete([sample_id], defer=True)
    defer_s = time.perf_counter() - t0
    erased_at_acceptance = key_gone(ens, place, key)
    t0 = time.perf_counter()
    ens.apply()
    apply_s = time.perf_counter() - t0
    if not key_gone(ens, place, key):
        raise RuntimeError(f"the key of run {place} survived the apply of a deletion of id {sample_id}")
    return {
        "id": sample_id,
        "defer_s": defer_s,
        "apply_s": apply_s,
        "erased_at_acceptance": erased_at_acceptance,
        "to_keys_destroyed_s": defer_s if erased_at_acceptance else defer_s + apply_s,
    }


def timed_delete(ens: Any, ids: list[int], peaks: PeakAnon, phase: str) -> dict[str, Any]:
    """Delete ``ids`` in one call and measure it: seconds, retrain seconds, bytes written."""
    peaks.enter(phase)
    io0 = proc_io()
    t0 = time.perf_counter()
    cert = ens.delete(ids)
    wall = time.perf_counter() - t0
    io1 = proc_io()
    retrain = float(cert["batch"]["retrain_seconds"])
    written = io1["write_bytes"] - io0["write_bytes"]
    ckpt = checkpoint_bytes(ens, cert)
    return {
        "ids": len(ids),
        "wall_s": wall,
        "retrain_s": retrain,
        "non_retrain_s": wall - retrain,
        "apply_s": cert.get("apply_seconds"),
        "runner": cert.get("runner"),
        "retrained_shards": cert.get("retrained_shards"),
        "retrain_sample_epochs": sum(int(v.get("sample_epochs", 0)) for v in cert["shards"].values()),
        "from_slices": {k: v.get("from_slice") for k, v in cert["shards"].items()},
        "file_bytes_before_after": cert["batch"].get("file_bytes"),  # old layout: data.mdb compacted
        "erasure": cert["batch"].get("erasure"),  # new layout: slices re-keyed, samples re-encrypted, seconds
        "written_bytes": written,
        "cancelled_write_bytes": io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
        "wchar": io1["wchar"] - io0["wchar"],
        "checkpoint_bytes": ckpt,
        "erasure_bytes": None if ckpt is None else written - ckpt,
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in its own process: build, ingest, fit, delete 1 id, delete a batch.

    Args:
        spec: ``layout``, ``root`` (the tree to import ``sisa`` from), ``n``, ``store``,
            ``overrides``, ``runner`` (``local`` or ``auto``), ``batch_delete``.

    Returns:
        What it measured (one row of the JSON's ``runs``).

    Raises:
        RuntimeError: If ``sisa`` was not imported from ``root``.
    """
    root = Path(spec["root"]).resolve()
    sys.path.insert(0, str(root))  # before the venv's editable install of the main checkout
    import sisa

    sisa_file = Path(sisa.__file__).resolve()
    if not sisa_file.is_relative_to(root):
        raise RuntimeError(f"layout {spec['layout']}: sisa imported from {sisa_file}, not from {root}")
    n, store = int(spec["n"]), Path(spec["store"])
    cfg = sisa.load_config(None, [*BASE_OVERRIDES, *spec["overrides"]])
    address = "local" if spec["runner"] == "local" else None
    peaks = PeakAnon()
    baseline = proc_status_kib("RssAnon") / 1024
    peaks.start("ingest")
    row: dict[str, Any] = {"layout": spec["layout"], "n": n, "sisa_file": str(sisa_file)}
    with sisa.Ensemble.create(store, cfg, address=address) as ens:
        io0, t0, cpu0 = proc_io(), time.perf_counter(), time.process_time()
        ingested = ens.ingest(batches(n), batch_size=BATCH)
        row["ingest_s"] = time.perf_counter() - t0
        row["ingest_cpu_s"] = time.process_time() - cpu0
        if spec.get("ingest_only"):
            row["ingest_samples_per_s"] = n / row["ingest_s"]
            return row
        row["ingest_written_bytes"] = proc_io()["write_bytes"] - io0["write_bytes"]
        peaks.enter("fit")
        t0 = time.perf_counter()
        report = ens.fit()
        row["fit_s"] = time.perf_counter() - t0
        row["fit_runner"] = getattr(report, "runner", None)
        row["ingested"] = int(ingested)
        row["disk_after_fit"] = disk_usage(store)
        row["checkpoints_stored_bytes"] = stored_checkpoint_bytes(ens, cfg.shards)
        peaks.enter("checkpoints")
        row["checkpoints"] = measure_checkpoints(ens, cfg.shards)
        peaks.enter("rekey")
        row["rekey"] = measure_rekey(ens, REKEY_SAMPLES)
        single, single_how = pick_ids(ens, n, cfg.slices, 2 + int(spec["batch_delete"]))
        row["ids_chosen"] = single_how
        row["single"] = timed_delete(ens, single[:1], peaks, "delete_single")
        row["single"]["id"] = single[0]
        row["batch"] = timed_delete(ens, single[1:-1], peaks, "delete_batch")
        peaks.enter("deferred")
        row["deferred"] = measure_deferred(ens, single[-1])
        row["disk_after_deletes"] = disk_usage(store)
        row["samples_after"] = ens.status().get("samples")
    peak = peaks.stop()
    row["baseline_anon_mib"] = baseline
    row["peak_anon_mib"] = peak
    row["ingest_peak_anon_mib"] = peak.get("ingest")
    row["ingest_samples_per_s"] = n / row["ingest_s"]
    row["vmhwm_mib"] = proc_status_kib("VmHWM") / 1024
    on_disk = row["disk_after_fit"]["bytes_on_disk"]
    row["bytes_on_disk_per_sample"] = on_disk / n
    row["bytes_apparent_per_sample"] = row["disk_after_fit"]["bytes_apparent"] / n
    ckpts = row["checkpoints_stored_bytes"]
    # the samples' share: the store's bytes on disk less its checkpoints (which do not grow with N)
    row["bytes_on_disk_per_sample_excl_checkpoints"] = None if ckpts is None else (on_disk - ckpts) / n
    return row


# --------------------------------------------------------------------------- the ciphers alone
def old_keystream(key: bytes, tag: bytes, name: bytes, data: bytes | memoryview) -> bytes:
    """Store format 3's cipher (sisa/store/cipher.py at 8d0ec4a, verbatim): ``data`` XOR SHAKE-256."""
    n = len(data)
    stream = hashlib.shake_256(b"sisa-" + tag + b"|" + key + name).digest(n)
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def old_digest(key: bytes, body: bytes | memoryview) -> bytes:
    """Format 3's unkeyed BLAKE2b-64 check value over the id key and the body."""
    h = hashlib.blake2b(key, digest_size=8)
    h.update(body)
    return h.digest()


def measure_ciphers(records: int = 20_000) -> dict[str, Any]:
    """Re-encrypt records/s (open under one key, seal under another) and blob seal/open MB/s, old and new."""
    from sisa.store import cipher

    rng = np.random.default_rng(0)
    body = rng.integers(0, 256, CIPHER_RECORD, dtype=np.uint8).tobytes()
    blob = rng.integers(0, 256, CIPHER_BLOB, dtype=np.uint8).tobytes()
    sid = (12345).to_bytes(8, "big")
    k1, k2 = os.urandom(16), os.urandom(16)
    old_sealed = old_keystream(k1, b"sample", sid, body + old_digest(sid, body))

    def old_rekey() -> None:
        for _ in range(records):
            plain = old_keystream(k1, b"sample", sid, old_sealed)
            if plain[CIPHER_RECORD:] != old_digest(sid, plain[:CIPHER_RECORD]):
                raise RuntimeError("old cipher: digest mismatch")
            old_keystream(k2, b"sample", sid, plain[:CIPHER_RECORD] + old_digest(sid, plain[:CIPHER_RECORD]))

    n1, n2, ad1, ad2 = (
        cipher.new_key(),
        cipher.new_key(),
        b"sisa-smp" + sid + bytes(24),
        b"sisa-smp" + sid + bytes(23) + b"1",
    )
    new_sealed = cipher.seal_record(n1, body, ad1)

    def new_rekey() -> None:
        for _ in range(records):
            plain = cipher.open_record(n1, new_sealed, ad1)
            if plain is None:
                raise RuntimeError("new cipher: record failed to open")
            cipher.seal_record(n2, plain, ad2)

    token = os.urandom(16)
    old_blob = old_keystream(k1, b"ckpt", token, blob)
    new_blob = cipher.seal_record(n1, blob, b"sisa-ckpt|" + token)
    out: dict[str, Any] = {"record_bytes": CIPHER_RECORD, "blob_bytes": CIPHER_BLOB, "records": records}
    for name, rekey, seal, open_ in (
        (
            "old",
            old_rekey,
            lambda: old_keystream(k1, b"ckpt", token, blob),
            lambda: hashlib.sha256(old_keystream(k1, b"ckpt", token, old_blob)).digest(),
        ),
        (
            "new",
            new_rekey,
            lambda: cipher.seal_record(n1, blob, b"sisa-ckpt|" + token),
            lambda: cipher.open_record(n1, new_blob, b"sisa-ckpt|" + token),
        ),
    ):
        rekey_s = best_of(3, rekey)
        seal_s, open_s = best_of(5, seal), best_of(5, open_)
        out[name] = {
            "rekey_records_per_s": records / rekey_s,
            "rekey_mb_s": records * CIPHER_RECORD / rekey_s / 1e6,
            "blob_seal_mb_s": CIPHER_BLOB / seal_s / 1e6,
            "blob_open_mb_s": CIPHER_BLOB / open_s / 1e6,
        }
    out["old"]["what"] = "SHAKE-256 keystream XOR + BLAKE2b-64 (open: decrypt + check; seal: digest + encrypt)"
    out["new"]["what"] = "AES-256-GCM from cryptography (a fresh 96-bit nonce per seal, 16-byte tag)"
    out["old"]["blob_open_note"] = "format 3 checked a checkpoint by its sha256 after decrypting: included"
    out["rekey_new_over_old"] = out["new"]["rekey_records_per_s"] / out["old"]["rekey_records_per_s"]
    return out


# --------------------------------------------------------------------------- parent side
def git(root: Path, *args: str) -> str:
    """Output of ``git -C root args`` (stripped)."""
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def old_worktree(path: Path, rev: str) -> Path:
    """The git worktree of ``rev`` at ``path``, added if missing.

    Raises:
        SystemExit: If ``path`` exists but is not a checkout of ``rev``.
    """
    want = git(ROOT, "rev-parse", f"{rev}^{{commit}}")
    if not path.exists():
        git(ROOT, "worktree", "prune")
        git(ROOT, "worktree", "add", "--detach", str(path), want)
    try:
        have = git(path, "rev-parse", "HEAD")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--old-worktree {path} exists but is not a git checkout; remove it or pick another") from exc
    if have != want:
        raise SystemExit(f"--old-worktree {path} is at {have}, not {rev} ({want}); remove it or pick another path")
    if not (path / "sisa" / "__init__.py").is_file():
        raise SystemExit(f"--old-worktree {path} has no sisa/ package")
    return path


def tree_info(root: Path) -> dict[str, Any]:
    """Git revision of a tree and whether (and where) its working copy differs from it."""
    changed = [line[3:] for line in git(root, "status", "--porcelain").splitlines() if line[3:].startswith("sisa/")]
    return {"root": str(root), "revision": git(root, "rev-parse", "HEAD"), "sisa_changes_uncommitted": changed}


def check_disk(where: Path, n: int, bytes_per_sample: float) -> dict[str, int]:
    """Fail before a child starts when ``where`` lacks room for its store and a compaction copy.

    Raises:
        SystemExit: With the bytes needed and free.
    """
    need = int(n * bytes_per_sample * COPIES) + SLACK_BYTES
    free = shutil.disk_usage(where).free
    if free < need:
        raise SystemExit(
            f"not enough disk in {where} for N={n}: need about {need / 2**30:.1f} GiB "
            f"({bytes_per_sample:.0f} B/sample x {COPIES}, the store and a compaction copy), {free / 2**30:.1f} GiB "
            "free. Free some, or pass --workdir on a larger disk, or smaller --sizes"
        )
    return {"need": need, "free": free}


def run_child(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run :func:`child` in a fresh process of this script; its row, read from a JSON file."""
    env = dict(os.environ)
    env["PYTHONPATH"] = spec["root"]
    env["SISA_WORKER"] = "0"
    result = Path(spec["store"] + ".json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-out", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"child {spec['layout']} N={spec['n']} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    row: dict[str, Any] = json.loads(result.read_text())
    result.unlink()
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Old / new per N, for every N both layouts ran."""
    out = []
    for n in sorted({r["n"] for r in runs}):
        pair = {r["layout"]: r for r in runs if r["n"] == n}
        if set(pair) != set(LAYOUTS):
            continue
        old, new = pair["old"], pair["new"]
        row: dict[str, Any] = {"n": n}
        for kind in ("single", "batch"):
            for key in ("non_retrain_s", "written_bytes", "erasure_bytes", "wall_s"):
                row[f"{kind}_{key}"] = ratio(old[kind][key], new[kind][key])
        row["bytes_on_disk"] = ratio(old["disk_after_fit"]["bytes_on_disk"], new["disk_after_fit"]["bytes_on_disk"])
        row["ingest_s"] = ratio(old["ingest_s"], new["ingest_s"])
        # new / old for rates (higher is better for the new layout), like the other ratios' old / new of costs
        row["ingest_samples_per_s_new_over_old"] = ratio(
            new.get("ingest_samples_per_s"), old.get("ingest_samples_per_s")
        )
        rekey_old, rekey_new = old.get("rekey") or {}, new.get("rekey") or {}
        row["rekey_records_per_s_new_over_old"] = ratio(rekey_new.get("records_per_s"), rekey_old.get("records_per_s"))
        ck_old, ck_new = old.get("checkpoints") or {}, new.get("checkpoints") or {}
        row["checkpoint_open_mb_s_new_over_old"] = ratio(ck_new.get("open_mb_s"), ck_old.get("open_mb_s"))
        row["checkpoint_seal_mb_s_new_over_old"] = ratio(ck_new.get("seal_mb_s"), ck_old.get("seal_mb_s"))
        d_old, d_new = old.get("deferred") or {}, new.get("deferred") or {}
        row["to_keys_destroyed_s"] = ratio(d_old.get("to_keys_destroyed_s"), d_new.get("to_keys_destroyed_s"))
        row["ingest_peak_anon"] = ratio(old["ingest_peak_anon_mib"], new["ingest_peak_anon_mib"])
        out.append(row)
    return out


def times(value: float | None) -> str:
    """A ratio as ``x1.23`` text (``-`` when unknown)."""
    return "-" if value is None else f"x{value:.2f}"


def mb(value: float | None) -> str:
    """Bytes as MB text (``-`` when unknown)."""
    return "-" if value is None else f"{value / 1e6:.1f}"


def num(value: float | None) -> str:
    """A number as whole-number text (``-`` when unknown)."""
    return "-" if value is None else f"{value:.0f}"


def print_row(row: dict[str, Any]) -> None:
    """One line of the table."""
    s, b = row["single"], row["batch"]
    print(
        f"{row['n']:>9} {row['layout']:<4} {row['ingest_s']:8.1f} {row['ingest_peak_anon_mib']:8.0f} "
        f"{row['disk_after_fit']['bytes_on_disk'] / 1e6:9.1f} {row['bytes_on_disk_per_sample']:7.0f} "
        f"{num(row.get('bytes_on_disk_per_sample_excl_checkpoints')):>7} | "
        f"{s['wall_s']:7.2f} {s['retrain_s']:7.2f} {s['non_retrain_s']:7.2f} {mb(s['written_bytes']):>8} "
        f"{mb(s['erasure_bytes']):>8} | "
        f"{b['wall_s']:7.2f} {b['retrain_s']:7.2f} {b['non_retrain_s']:7.2f} {mb(b['written_bytes']):>8} "
        f"{mb(b['erasure_bytes']):>8}",
        flush=True,
    )


def print_extra(row: dict[str, Any]) -> None:
    """The rates of one child: ingest, re-encryption, checkpoints, deferred deletion to keys destroyed."""
    rekey, ck, deferred = row.get("rekey") or {}, row.get("checkpoints") or {}, row.get("deferred") or {}
    print(
        f"{row['n']:>9} {row['layout']:<4} ingest {row['ingest_samples_per_s']:,.0f} samples/s; "
        f"re-encryption {num(rekey.get('records_per_s'))} records/s ({rekey.get('reencrypted', '-')} records); "
        f"checkpoints open {num(ck.get('open_mb_s'))} MB/s, seal {num(ck.get('seal_mb_s'))} MB/s; "
        f"delete(defer=True) -> keys destroyed {deferred.get('to_keys_destroyed_s', float('nan')):.2f} s "
        f"(call {deferred.get('defer_s', float('nan')):.2f} s, erased at acceptance: "
        f"{deferred.get('erased_at_acceptance')})",
        flush=True,
    )


HEADER = (
    f"{'N':>9} {'lay':<4} {'ingest_s':>8} {'peakMiB':>8} {'disk_MB':>9} {'B/samp':>7} {'-ckpts':>7} | "
    f"{'1: wall':>7} {'retrain':>7} {'other':>7} {'wrMB':>8} {'erasMB':>8} | "
    f"{'100: wall':>7} {'retrain':>7} {'other':>7} {'wrMB':>8} {'erasMB':>8}"
)


def draw(result: dict[str, Any], png: Path) -> None:
    """Non-retrain seconds against N (log-log) and bytes on disk per sample, one line per layout."""
    import benchlib

    plt = benchlib.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for layout in result["layouts"]:
        color = {"old": "C0", "new": "C1"}[layout]
        rows = sorted((r for r in result["runs"] if r["layout"] == layout), key=lambda r: r["n"])
        ns = [r["n"] for r in rows]
        for kind, style in (("single", "-"), ("batch", "--")):
            label = f"{layout}: 1 id" if kind == "single" else f"{layout}: {BATCH_DELETE} ids"
            seconds = [max(r[kind]["non_retrain_s"], 1e-4) for r in rows]
            left.plot(ns, seconds, style, color=color, marker="o", label=label)
        per_sample = [r["bytes_on_disk_per_sample"] for r in rows]
        right.plot(ns, per_sample, "-", color=color, marker="o", label=f"{layout}: store / N")
        excl = [r.get("bytes_on_disk_per_sample_excl_checkpoints") for r in rows]
        if all(v is not None for v in excl):
            right.plot(ns, excl, "--", color=color, marker="x", label=f"{layout}: less its checkpoints")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("samples in the store (N)")
    left.set_ylabel("deletion seconds besides the retrain")
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("samples in the store (N)")
    right.set_ylabel("bytes on disk per sample (after fit)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    benchlib.save_figure(fig, png, "erasure: what a deletion costs besides the retrain, old layout vs new")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 60000,600000,3000000)")
    parser.add_argument("--quick", action="store_true", help="N = 6000,30000")
    parser.add_argument("--layouts", default="old,new", help="comma-separated, of old,new (default both)")
    parser.add_argument("--old-rev", default=OLD_REV, help=f"git revision of the old layout (default {OLD_REV})")
    parser.add_argument("--old-worktree", type=Path, default=DEFAULT_WORKTREE, help="its worktree (made if missing)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "erasure.json", help="JSON; PNG beside")
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores (their folder is printed)")
    parser.add_argument("--runner", choices=("local", "auto"), default="local", help="local: no Ray (default)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child (default: none)")
    parser.add_argument(
        "--ingest-rounds",
        type=int,
        default=0,
        help="only ingest: each N this many rounds of old, new (alternating, a fresh child each), wall and CPU",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value after the defaults, e.g. shards=2")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def child_spec(args: argparse.Namespace, layout: str, root: Path, n: int, store: Path) -> dict[str, Any]:
    """What one child measures: the layout, the tree it imports sisa from, N, its store and the settings."""
    return {
        "layout": layout,
        "root": str(root),
        "n": n,
        "store": str(store),
        "overrides": list(args.overrides),
        "runner": args.runner,
        "batch_delete": BATCH_DELETE,
    }


def ingest_rounds(
    args: argparse.Namespace,
    sizes: list[int],
    layouts: list[str],
    roots: dict[str, Path],
    trees: dict[str, Any],
    work: Path,
) -> int:
    """``--ingest-rounds K``: ingest only, old and new alternating K times per N; wall and CPU seconds.

    On a shared machine one child's wall time moves with everything else running; alternating the
    stores and reporting CPU seconds beside wall seconds separates the store's cost from the noise.
    """
    import benchlib

    runs: list[dict[str, Any]] = []
    try:
        for n in sizes:
            for round_ in range(args.ingest_rounds):
                for layout in layouts:
                    store = work / f"{layout}-{n}-{round_}"
                    check_disk(work, n, GUESS_BYTES_PER_SAMPLE)
                    spec = {**child_spec(args, layout, roots[layout], n, store), "ingest_only": True}
                    row = run_child(spec, args.timeout)
                    row["round"], row["loadavg"] = round_, benchlib.loadavg()
                    runs.append(row)
                    load = (row["loadavg"] or ["?"])[0]
                    print(
                        f"N={n} round {round_} {layout}: {row['ingest_samples_per_s']:,.0f} samples/s, "
                        f"{row['ingest_s']:.1f} s wall, {row['ingest_cpu_s']:.1f} s CPU (load {load})"
                    )
                    shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": benchlib.machine_info(),
        "command": " ".join(sys.argv),
        "mode": "ingest rounds",
        "features": FEATURES,
        "ingest_batch": BATCH,
        "config_overrides": [*BASE_OVERRIDES, *args.overrides],
        "layouts": trees,
        "old_rev": args.old_rev if "old" in layouts else None,
        "runs": runs,
        "loadavg_end": benchlib.loadavg(),
    }
    benchlib.write_results(args.out, result, lambda png: draw_ingest(result, png))
    return 0


def draw_ingest(result: dict[str, Any], png: Path) -> None:
    """Ingest samples/s and CPU seconds per round, one bar per store."""
    import benchlib

    plt = benchlib.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    runs = result["runs"]
    labels = [f"N={r['n']:,}\nround {r['round']}\n{r['layout']}" for r in runs]
    colors = [{"old": "C0", "new": "C1"}[r["layout"]] for r in runs]
    left.bar(range(len(runs)), [r["ingest_samples_per_s"] for r in runs], color=colors)
    right.bar(range(len(runs)), [r["ingest_cpu_s"] for r in runs], color=colors)
    for axis, label in ((left, "ingest samples/s (wall)"), (right, "ingest CPU seconds")):
        axis.set_xticks(range(len(runs)), labels, fontsize=7)
        axis.set_ylabel(label)
    benchlib.save_figure(fig, png, "ingest, old store and new alternating (fresh process each)")


def main() -> int:
    """Run every (N, layout) in a fresh child, side by side; print the table, write the JSON and PNG."""
    args = parse_args()
    if args.child:
        row = child(json.loads(args.child))
        args.child_out.write_text(json.dumps(row))
        return 0
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - set(LAYOUTS):
        raise SystemExit(f"--layouts={args.layouts!r}: choose from {','.join(LAYOUTS)}")
    layouts = [x for x in LAYOUTS if x in layouts]
    roots = {"new": ROOT}
    if "old" in layouts:
        roots["old"] = old_worktree(args.old_worktree.resolve(), args.old_rev)
    # benchlib imports sisa: from this checkout, or from the old tree when only that one is measured
    # (so an old-only run does not need this checkout to import).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "new" not in layouts:
        sys.path.insert(1, str(roots["old"]))
    import benchlib

    sizes = benchlib.parse_ints(args.sizes, "sizes") if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    trees = {layout: tree_info(roots[layout]) for layout in layouts}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sisa-erasure-", dir=args.workdir))
    per_sample: dict[str, float] = {}
    runs: list[dict[str, Any]] = []
    revisions = ", ".join(f"{k}={v['revision'][:10]}" for k, v in trees.items())
    ciphers = measure_ciphers() if "new" in layouts else None
    if ciphers is not None:
        for name in ("old", "new"):
            c = ciphers[name]
            print(
                f"cipher {name}: re-encrypt {c['rekey_records_per_s']:,.0f} records/s of {CIPHER_RECORD} B; "
                f"{CIPHER_BLOB >> 20} MiB blob seal {c['blob_seal_mb_s']:,.0f} MB/s, "
                f"open {c['blob_open_mb_s']:,.0f} MB/s"
            )
    print(f"stores in {work}; layouts {revisions}")
    if args.ingest_rounds:
        return ingest_rounds(args, sizes, layouts, roots, trees, work)
    print(HEADER)
    try:
        for n in sizes:
            for layout in layouts:
                store = work / f"{layout}-{n}"
                disk = check_disk(work, n, per_sample.get(layout, GUESS_BYTES_PER_SAMPLE))
                spec = child_spec(args, layout, roots[layout], n, store)
                row = run_child(spec, args.timeout)
                row["disk_free_before"] = disk["free"]
                if not Path(row["sisa_file"]).is_relative_to(roots[layout]):
                    raise SystemExit(f"{layout}: child imported {row['sisa_file']}, not from {roots[layout]}")
                trees[layout]["sisa_file"] = row["sisa_file"]
                after = row["disk_after_fit"]
                per_sample[layout] = max(after["bytes_on_disk"], after["bytes_apparent"]) / n
                runs.append(row)
                print_row(row)
                if not args.keep:
                    shutil.rmtree(store, ignore_errors=True)
    finally:
        if args.keep:
            print(f"stores kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    compared = ratios(runs)
    for row in runs:
        print_extra(row)
    for r in compared:
        print(
            f"N={r['n']:>9} old/new: non-retrain 1 id {times(r['single_non_retrain_s'])}, "
            f"{BATCH_DELETE} ids {times(r['batch_non_retrain_s'])}; "
            f"written 1 id {times(r['single_written_bytes'])}, {BATCH_DELETE} ids {times(r['batch_written_bytes'])}; "
            f"bytes on disk {times(r['bytes_on_disk'])}; defer-to-keys-destroyed {times(r['to_keys_destroyed_s'])}"
        )
        print(
            f"N={r['n']:>9} new/old: ingest samples/s {times(r['ingest_samples_per_s_new_over_old'])}, "
            f"re-encryption records/s {times(r['rekey_records_per_s_new_over_old'])}, checkpoint open MB/s "
            f"{times(r['checkpoint_open_mb_s_new_over_old'])}, "
            f"seal MB/s {times(r['checkpoint_seal_mb_s_new_over_old'])}"
        )
    result = {
        "machine": benchlib.machine_info(),
        "command": " ".join(sys.argv),
        "features": FEATURES,
        "feature_dtype": "uint8",
        "ingest_batch": BATCH,
        "batch_delete": BATCH_DELETE,
        "config_overrides": [*BASE_OVERRIDES, *args.overrides],
        "runner": args.runner,
        "layouts": trees,
        "old_rev": args.old_rev if "old" in layouts else None,
        "erasure_bytes_method": ERASURE_BYTES_METHOD,
        "non_retrain_s_method": "wall seconds of Ensemble.delete minus the certificate's batch.retrain_seconds",
        "cipher": ciphers,
        "runs": runs,
        "ratios_old_over_new": compared,
        "loadavg_end": benchlib.loadavg(),
    }
    benchlib.write_results(args.out, result, lambda png: draw(result, png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
