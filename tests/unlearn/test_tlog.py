"""The audit log as a transparency log: migration of an HMAC-only log, audit checks, checkpoints on the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.errors import ProofError
from sisa.receipt.entries import MODEL_PUBLISHED, entry_leaf, is_certificate
from sisa.receipt.keys import load_signer
from sisa.receipt.merkle import Frontier, Tree
from sisa.receipt.notes import Checkpoint, format_checkpoint, generate, parse_checkpoint, sign_note
from sisa.receipt.verify import verify_receipt
from sisa.unlearn import tlog
from sisa.unlearn.audit import AUDIT_DB, append_entry, read_entries
from tests.conftest import blobs, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

SIGNER = load_signer()
KEY = SIGNER.verifier


def as_before_the_log(path: Path) -> list[bytes]:
    """Rewrite a store's log as the code before the transparency log wrote it: certificates only, HMAC chain, no tree.

    Returns:
        The raw stored records of the certificates.
    """
    with Ensemble.open(path) as ens:
        store = ens.store
        secret = store.secret()

        def strip(txn: Any) -> list[bytes]:
            records = read_entries(store, txn)
            for rec in records:
                txn.delete(struct.pack(">Q", rec["_key"]), db=store.db(AUDIT_DB))
            store.put_meta(txn, audit_head=None, log_checkpoint=None, log_origin=None, log_key=None, log_index=None)
            for rec in records:
                if is_certificate(rec["entry"]):
                    append_entry(store, txn, secret, rec["entry"])
            return [bytes(v) for _, v in txn.cursor(db=store.db(AUDIT_DB))]

        return store.write(strip)


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, list[bytes], dict[str, Any]]:
    path = tmp_path / "st"
    x, y = blobs(600, d=10)
    with Ensemble.create(path, small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        cert = ens.delete([17])
    return path, as_before_the_log(path), cert


def test_an_hmac_only_log_becomes_the_first_leaves_at_the_next_writable_open(
    old: tuple[Path, list[bytes], dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, records, cert = old
    with Ensemble.open(path, readonly=True) as reader:
        report = reader.audit()
        assert report.ok is False and report.entries == 1 and report.log_size == 1
        assert report.problems == [
            "the log's 1 entries are under no signed checkpoint (written before the log was signed): "
            "open the store writable once (`sisa resume`) to sign its first checkpoint"
        ]
    with Ensemble.open(path) as ens:  # the migration: nothing lost, the live models published, one checkpoint
        with ens.store.read() as txn:
            state = tlog.log_state(ens.store, txn)
            stored = [bytes(v) for _, v in txn.cursor(db=ens.store.db(AUDIT_DB))]
        assert stored[:1] == records  # the old record, byte for byte
        kinds = [r["entry"].get("kind") for r in state.entries]
        assert kinds == [None, MODEL_PUBLISHED, MODEL_PUBLISHED, MODEL_PUBLISHED]
        cp = parse_checkpoint(str(state.checkpoint), KEY)
        assert cp.size == 4 and cp.root == Tree([entry_leaf(r["entry"]) for r in state.entries]).root()
        report = ens.audit()
        assert report.ok and report.entries == 1 and report.log_size == 4, report.problems
        assert [c["request_id"] for c in ens.certificates()] == [cert["request_id"]]
        assert verify_receipt(ens.receipt(17), KEY)
    before = store_digest(path)
    with Ensemble.open(path):  # signed and published: a later open writes nothing
        pass
    assert store_digest(path) == before
    assert main(["audit", "--store", str(path), "--checkpoint"]) == 0
    assert capsys.readouterr().out == state.checkpoint


def test_each_checkpoint_signs_the_whole_trees_head_from_the_index_even_a_lost_or_stale_one(tmp_path: Path) -> None:
    def check(ens: Ensemble) -> dict[str, Any]:
        """The index and the signed checkpoint agree with the whole log recomputed; returns the stored index."""
        with ens.store.read() as txn:
            index, state = tlog.log_index(ens.store, txn), tlog.log_state(ens.store, txn)
            stored = ens.store.meta(txn)["log_index"]
        assert (index.frontier.size, index.frontier.root()) == (state.tree.size, state.tree.root())
        want = {s: (i, e["checkpoint"]) for s, (i, e) in tlog.latest_published(state.entries).items()}
        assert index.published == want
        cp = parse_checkpoint(str(state.checkpoint), KEY)
        assert (cp.size, cp.root) == (state.tree.size, state.tree.root())
        assert ens.audit().ok
        return dict(stored)

    x, y = blobs(600, d=10)
    with Ensemble.create(tmp_path / "st", small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        after_fit = check(ens)
        ens.delete([17, 300])
        ens.delete([5], defer=True)
        ens.apply()
        grown = check(ens)
        assert grown["size"] > after_fit["size"]
        # A store whose index is lost (or written before it) is indexed again from its first entry ...
        ens.store.write(lambda txn: ens.store.put_meta(txn, log_index=None))
        ens.delete([42])
        check(ens)
        # ... and a stale one (an older index) catches up over the entries after it.
        ens.store.write(lambda txn: ens.store.put_meta(txn, log_index=after_fit))
        ens.delete([43])
        check(ens)
        # One that claims more entries than the log has is not trusted.
        longer = Frontier(grown["size"], [bytes.fromhex(h) for h in grown["frontier"]])
        for _ in range(50):
            longer.append(bytes(32))
        claim = {**grown, "size": longer.size, "frontier": [h.hex() for h in longer.nodes]}
        ens.store.write(lambda txn: ens.store.put_meta(txn, log_index=claim))
        ens.delete([44])
        check(ens)


def test_audit_names_an_edited_entry_an_unsigned_one_and_another_key(
    old: tuple[Path, list[bytes], dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = old[0]
    with Ensemble.open(path) as ens:
        store = ens.store
        assert ens.audit().ok
        other = generate("someone-else")
        assert ens.audit(other.verifier.encode()).problems == [
            f"latest checkpoint: the note is not signed by the key {other.verifier.encode()} (signed by another key?)"
        ]
        assert main(["audit", "--store", str(path), "--key", other.verifier.encode()]) == 1
        capsys.readouterr()
        elsewhere = sign_note(format_checkpoint(Checkpoint("sisa.log/another", 1, bytes(32))), SIGNER)
        with pytest.raises(ProofError, match="the kept checkpoint is of log 'sisa.log/another'"):
            ens.consistency(elsewhere)
        with pytest.raises(ProofError, match="not signed by the key"):
            ens.consistency(sign_note(format_checkpoint(Checkpoint("x", 1, bytes(32))), other))

        def edit(txn: Any) -> None:  # an old entry rewritten together with its HMAC chain is still caught
            raw = json.loads(bytes(txn.get(struct.pack(">Q", 1), db=store.db(AUDIT_DB))))
            raw["entry"]["weights"] = "0" * 64
            txn.put(struct.pack(">Q", 1), json.dumps(raw).encode(), db=store.db(AUDIT_DB))

        store.write(edit)
        problems = ens.audit().problems
        assert (
            "the Merkle root of the log's first 4 entries differs from the signed checkpoint's "
            "(an entry was edited, removed, inserted or reordered)"
        ) in problems
        assert main(["audit", "--store", str(path)]) == 1
        capsys.readouterr()
