"""Erasure by key destruction: rotate the touched runs' keys, sweep retired checkpoints' keys.

A deleted sample's ciphertext may lie anywhere in ``data.mdb``'s free pages; it becomes
unrecoverable when its key is gone from every file. Samples are keyed by *run* (the up to
508 ids that share one membership record of a slice). Rotating a run makes a new key,
re-encrypts the samples left in it (at most 507: the cost of one deleted id's erasure,
whatever N is), then deletes the old key; compacting the key environment (a few dozen
bytes per run and per checkpoint) removes the old key's bytes from disk. A retired
checkpoint's key is deleted the same way. Every step is idempotent: a crash anywhere
leaves work the next apply (or writable open) finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from sisa.errors import IntegrityError
from sisa.store.records import DIGEST_SIZE, Records, id_key, open_sample, seal_sample

if TYPE_CHECKING:
    from sisa.store.keyring import SliceKey

Store = Records  # what these functions use of a store; the database module builds on this one
Run = tuple[int, int, int]  # (shard, slice, run)

__all__ = ["ErasureReport", "erase", "finish_rotations", "rotate", "runs_of"]

log = logging.getLogger(__name__)

_BATCH = 20_000  # samples re-encrypted per write transaction: bounded dirty pages and memory


@dataclass
class ErasureReport:
    """What one erasure did: the numbers a certificate records.

    Attributes:
        rotated_slices: (shard, slice) pairs that had a run re-keyed.
        rotated_runs: Runs whose key was replaced.
        reencrypted: Samples re-encrypted under the new keys.
        checkpoint_keys: Keys of retired checkpoints deleted.
        key_file_bytes: Size of the key file before and after its compaction.
        seconds: Wall time of the whole erasure.
    """

    rotated_slices: list[list[int]] = field(default_factory=list)
    rotated_runs: int = 0
    reencrypted: int = 0
    checkpoint_keys: int = 0
    key_file_bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def add(self, other: ErasureReport) -> None:
        """Count ``other``'s rotations in this report."""
        pairs = {(p[0], p[1]) for p in [*self.rotated_slices, *other.rotated_slices]}
        self.rotated_slices = [list(p) for p in sorted(pairs)]
        self.rotated_runs += other.rotated_runs
        self.reencrypted += other.reencrypted


def runs_of(requests: Iterable[dict[str, Any]]) -> dict[Run, int]:
    """Every (shard, slice, run) the requests' ids were in -> the newest request id that touched it."""
    out: dict[Run, int] = {}
    for request in requests:
        for shard, info in request["shards"].items():
            for slice_, run in info["runs"]:
                key = (int(shard), int(slice_), int(run))
                out[key] = max(out.get(key, 0), int(request["request_id"]))
    return out


def rotate(store: Store, runs: Iterable[Run], *, since: int | None = None, fresh: bool = False) -> ErasureReport:
    """Give each run a new key, re-encrypt its samples, and delete its older keys (idempotent).

    The new keys are committed first; then the samples of every rotated run are
    re-encrypted in one pass in id order (the order of ``data.mdb``'s pages, so a batch
    rewrites each page once), in bounded transactions; then the old keys go. A crash
    anywhere leaves runs with two keys, which :func:`finish_rotations` completes.

    Args:
        store: A writable store.
        runs: (shard, slice, run) triples.
        since: The deletion request the rotation erases: a run whose newest key was made
            for it or a later request is rotated already and only finished if a crash cut
            it short.
        fresh: Rotate even so (a rolled-back ingest: its samples' ciphertext is in free pages).

    Returns:
        What was rotated and how many samples were re-encrypted.
    """
    return _rotate(store, dict.fromkeys(runs, since), fresh)


