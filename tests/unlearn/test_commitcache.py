"""The per-shard commitment cache: always the from-scratch root, and a deletion touches only its buckets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sisa.ensemble import Ensemble
from sisa.receipt.buckets import bucket_of, bucket_root, manifest_root, split
from sisa.receipt.entries import sample_commitment
from sisa.receipt.keys import load_signer
from sisa.receipt.verify import verify_receipt
from sisa.store.database import Store
from sisa.store.digests import manifest_digest, packed_ids, slice_digest, slices_digest
from sisa.unlearn import commitcache
from sisa.unlearn.commitcache import BUCKETS, COMMITS_DB, shard_manifest
from sisa.unlearn.commitments import manifest_commitments, opening
from sisa.unlearn.tlog import latest_published, log_state
from tests.conftest import blobs, small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def scratch_root(secret: bytes, slices: list[np.ndarray], count: int = BUCKETS) -> bytes:
    """The bucketed manifest commitment (``count`` buckets) computed the documented way, with no cache code at all."""
    buckets = split(manifest_commitments(secret, slices), count)
    return manifest_root([len(b) for b in buckets], [bucket_root(b) for b in buckets])


def live_slices(store: Store, txn: Any) -> dict[int, list[np.ndarray]]:
    return {s: [store.slice_ids(txn, s, r) for r in range(int(rec["stage"]))] for s, rec in store.live(txn).items()}


@contextmanager
def small_store(tmp_path: Path) -> Iterator[tuple[Store, bytes]]:
    """An open store of 60 samples and its secret (tests on a shard with no samples use it as a host)."""
    x, y = blobs(60, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        yield ens.store, ens.store.secret()


def model_record(parts: list[np.ndarray]) -> dict[str, Any]:
    """The live record a trainer writes for a model trained on ``parts``: its stage and both training-set digests."""
    return {
        "stage": len(parts),
        "manifest": manifest_digest(parts),
        "slices": slices_digest([slice_digest(packed_ids(p)) for p in parts]),
    }


def check_all(store: Store) -> None:
    """Every live shard: the cache is current, and its root is the from-scratch one and the published one."""
    secret = store.secret()
    with store.read() as txn:
        published = latest_published(log_state(store, txn).entries)
        for shard, slices in live_slices(store, txn).items():
            man = shard_manifest(store, txn, secret, shard, slices, write=False)
            assert man.source == "cache" and not man.buckets  # nothing changed since it was written
            assert len(man.sizes) == commitcache.buckets_for(sum(len(s) for s in slices))
            assert man.root() == scratch_root(secret, slices, len(man.sizes))
            assert published[shard][1]["manifest_commitment"] == man.root().hex()
            assert published[shard][1]["manifest_size"] == sum(len(s) for s in slices)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many shards were computed from scratch (the cache could not be used)."""
    calls: list[int] = []
    whole = commitcache._scratch

    def spy(secret: bytes, words: Any) -> Any:
        calls.append(len(words))
        return whole(secret, words)

    monkeypatch.setattr(commitcache, "_scratch", spy)
    return calls


