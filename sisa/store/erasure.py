"""Erasure by key destruction: rotate the touched runs' keys, sweep retired checkpoints' keys.

A deleted sample's ciphertext may lie anywhere in ``data.mdb``'s free pages; it becomes
unrecoverable when its key is gone from every file. Samples are keyed by *run* (the up to
508 ids that share one membership record of a slice). Rotating a run makes a new key,
re-encrypts the samples left in it (at most 507: the cost of one deleted id's erasure,
whatever N is), then deletes the old key; compacting the key environment (a few dozen
bytes per run and per checkpoint) removes the old key's bytes from disk. A retired
checkpoint's key is deleted the same way. Every step is idempotent: a crash anywhere
leaves work the next writable open finishes (:func:`finish_erasure`).

Two durable records make that so. Before any key is dropped, the bulk store's meta holds
``keys_compaction_pending``; it is cleared only after the key file was compacted, so a
crash between the drop and the compaction (the dropped key still in a free page of
``keys/data.mdb``) is compacted by the next writable open. A survivor that decrypts under
none of its run's keys (tampered or damaged bytes) cannot be re-encrypted: it is
*quarantined* (its record and membership removed, the reason kept under the meta's
``quarantined``) and the erasure goes on, so it never keeps a deleted id's key alive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from sisa.store.layout import id_key
from sisa.store.samples import RunCipher, SampleRecords

if TYPE_CHECKING:
    from sisa.store.keyring import SliceKey

Store = (
    SampleRecords  # what these functions use of a store (samples and the host); the database module builds on this one
)
Run = tuple[int, int, int]  # (shard, slice, run)

__all__ = [
    "COMPACTION_PENDING",
    "QUARANTINED",
    "ErasureReport",
    "erase",
    "finish_erasure",
    "finish_rotations",
    "quarantined",
    "rotate",
    "runs_of",
]

log = logging.getLogger(__name__)

_BATCH = 20_000  # samples re-encrypted per write transaction: bounded dirty pages and memory
# Bulk meta keys. Set before a key is dropped, cleared after keys/data.mdb was compacted: while it is
# set, a dropped key may still lie in a free page of the key file.
COMPACTION_PENDING = "keys_compaction_pending"
QUARANTINED = "quarantined"  # survivors an erasure could not re-encrypt: list of {id, shard, slice, run, reason, at}


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
        quarantined: Survivors that decrypted under none of their run's keys, so could not be
            re-encrypted: ``{"id", "shard", "slice", "run", "reason"}`` each. They are out of
            the store (record and membership removed); their old key was destroyed anyway.
    """

    rotated_slices: list[list[int]] = field(default_factory=list)
    rotated_runs: int = 0
    reencrypted: int = 0
    checkpoint_keys: int = 0
    key_file_bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    quarantined: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def add(self, other: ErasureReport) -> None:
        """Count ``other``'s rotations (and quarantined samples) in this report."""
        pairs = {(p[0], p[1]) for p in [*self.rotated_slices, *other.rotated_slices]}
        self.rotated_slices = [list(p) for p in sorted(pairs)]
        self.rotated_runs += other.rotated_runs
        self.reencrypted += other.reencrypted
        self.quarantined += other.quarantined


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
    with store.keys.read(follow=False) as ktxn:
        current = {run: store.keys.run_keys(ktxn, *run) for run in wanted}
    renew: dict[Run, int] = {}  # runs that get a new key, and the request it is made for
    unfinished: list[Run] = []  # runs left with two keys by a rotation a crash cut short
    for run, since in sorted(wanted.items()):
        keys = current[run]
        if not keys:
            continue  # nothing was ever stored in it
        if fresh or (since is not None and keys[0].since < since):
            renew[run] = max(since or 0, keys[0].since)
        elif len(keys) > 1:
            unfinished.append(run)
    # Every new key in one commit: the keys are durable before any sample is re-encrypted under them.
    made = store.keys.add_generations(renew) if renew else {}
    chosen: dict[Run, list[SliceKey]] = {}
    for run in sorted([*renew, *unfinished]):
        target = made.get(run, current[run][0])
        chosen[run] = [target, *[k for k in current[run] if k.generation != target.generation]]
    if not chosen:
        return report
    report.reencrypted, report.quarantined = _reencrypt(store, chosen)
    with store.read() as txn:
        empty = {run for run in chosen if len(store.run_ids(txn, *run)) == 0}
    _mark_compaction_pending(store)  # durable before any key leaves: a crash after the drop gets compacted
    # One commit for the batch; a run whose last samples were deleted needs no key at all.
    store.keys.drop_keys(older_of=[r for r in chosen if r not in empty], all_of=sorted(empty))
    report.rotated_runs = len(chosen)
    report.rotated_slices = [list(p) for p in sorted({(s, r) for s, r, _ in chosen})]
    return report