def _rotate(store: Store, wanted: dict[Run, int | None], fresh: bool) -> ErasureReport:
    """:func:`rotate`, each run with its own ``since``."""
    report = ErasureReport()
    chosen: dict[Run, list[SliceKey]] = {}
    with store.keys.read(follow=False) as ktxn:
        current = {run: store.keys.run_keys(ktxn, *run) for run in wanted}
    for run, since in sorted(wanted.items()):
        keys = current[run]
        if not keys:
            continue  # nothing was ever stored in it
        renew = fresh or (since is not None and keys[0].since < since)
        if not renew and len(keys) == 1:
            continue
        target = store.keys.add_generation(*run, max(since or 0, keys[0].since)) if renew else keys[0]
        chosen[run] = [target, *[k for k in keys if k.generation != target.generation]]
    if not chosen:
        return report
    report.reencrypted = _reencrypt(store, chosen)
    with store.read() as txn:
        empty = {run for run in chosen if len(store.run_ids(txn, *run)) == 0}
    for run in chosen:
        if run in empty:
            store.keys.drop_run(*run)  # its last samples were deleted: no key is needed
        else:
            store.keys.drop_older_generations(*run)
    report.rotated_runs = len(chosen)
    report.rotated_slices = [list(p) for p in sorted({(s, r) for s, r, _ in chosen})]
    return report


def _reencrypt(store: Store, chosen: dict[Run, list[SliceKey]]) -> int:
    """Re-encrypt every sample of the chosen runs that is not under its run's newest key.

    Args:
        store: A writable store.
        chosen: (shard, slice, run) -> its keys, the new one first.

    Returns:
        Samples re-encrypted.
    """
    with store.read() as txn:
        parts = [(store.run_ids(txn, *run), i) for i, run in enumerate(chosen)]
    ids = np.concatenate([p for p, _ in parts])
    which = np.concatenate([np.full(len(p), i) for p, i in parts])
    order = np.argsort(ids, kind="stable")
    ids, which = ids[order], which[order]
    places, keyring = list(chosen), list(chosen.values())
    done = 0
    for start in range(0, len(ids), _BATCH):
        part = list(zip(ids[start : start + _BATCH].tolist(), which[start : start + _BATCH].tolist(), strict=True))

        def change(txn: lmdb.Transaction, part: list[tuple[int, int]] = part) -> int:
            samples, n = store.db("samples"), 0
            for sid, w in part:
                keys = keyring[w]
                k = id_key(sid)
                raw = txn.get(k, db=samples)
                if raw is None:
                    continue
                body_len = len(raw) - DIGEST_SIZE  # a stream cipher keeps the plaintext's length
                plain = open_sample(keys[1:], k, raw, body_len)  # the common case: still under an old key
                if plain is None:
                    if open_sample(keys[:1], k, raw, body_len) is not None:
                        continue  # already under the new key (a rotation that a crash cut short)
                    shard, slice_, run = places[w]
                    raise IntegrityError(
                        f"sample {sid} (shard {shard} slice {slice_}) in store {store.path} was modified: "
                        "it decrypts under none of its keys; restore the store from a backup"
                    )
                txn.put(k, seal_sample(keys[0].key, k, plain), db=samples)
                n += 1
            return n

        done += store.write(change)
    return done


def finish_rotations(store: Store) -> ErasureReport:
    """Finish every rotation a crash cut short (runs left with more than one key)."""
    with store.keys.read(follow=False) as ktxn:
        unfinished = [run for run, keys in store.keys.all_runs(ktxn).items() if len(keys) > 1]
    return rotate(store, unfinished)


def erase(store: Store, requests: Sequence[dict[str, Any]]) -> ErasureReport:
    """Make the deleted samples and retired checkpoints of ``requests`` unrecoverable (idempotent).

    Rotates every run the requests touched (and finishes any rotation a crash cut short),
    deletes the key of every checkpoint the bulk store no longer holds, and compacts the
    key environment, so the destroyed keys' bytes are on no file.

    Args:
        store: A writable store.
        requests: Journaled deletion requests (pending ones; those already erased are skipped).

    Returns:
        The erasure's report.
    """
    started = time.perf_counter()
    report = finish_rotations(store)
    # every run the requests touched, in one id-ordered pass over the samples
    report.add(_rotate(store, dict(runs_of(requests)), fresh=False))
    tokens = store.checkpoint_tokens()
    report.checkpoint_keys = store.keys.drop_checkpoint_keys(tokens)
    report.key_file_bytes = list(store.keys.compact())
    report.seconds = round(time.perf_counter() - started, 4)
    log.info(
        "erased: %d run(s) re-keyed, %d sample(s) re-encrypted, %d checkpoint key(s) destroyed in %.2fs",
        report.rotated_runs,
        report.reencrypted,
        report.checkpoint_keys,
        report.seconds,
    )
    return report
