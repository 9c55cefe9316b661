"""A store's models: stage checkpoints and their records, each shard's live model, the backbone and the combiner.

Checkpoints are sealed under a key of their own (the key sweep of an erasure destroys the
keys of retired ones). Every write here runs inside a caller's transaction, so a logical
change composed of several of them stays atomic.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import lmdb

from sisa.config.settings import SisaConfig
from sisa.errors import IntegrityError, StoreChangedError
from sisa.store.cipher import TOKEN_SIZE, new_key, new_token, open_record, seal_record
from sisa.store.digests import recipe_digest, sha256
from sisa.store.layout import StoreHost, checkpoint_ad, shard_key, stage_key

__all__ = ["CheckpointRecords"]


class CheckpointRecords(StoreHost):
    """Checkpoint and model records: a base of :class:`~sisa.store.database.Store`, which provides the host."""

    def stage_record(self, txn: lmdb.Transaction, shard: int, stage: int) -> dict[str, Any] | None:
        """The committed record of a stage checkpoint, or None."""
        raw = txn.get(stage_key(shard, stage), db=self._dbs["stages"])
        return json.loads(bytes(raw)) if raw is not None else None

    def stage_records(self, txn: lmdb.Transaction, shard: int) -> list[dict[str, Any]]:
        """All stage records of a shard, in stage order."""
        out = []
        cur = txn.cursor(db=self._dbs["stages"])
        prefix = struct.pack(">I", shard)
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:4] != prefix:
                    break
                out.append(json.loads(bytes(value)))
        return out

    def checkpoint(self, txn: lmdb.Transaction, record: dict[str, Any]) -> bytes:
        """Checkpoint bytes of a stage record, checked against the recorded sha256.

        Raises:
            IntegrityError: If the bytes are missing or altered.
        """
        where = f"shard {record['shard']} stage {record['stage']} (trained on slices 0..{record['stage'] - 1})"
        return self._open_checkpoint(txn, record, where)

    def sealed_checkpoint(self, txn: lmdb.Transaction, record: dict[str, Any]) -> bytes | None:
        """The stored (encrypted) bytes of a stage's checkpoint, as on disk; None if absent. For audits and tests."""
        raw = txn.get(record["key"].encode(), db=self._dbs["ckpt"])
        return bytes(raw) if raw is not None else None

    def recipe_digest(self, txn: lmdb.Transaction, config: SisaConfig) -> str:
        """The recipe digest stages are keyed by now: ``config``'s, with the stored backbone's digest.

        A config with a backbone and none stored yet (before its first fit) gets a digest no
        stored stage has, so nothing counts as trained until the backbone exists.
        """
        if not config.backbone.enabled:
            return recipe_digest(config)
        record = self.meta(txn).get("backbone")
        return recipe_digest(config, record["digest"] if record else "none stored")

    def backbone_bytes(self, txn: lmdb.Transaction) -> tuple[dict[str, Any], bytes] | None:
        """The shared backbone's record (meta ``backbone``) and its bytes, checked; None if none is stored.

        Raises:
            IntegrityError: If its bytes are missing or altered.
        """
        return self._stored_bytes(txn, "backbone", "the shared backbone")

    def put_backbone(self, txn: lmdb.Transaction, record: dict[str, Any], sealed: bytes) -> None:
        """Store a backbone (``record``: ``key``, ``sha256``, ``digest``, ...) in place of the old one, in ``txn``.

        The old bytes go in the same transaction; their key is destroyed by the next key sweep.
        """
        self._replace_stored(txn, "backbone", record, sealed)

    def combiner_bytes(self, txn: lmdb.Transaction) -> tuple[dict[str, Any], bytes] | None:
        """The stored combiner's record (meta ``combiner``) and its bytes, checked; None if none is stored.

        Raises:
            IntegrityError: If its bytes are missing or altered.
        """
        return self._stored_bytes(txn, "combiner", "the combiner")

    def put_combiner(self, txn: lmdb.Transaction, record: dict[str, Any], sealed: bytes) -> None:
        """Store a combiner (``record``: ``key``, ``sha256``, ``basis``, ...) in place of the old one, in ``txn``."""
        self._replace_stored(txn, "combiner", record, sealed)

    def _stored_bytes(self, txn: lmdb.Transaction, name: str, where: str) -> tuple[dict[str, Any], bytes] | None:
        """The record of the meta's ``name`` (one per store: the backbone, the combiner) and its checked bytes."""
        record = self.meta(txn).get(name)
        if record is None:
            return None
        return record, self._open_checkpoint(txn, record, where)

    def _replace_stored(self, txn: lmdb.Transaction, name: str, record: dict[str, Any], sealed: bytes) -> None:
        """Store the meta's ``name`` (``record`` and its sealed bytes), deleting the old bytes in ``txn``."""
        old = self.meta(txn).get(name)
        if old is not None and old["key"] != record["key"]:
            txn.delete(old["key"].encode(), db=self._dbs["ckpt"])
        txn.put(record["key"].encode(), sealed, db=self._dbs["ckpt"])
        self.put_meta(txn, **{name: record})

    def drop_combiner(self, txn: lmdb.Transaction) -> None:
        """Delete the stored combiner (bytes and record), in ``txn``; its key goes at the next key sweep."""
        old = self.meta_value(txn, "combiner")  # one key: set_live runs this in every retrain's commit
        if old is not None:
            txn.delete(old["key"].encode(), db=self._dbs["ckpt"])
            txn.delete(b"combiner", db=self._dbs["meta"])

    def _open_checkpoint(self, txn: lmdb.Transaction, record: dict[str, Any], where: str) -> bytes:
        """Open the ``ckpt`` entry named by ``record["key"]`` (bound to that name) and check ``record["sha256"]``."""
        raw = txn.get(record["key"].encode(), db=self._dbs["ckpt"])
        if raw is None:
            raise IntegrityError(f"checkpoint of {where} is missing from store {self.path}")
        token = bytes(raw[:TOKEN_SIZE])
        with self.key_snapshot(txn) as ktxn:
            key = self.keys.checkpoint_key(ktxn, token)
        if key is None:
            if self.changed_since(txn):
                raise StoreChangedError(
                    f"store {self.path} changed while the checkpoint of {where} was read (it was retired); read again"
                )
            raise IntegrityError(
                f"checkpoint of {where} in store {self.path} has no key (keys/ is damaged or was replaced); "
                "restore the store from a backup"
            )
        blob = open_record(key, memoryview(raw)[TOKEN_SIZE:], checkpoint_ad(token, record["key"]))
        if blob is None:
            raise IntegrityError(
                f"checkpoint of {where} (store key {record['key']}) in store {self.path} was modified or moved: "
                "its bytes fail to authenticate under its key; `sisa resume` after removing it, or restore the "
                "store from a backup"
            )
        if sha256(blob) != record["sha256"]:
            raise IntegrityError(
                f"checkpoint of {where} was modified: its sha256 does not match the record; "
                "`sisa resume` after removing it, or restore the store from a backup"
            )
        return blob

    def live(self, txn: lmdb.Transaction) -> dict[int, dict[str, Any]]:
        """Live-model record of every shard that has one."""
        return {struct.unpack(">I", k)[0]: json.loads(bytes(v)) for k, v in txn.cursor(db=self._dbs["live"])}

    def seal_checkpoint(self, blob: bytes, name: str) -> bytes:
        """Seal checkpoint bytes under a fresh key, committed to the key environment first.

        Args:
            blob: The checkpoint (or backbone) bytes.
            name: Its key in the ``ckpt`` table (a stage record's ``key``, or the backbone's):
                the seal is bound to it, so the bytes open under no other name.

        Returns:
            What :meth:`commit_stage` stores: the key's token, then the sealed bytes.
        """
        token, key = new_token(), new_key()
        self.keys.put_checkpoint_key(token, key)
        return token + seal_record(key, blob, checkpoint_ad(token, name))

    def checkpoint_keys(self, txn: lmdb.Transaction) -> list[str]:
        """Key of every checkpoint stored (live, stage or retained stale), sorted."""
        cur = txn.cursor(db=self._dbs["ckpt"])  # keys only: a checkpoint's bytes are megabytes
        return [bytes(k).decode() for k in cur.iternext(keys=True, values=False)]

    def commit_stage(self, txn: lmdb.Transaction, record: dict[str, Any], sealed: bytes, live: bool) -> None:
        """Store a finished stage checkpoint, inside the caller's write transaction.

        A stage whose key changed invalidates every later stage of the shard (they
        descend from the old checkpoint): their records and bytes go in the same
        transaction, and so does a live pointer to one of them.

        Args:
            txn: Open write transaction.
            record: JSON-able stage record (``shard``, ``stage``, ``key``, ``sha256``, ...).
            sealed: The checkpoint as :meth:`seal_checkpoint` encrypted it.
            live: Whether this stage is the shard's last, making it the live model.
        """
        shard, stage = record["shard"], record["stage"]
        stages, ckpts = self._dbs["stages"], self._dbs["ckpt"]
        old = self.stage_record(txn, shard, stage)
        if old is not None and old["key"] != record["key"]:
            for later in self.stage_records(txn, shard):
                if later["stage"] >= stage:
                    txn.delete(later["key"].encode(), db=ckpts)
                    txn.delete(stage_key(shard, later["stage"]), db=stages)
            self.set_live(txn, shard, None)
        txn.put(record["key"].encode(), sealed, db=ckpts)
        txn.put(stage_key(shard, stage), json.dumps(record, sort_keys=True).encode(), db=stages)
        if live:
            fields = ("stage", "key", "sha256", "weights", "manifest", "slices", "n_samples", "domain")
            self.set_live(txn, shard, {k: record[k] for k in fields if k in record})

    def set_live(self, txn: lmdb.Transaction, shard: int, record: dict[str, Any] | None) -> None:
        """Point ``shard``'s live model at ``record`` (None: out of service), in the caller's transaction.

        A live model that no stage record references (one kept by the serve-stale policy
        after a deletion retired its stage) has nothing else pointing at its bytes: they
        are deleted with the pointer, since that model trained on deleted ids.

        Args:
            txn: Open write transaction.
            shard: Shard index.
            record: The live record (``stage``, ``key``, ``sha256``, ...), or None.
        """
        lives = self._dbs["live"]
        old_raw = txn.get(shard_key(shard), db=lives)
        new_raw = None if record is None else json.dumps(record, sort_keys=True).encode()
        if (bytes(old_raw) if old_raw is not None else None) != new_raw:
            # The combiner is fitted on the live models' outputs: once one of them changes (retrained,
            # out of service, stale or interim under a pending deletion) it is derived from a model
            # that no longer serves as it did, maybe one that saw deleted ids. It goes in the same
            # transaction; a fit refits it, and a prediction meanwhile fits one on what it serves.
            self.drop_combiner(txn)
        if old_raw is not None:
            old_key = json.loads(bytes(old_raw))["key"]
            if (record is None or record["key"] != old_key) and not self._key_in_stages(txn, shard, old_key):
                txn.delete(old_key.encode(), db=self._dbs["ckpt"])
        if new_raw is None:
            txn.delete(shard_key(shard), db=lives)
        else:
            txn.put(shard_key(shard), new_raw, db=lives)

    def _key_in_stages(self, txn: lmdb.Transaction, shard: int, key: str) -> bool:
        return any(r["key"] == key for r in self.stage_records(txn, shard))