def _reencrypt(store: Store, chosen: dict[Run, list[SliceKey]]) -> tuple[int, list[dict[str, Any]]]:
    """Re-encrypt every sample of the chosen runs that is not under its run's newest key.

    A sample that decrypts under none of its run's keys is quarantined in the same write
    transaction that re-encrypts its batch (record and membership removed, the reason
    appended to the meta's ``quarantined``), never raised: one damaged survivor must not
    keep the old key, and with it a deleted sample's ciphertext, alive.

    Args:
        store: A writable store.
        chosen: (shard, slice, run) -> its keys, the new one first.

    Returns:
        Samples re-encrypted, and the samples quarantined.
    """
    with store.read() as txn:
        parts = [(store.run_ids(txn, *run), i) for i, run in enumerate(chosen)]
    ids = np.concatenate([p for p, _ in parts])
    which = np.concatenate([np.full(len(p), i) for p, i in parts])
    order = np.argsort(ids, kind="stable")
    ids, which = ids[order], which[order]
    # Per run: its old keys (what its samples are under, the common case) and its new one.
    olds = [RunCipher(keys[1:], run) for run, keys in chosen.items()]
    news = [RunCipher(keys[:1], run) for run, keys in chosen.items()]
    done, bad = 0, []
    for start in range(0, len(ids), _BATCH):
        part = list(zip(ids[start : start + _BATCH].tolist(), which[start : start + _BATCH].tolist(), strict=True))

        def change(txn: lmdb.Transaction, part: list[tuple[int, int]] = part) -> tuple[int, list[dict[str, Any]]]:
            samples, found = store.db("samples"), []
            opened: dict[int, list[tuple[bytes, bytes]]] = {}  # run index -> (id key, plaintext) to seal anew
            for sid, w in part:
                k = id_key(sid)
                raw = txn.get(k, db=samples)
                if raw is None:
                    continue
                plain = olds[w].open(k, raw)
                if plain is None:
                    if news[w].open(k, raw) is not None:
                        continue  # already under the new key (a rotation that a crash cut short)
                    found.append(_quarantine(store, txn, sid, olds[w].place))
                    continue
                opened.setdefault(w, []).append((k, plain))
            resealed = [
                (k, record)
                for w, items in opened.items()
                for (k, _), record in zip(items, news[w].seal(items), strict=True)
            ]
            resealed.sort()  # id order: each page of data.mdb is rewritten once
            txn.cursor(db=samples).putmulti(resealed)
            if found:
                store.put_meta(txn, **{QUARANTINED: [*store.meta(txn).get(QUARANTINED, []), *found]})
            return len(resealed), found

        n, found = store.write(change)
        done += n
        bad += found
    for q in bad:
        log.error(
            "quarantined sample %d (shard %d slice %d run %d) of store %s: %s",
            q["id"],
            q["shard"],
            q["slice"],
            q["run"],
            store.path,
            q["reason"],
        )
    return done, bad