def test_cache_matches_scratch_after_fit_deletes_adds_and_refit(tmp_path: Path, counted: list[int]) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        assert len(counted) == 3  # the first fit: each shard from scratch, once
        check_all(ens.store)
        ens.delete([17, 42, 100])
        ens.delete([5], defer=True)
        ens.apply()
        check_all(ens.store)
        x2, y2 = blobs(90, d=10, seed=1)
        ens.add(x2, y2)  # a new slice per shard
        check_all(ens.store)
        ens.delete([601, 3])
        check_all(ens.store)
        ens.fit()
        check_all(ens.store)
        assert len(counted) == 3  # every later change: only the touched buckets
        # Every cached bucket lost: a receipt recomputes the shards in memory and still verifies.
        store = ens.store

        def lose(txn: Any) -> None:
            db = store.db(COMMITS_DB)
            for key in [bytes(k) for k in txn.cursor(db=db).iternext(values=False) if bytes(k)[4:5] == b"b"]:
                txn.delete(key, db=db)

        secret = store.secret()
        with store.read() as txn:
            mans = {
                s: shard_manifest(store, txn, secret, s, sl, write=False) for s, sl in live_slices(store, txn).items()
            }
        store.write(lose)
        deleted = [17, 42, 100, 5, 601, 3]
        needed = False
        for sid in deleted:
            receipt = ens.receipt(sid)
            assert verify_receipt(receipt, load_signer().verifier)
            # It needs the id's bucket in each shard that held it: recomputed only where that bucket is not empty.
            target = sample_commitment(sid, opening(secret, sid))
            held = [int(part["shard"]) for part in receipt["shards"]]
            needed |= any(mans[s].sizes[bucket_of(target, len(mans[s].sizes))] > 0 for s in held)
        assert (len(counted) > 3) == needed


def cached_words(store: Store) -> bytes:
    """Every value of the commitment cache, concatenated."""
    with store.read() as txn:
        return b"".join(bytes(v) for _, v in txn.cursor(db=store.db(COMMITS_DB)))


def test_a_deleted_id_leaves_the_cache_when_it_is_journaled(tmp_path: Path, counted: list[int]) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        word = (77).to_bytes(8, "big")
        commitment = sample_commitment(77, opening(ens.store.secret(), 77))
        assert word in cached_words(ens.store) and commitment in cached_words(ens.store)
        ens.delete([77], defer=True)  # journaled and erased; the retrain waits
        assert word not in cached_words(ens.store) and commitment not in cached_words(ens.store)
        ens.apply()
        check_all(ens.store)
        assert len(counted) == 3


def test_a_corrupt_or_missing_cache_is_recomputed_never_wrong(tmp_path: Path, counted: list[int]) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        store, secret = ens.store, ens.store.secret()
        with store.read() as txn:
            slices = live_slices(store, txn)[0]
        # An id whose bucket holds another commitment too: that other one is what the bucket's edit below changes.
        of = {int(i): sample_commitment(int(i), opening(secret, int(i))) for i in slices[0]}
        taken = [bucket_of(c, BUCKETS) for c in manifest_commitments(secret, slices)]
        gone = next(i for i, c in of.items() if taken.count(bucket_of(c, BUCKETS)) >= 2)
        fewer = [s[s != gone] for s in slices]  # shard 0 less one id (what a deletion leaves)
        want, bucket = scratch_root(secret, fewer), bucket_of(of[gone], BUCKETS)
        db = store.db(COMMITS_DB)
        head, bucket_key, slice_key = b"\0\0\0\0h", b"\0\0\0\0b" + bucket.to_bytes(4, "big"), b"\0\0\0\0s\0\0\0\0"

        def corrupt(key: bytes, value: bytes | None) -> None:
            def edit(txn: Any) -> None:
                if value is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, value, db=db)

            store.write(edit)

        def manifest() -> commitcache.ShardManifest:
            with store.read() as txn:
                return shard_manifest(store, txn, secret, 0, fewer, write=False)

        assert manifest().source == "cache" and manifest().root() == want and not counted[3:]
        with store.read() as txn:
            saved = {k: bytes(txn.get(k, db=db)) for k in (head, bucket_key, slice_key)}
        # In the bucket, a byte of a commitment other than the removed one (found only by the bucket's own hash).
        at = {k: 20 for k in saved}
        at[bucket_key] = 20 + (32 if saved[bucket_key][:32] == of[gone] else 0)
        flipped = {k: v[: at[k]] + bytes([v[at[k]] ^ 1]) + v[at[k] + 1 :] for k, v in saved.items()}
        for key in (head, bucket_key, slice_key):
            for value in (flipped[key], None):
                corrupt(key, value)
                man = manifest()
                assert (man.source, man.root()) == ("scratch", want), (key, value is None)
                corrupt(key, saved[key])
        assert len(counted) == 3 + 6
        # With the slices unchanged the header is trusted, but a bucket read for a receipt is checked against its root.
        corrupt(bucket_key, None)
        with store.read() as txn:
            same = shard_manifest(store, txn, secret, 0, slices, write=False)
            assert same.source == "cache" and commitcache.bucket_leaves(store, txn, same, 0, bucket) is None
        # A write after a change that touches the missing bucket recomputes the shard and writes the whole cache
        # again; the change back is then incremental.
        assert store.write(lambda txn: shard_manifest(store, txn, secret, 0, fewer, write=True)).source == "scratch"
        back = store.write(lambda txn: shard_manifest(store, txn, secret, 0, slices, write=True))
        assert (back.source, back.root()) == ("cache", scratch_root(secret, slices)) and len(counted) == 3 + 7
        check_all(store)


