"""Records at rest are sealed by AES-256-GCM, bound to what they are: tampering and moving both fail, by name.

Each attack edits a real store's LMDB records as someone holding a copy of the files (but no key)
would, then reads through the store: every one must raise an IntegrityError that names the record.
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from sisa.ensemble import Ensemble
from sisa.errors import IntegrityError
from sisa.store.cipher import KEY_SIZE, NONCE_SIZE, OVERHEAD, TAG_SIZE, TOKEN_SIZE, open_record, seal_record
from sisa.store.layout import id_key, sample_ad, stage_key
from tests.conftest import blobs, small_config

X, Y = blobs(600, d=10)
LABEL_AT = NONCE_SIZE  # GCM is a counter mode: plaintext byte i sits at ciphertext byte NONCE_SIZE + i


def _store(path: Path) -> Ensemble:
    ens = Ensemble.create(path, small_config(), address="local")
    ens.ingest(X, Y)
    return ens


def _put_sample(ens: Ensemble, sid: int, sealed: bytes) -> None:
    ens.store.write(lambda txn: txn.put(id_key(sid), sealed, db=ens.store.db("samples")))


def _load(ens: Ensemble, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with ens.store.read() as txn:
        return ens.store.load_samples(txn, np.asarray(ids, dtype=np.int64), (10,))


def _where(ens: Ensemble, sid: int) -> tuple[int, int, int]:
    with ens.store.read() as txn:
        place = ens.store.place(txn, sid)
    assert place is not None
    return place


def _sealed(ens: Ensemble, sid: int) -> bytes:
    with ens.store.read() as txn:
        raw = ens.store.sealed_sample(txn, sid)
    assert raw is not None
    return raw


def test_a_record_is_its_body_with_a_nonce_and_a_full_tag(tmp_path: Path) -> None:
    with _store(tmp_path / "st") as ens:
        assert len(_sealed(ens, 0)) == 4 + 10 * 4 + NONCE_SIZE + TAG_SIZE
    assert (KEY_SIZE, TAG_SIZE, OVERHEAD) == (32, 16, 28)


def test_a_flipped_ciphertext_byte_names_the_sample(tmp_path: Path) -> None:
    with _store(tmp_path / "st") as ens:
        shard, slice_, run = _where(ens, 7)
        sealed = bytearray(_sealed(ens, 7))
        sealed[LABEL_AT + 9] ^= 0x01
        _put_sample(ens, 7, bytes(sealed))
        named = rf"sample 7 .*modified or moved: its record \(shard {shard} slice {slice_} run {run}\)"
        with pytest.raises(IntegrityError, match=named):
            _load(ens, [7])
        _load(ens, [8])  # the others still open


def test_a_flipped_tag_or_nonce_byte_is_caught_too(tmp_path: Path) -> None:
    with _store(tmp_path / "st") as ens:
        good = _sealed(ens, 3)
        for at in (0, len(good) - 1):  # the nonce's first byte, the tag's last
            bad = bytearray(good)
            bad[at] ^= 0x80
            _put_sample(ens, 3, bytes(bad))
            with pytest.raises(IntegrityError, match=r"sample 3 "):
                _load(ens, [3])


def test_a_ciphertext_moved_to_another_id_of_the_same_run_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path / "st") as ens:
        run = _where(ens, 0)
        with ens.store.read() as txn:
            mate = int(next(i for i in ens.store.run_ids(txn, *run) if i != 0))
        # Same run, same key: only the id in the associated data tells the two records apart.
        _put_sample(ens, mate, _sealed(ens, 0))
        with pytest.raises(IntegrityError, match=rf"sample {mate} "):
            _load(ens, [mate])


def test_a_ciphertext_moved_to_another_run_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path / "st") as ens:
        run0 = _where(ens, 0)
        other = next(i for i in range(1, len(X)) if _where(ens, i)[:2] != run0[:2])
        _put_sample(ens, other, _sealed(ens, 0))
        with pytest.raises(IntegrityError, match=rf"sample {other} "):
            _load(ens, [other])


def test_a_ciphertext_moved_to_another_generation_of_its_run_is_refused(tmp_path: Path) -> None:
    """An old-generation key that a crash left beside the new one must not open a record sealed for the other."""
    with _store(tmp_path / "st") as ens:
        place = _where(ens, 5)
        store = ens.store
        with store.keys.read() as ktxn:
            (gen0,) = store.keys.run_keys(ktxn, *place)
        plain = open_record(gen0.key, _sealed(ens, 5), sample_ad(id_key(5), place, 0))
        assert plain is not None
        # The same key, the right id and place, another generation: refused.
        _put_sample(ens, 5, seal_record(gen0.key, plain, sample_ad(id_key(5), place, 1)))
        with pytest.raises(IntegrityError, match=r"sample 5 "):
            _load(ens, [5])


def test_the_known_plaintext_label_edit_is_refused(tmp_path: Path) -> None:
    """Format 3's forgery: XOR a new label into the ciphertext and fix up every check value computable without a key.

    The plaintext is public here (the ingested arrays): label 3 -> 9 at the label's offset, and the
    format-3 check value (BLAKE2b over id and body) recomputed for the new body and XORed over the
    last 8 bytes, where it sat. Under the keystream that forgery opened; under GCM the tag needs the key.
    """
    with _store(tmp_path / "st") as ens:
        sid = 11
        label = int(Y[sid])
        new_label = (label + 1) % 3
        sealed = bytearray(_sealed(ens, sid))
        old_body = struct.pack("<i", label) + X[sid].astype("<f4").tobytes()
        new_body = struct.pack("<i", new_label) + old_body[4:]
        for i, (a, b) in enumerate(zip(old_body[:4], new_body[:4], strict=True)):
            sealed[LABEL_AT + i] ^= a ^ b
        old_digest = hashlib.blake2b(id_key(sid) + old_body, digest_size=8).digest()
        new_digest = hashlib.blake2b(id_key(sid) + new_body, digest_size=8).digest()
        for i in range(8):
            sealed[len(sealed) - 8 + i] ^= old_digest[i] ^ new_digest[i]
        _put_sample(ens, sid, bytes(sealed))
        with pytest.raises(IntegrityError, match=rf"sample {sid} .*modified or moved"):
            _load(ens, [sid])


def test_seals_draw_fresh_nonces_and_every_stored_nonce_is_distinct(tmp_path: Path) -> None:
    """Why a (key, nonce) pair never repeats: a random 96-bit nonce per seal, never derived from store state."""
    key, body, ad = os.urandom(KEY_SIZE), b"same plaintext", b"same record"
    nonces = {seal_record(key, body, ad)[:NONCE_SIZE] for _ in range(1000)}
    assert len(nonces) == 1000
    with _store(tmp_path / "st") as ens:
        with ens.store.read() as txn:
            stored = [bytes(v[:NONCE_SIZE]) for _, v in txn.cursor(db=ens.store.db("samples"))]
        assert len(stored) == len(X) == len(set(stored))


@pytest.mark.usefixtures("ray_session")
def test_checkpoints_flipped_or_moved_are_refused_by_name(tmp_path: Path) -> None:
    with _store(tmp_path / "st") as ens:
        ens.fit()
        store = ens.store
        with store.read() as txn:
            one, two = store.stage_record(txn, 0, 1), store.stage_record(txn, 0, 2)
            assert one is not None and two is not None
            sealed_one, sealed_two = store.sealed_checkpoint(txn, one), store.sealed_checkpoint(txn, two)
        assert sealed_one is not None and sealed_two is not None
        ckpt, stages = store.db("ckpt"), store.db("stages")

        # A flipped byte in the middle of stage 2's sealed bytes.
        bad = bytearray(sealed_two)
        bad[TOKEN_SIZE + NONCE_SIZE + 100] ^= 0x04
        store.write(lambda txn: txn.put(two["key"].encode(), bytes(bad), db=ckpt))
        with store.read() as txn, pytest.raises(IntegrityError, match=r"checkpoint of shard 0 stage 2 .*modified"):
            store.checkpoint(txn, two)

        # Stage 1's sealed bytes moved to stage 2, its unkeyed sha256 copied into stage 2's record too:
        # the token finds a live key, the digest matches, and only the bound name refuses it.
        moved = dict(two, sha256=one["sha256"])

        def move(txn: object) -> None:
            txn.put(two["key"].encode(), sealed_one, db=ckpt)  # type: ignore[attr-defined]
            txn.put(stage_key(0, 2), json.dumps(moved, sort_keys=True).encode(), db=stages)  # type: ignore[attr-defined]

        store.write(move)
        with store.read() as txn, pytest.raises(IntegrityError, match=rf"checkpoint of shard 0 stage 2 .*{two['key']}"):
            store.checkpoint(txn, moved)


@pytest.mark.usefixtures("ray_session")
def test_the_backbone_flipped_or_replaced_by_a_checkpoint_is_refused(tmp_path: Path) -> None:
    head = (
        "backbone.source=core",
        "backbone.name=mlp",
        "backbone.hidden=[16]",
        "backbone.epochs=2",
        "model.adapter=head",
    )
    with Ensemble.create(tmp_path / "st", small_config(*head), address="local") as ens:
        ens.ingest(X, Y, core=np.arange(0, len(X), 10))
        ens.fit()
        store = ens.store
        with store.read() as txn:
            backbone = store.meta(txn)["backbone"]
            stage = store.stage_record(txn, 0, 1)
            assert stage is not None
            sealed_backbone = store.sealed_checkpoint(txn, backbone)
            sealed_stage = store.sealed_checkpoint(txn, stage)
        assert sealed_backbone is not None and sealed_stage is not None
        ckpt = store.db("ckpt")

        bad = bytearray(sealed_backbone)
        bad[-1] ^= 0x10  # the tag's last byte
        store.write(lambda txn: txn.put(backbone["key"].encode(), bytes(bad), db=ckpt))
        with store.read() as txn, pytest.raises(IntegrityError, match=r"the shared backbone .*modified or moved"):
            store.backbone_bytes(txn)

        # A stage checkpoint's sealed bytes in the backbone's place, its sha256 copied into the backbone's record.
        def swap(txn: object) -> None:
            txn.put(backbone["key"].encode(), sealed_stage, db=ckpt)  # type: ignore[attr-defined]
            store.put_meta(txn, backbone=dict(backbone, sha256=stage["sha256"]))  # type: ignore[arg-type]

        store.write(swap)
        with store.read() as txn, pytest.raises(IntegrityError, match=r"the shared backbone .*modified or moved"):
            store.backbone_bytes(txn)