def _quarantine(store: Store, txn: lmdb.Transaction, sid: int, place: Run) -> dict[str, Any]:
    """Take a survivor that cannot be decrypted out of the store, in the caller's transaction.

    Its bytes are lost already (they decrypt under none of the run's keys), and its old key is
    about to be destroyed with the deleted samples' ciphertext: its record and membership go,
    so no training reads it (its shard retrains from its slice at the next fit), and its place
    and reason are returned for the meta's ``quarantined`` list, the certificate and the log.
    """
    shard, slice_, run = place
    store.remove_member(txn, sid)
    txn.delete(id_key(sid), db=store.db("samples"))
    reason = "it decrypts under none of its run's keys (modified or damaged bytes); it was dropped from the store"
    return {"id": sid, "shard": shard, "slice": slice_, "run": run, "reason": reason, "at": time.time()}


def quarantined(store: Store, txn: lmdb.Transaction | None = None) -> list[dict[str, Any]]:
    """Every sample an erasure quarantined, oldest first (``sisa status`` lists them)."""
    return list(store.meta(txn).get(QUARANTINED, []))


def _mark_compaction_pending(store: Store) -> None:
    """Record durably, before a key is dropped, that the key file must be compacted."""
    if not store.meta().get(COMPACTION_PENDING):
        store.write(lambda txn: store.put_meta(txn, **{COMPACTION_PENDING: True}))


def finish_rotations(store: Store) -> ErasureReport:
    """Finish every rotation a crash cut short (runs left with more than one key)."""
    with store.keys.read(follow=False) as ktxn:
        unfinished = [run for run, keys in store.keys.all_runs(ktxn).items() if len(keys) > 1]
    return rotate(store, unfinished)


def erase(
    store: Store,
    requests: Sequence[dict[str, Any]],
    *,
    done: Callable[[lmdb.Transaction, ErasureReport], None] | None = None,
) -> ErasureReport:
    """Make the deleted samples and retired checkpoints of ``requests`` unrecoverable (idempotent).

    Rotates every run the requests touched (and finishes any rotation a crash cut short),
    deletes the key of every checkpoint the bulk store no longer holds, and compacts the
    key environment, so the destroyed keys' bytes are on no file. The compaction marker
    is set before the first key is dropped and cleared, with ``done``, after the compaction.

    Args:
        store: A writable store.
        requests: Journaled deletion requests (pending ones; runs already rotated for them
            are skipped).
        done: Called in the write transaction that clears the compaction marker (the
            journal records the requests' erasure there).

    Returns:
        The erasure's report.
    """
    started = time.perf_counter()
    _mark_compaction_pending(store)
    report = finish_rotations(store)
    # every run the requests touched, in one id-ordered pass over the samples
    report.add(_rotate(store, dict(runs_of(requests)), fresh=False))
    tokens = store.checkpoint_tokens()
    report.checkpoint_keys = store.keys.drop_checkpoint_keys(tokens)
    report.key_file_bytes = list(store.keys.compact())
    report.seconds = round(time.perf_counter() - started, 4)

    def finish(txn: lmdb.Transaction) -> None:
        txn.delete(COMPACTION_PENDING.encode(), db=store.db("meta"))
        if done is not None:
            done(txn, report)

    store.write(finish)
    log.info(
        "erased: %d run(s) re-keyed, %d sample(s) re-encrypted, %d checkpoint key(s) destroyed, "
        "%d sample(s) quarantined in %.2fs",
        report.rotated_runs,
        report.reencrypted,
        report.checkpoint_keys,
        len(report.quarantined),
        report.seconds,
    )
    return report


def finish_erasure(store: Store) -> bool:
    """Compact the key file if a crash came between a key drop and the compaction (a writable open does this).

    Returns:
        Whether the key file was compacted.
    """
    if not store.meta().get(COMPACTION_PENDING):
        return False
    finish_rotations(store)  # a drop the crash cut short leaves runs with two keys
    sizes = store.keys.compact()
    store.write(lambda txn: txn.delete(COMPACTION_PENDING.encode(), db=store.db("meta")))
    log.info("compacted the key file of %s (%d -> %d bytes): an erasure was cut short", store.path, *sizes)
    return True