def test_a_large_shard_gets_more_buckets_and_a_deletion_updates_them_without_reading_its_slices(tmp_path: Path) -> None:
    with small_store(tmp_path) as (store, secret):
        # Shard 9 has no membership records at all: whatever reads the store's slices for it gets nothing.
        slices = [np.arange(0, 140_000, 2, dtype=np.int64), np.arange(1, 140_001, 2, dtype=np.int64)]
        assert commitcache.buckets_for(140_000) == 1024 and commitcache.buckets_for(7_500) == BUCKETS

        def scratch(parts: list[np.ndarray]) -> bytes:
            buckets = split(manifest_commitments(secret, parts), 1024)
            return manifest_root([len(b) for b in buckets], [bucket_root(b) for b in buckets])

        man = store.write(lambda txn: shard_manifest(store, txn, secret, 9, slices, write=True))
        assert (len(man.sizes), man.source, man.root()) == (1024, "scratch", scratch(slices))
        gone = np.array([139_999, 4, 7], dtype=np.int64)
        fewer = [s[~np.isin(s, gone)] for s in slices]
        by_slice = {r: gone[np.isin(gone, s)] for r, s in enumerate(slices)}
        store.write(lambda txn: commitcache.follow(store, txn, secret, {9: by_slice}))
        with store.read() as txn:
            db = store.db(COMMITS_DB)
            kept = [np.frombuffer(bytes(txn.get(b"\0\0\0\x09s" + r.to_bytes(4, "big"), db=db)), ">u8") for r in (0, 1)]
        assert [k.astype(np.int64).tolist() for k in kept] == [f.tolist() for f in fewer]  # the ids left it now
        with store.read() as txn:
            after = commitcache.for_publication(store, txn, secret, 9, model_record(fewer))
            # A model that trained on anything else (here: before the deletion) is not published from the cache.
            before = commitcache.for_publication(store, txn, secret, 9, model_record(slices))
            # Nor one recorded without a slices digest (before there were any): it goes by the store's slices.
            legacy = commitcache.for_publication(store, txn, secret, 9, {**model_record(fewer), "slices": None})
        assert after is not None and (after.source, after.root()) == ("cache", scratch(fewer))
        assert before is None and legacy is None
        # An id the cache never had: it missed a change, so it is brought to the store's slices (none here).
        store.write(lambda txn: commitcache.follow(store, txn, secret, {9: {0: np.array([140_002])}}))
        with store.read() as txn:
            now = commitcache.for_publication(store, txn, secret, 9, model_record([slices[0][:0]] * 2))
        assert now is not None and now.size == 0


def test_a_deletion_reads_only_the_slices_that_held_its_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_store(tmp_path) as (store, secret):
        # Shard 9 (no membership records): the cache is all there is, so a fallback would empty it.
        slices = [np.arange(0, 9_000, 3, dtype=np.int64), np.arange(1, 9_000, 3, dtype=np.int64)]
        store.write(lambda txn: shard_manifest(store, txn, secret, 9, slices, write=True))
        db = store.db(COMMITS_DB)
        head_key, other = b"\0\0\0\x09h", b"\0\0\0\x09s" + (1).to_bytes(4, "big")
        store.write(lambda txn: txn.delete(other, db=db))  # slice 1's cached ids, lost: reading them would fail
        with store.read() as txn:
            before = bytes(txn.get(head_key, db=db))
        # An id of a slice the cached model never trained on (stage 2: slices 0 and 1) changes nothing.
        store.write(lambda txn: commitcache.follow(store, txn, secret, {9: {2: np.array([9_002])}}))
        with store.read() as txn:
            assert bytes(txn.get(head_key, db=db)) == before
        gone = np.array([3_000, 3, 3], dtype=np.int64)  # both in slice 0, one named twice, out of order
        store.write(lambda txn: commitcache.follow(store, txn, secret, {9: {0: gone}}))
        fewer = [slices[0][~np.isin(slices[0], gone)], slices[1]]
        parsed: list[bool] = []
        parse = commitcache._parse
        monkeypatch.setattr(
            commitcache, "_parse", lambda raw, checked=False: parsed.append(checked) or parse(raw, checked)
        )
        with store.read() as txn:
            assert txn.get(other, db=db) is None  # never read, never rewritten
            man = commitcache.for_publication(store, txn, secret, 9, model_record(fewer))
        assert man is not None and (man.source, man.root()) == ("cache", scratch_root(secret, fewer))
        assert parsed == [True]  # the header this process wrote is known checked: its bytes are not hashed again


def test_a_receipt_from_a_shard_of_more_than_256_buckets_verifies(tmp_path: Path) -> None:
    # 70,000 samples in one shard: 512 buckets. One short epoch keeps the fit to seconds.
    x, y = blobs(70_000, d=4)
    with Ensemble.create(
        tmp_path / "st", small_config("shards=1", "slices=2", "train.epochs=1", "train.batch_size=4096")
    ) as ens:
        ens.ingest(x, y)
        ens.fit()
        with ens.store.read() as txn:
            published = latest_published(log_state(ens.store, txn).entries)
        assert published[0][1]["manifest_buckets"] == 512
        ens.delete([69_999])
        check_all(ens.store)
        receipt = ens.receipt(69_999)
        assert receipt["shards"][0]["absent"]["buckets"] == 512
        assert verify_receipt(receipt, load_signer().verifier)


def test_a_damaged_cached_slice_under_a_deletion_is_never_published_wrong(tmp_path: Path, counted: list[int]) -> None:
    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        store = ens.store
        shard, slice_ = ens.locate([77])[77][:2]
        key = shard.to_bytes(4, "big") + b"s" + slice_.to_bytes(4, "big")

        def damage(txn: Any) -> None:  # another id of the same slice replaced by one the store never had
            db = store.db(COMMITS_DB)
            words = np.frombuffer(bytes(txn.get(key, db=db)), ">u8").copy()
            other = int(np.flatnonzero(words != 77)[-1])  # its largest: the words stay sorted, as the journal needs
            words[other] = 10_000_000
            txn.put(key, words.tobytes(), db=db)

        store.write(damage)
        ens.delete([77])  # the journal takes 77 out of the damaged words; publication finds the digest wrong
        check_all(store)
        assert len(counted) == 4  # that shard once more from scratch, the others untouched


def test_removing_words_from_a_cached_slice_keeps_the_others_in_order() -> None:
    raw = np.arange(100, 110, dtype=">i8").tobytes()
    words = np.frombuffer(raw, dtype=">i8")
    for at in ([], [0], [9], [3, 4], [0, 5, 9], list(range(10))):
        positions = np.array(at, dtype=np.int64)
        assert commitcache._without(raw, positions) == np.delete(words, positions).tobytes()
