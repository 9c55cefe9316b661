"""Receipts end to end: issued by a real store, checked by the verifier alone, and every forgery refused."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sisa.cli.main import main
from sisa.ensemble import Ensemble
from sisa.errors import DataError, IntegrityError, ProofError
from sisa.receipt.entries import MODEL_PUBLISHED, canonical, entry_leaf, sample_commitment
from sisa.receipt.keys import load_signer
from sisa.receipt.merkle import Tree, hash_leaf
from sisa.receipt.notes import Checkpoint, Signer, format_checkpoint, generate, sign_note
from sisa.receipt.verify import FORMAT, SIGNATURE_LABEL, verify_receipt
from sisa.unlearn import tlog
from sisa.unlearn.audit import AUDIT_DB
from sisa.unlearn.receipts import non_membership
from tests.conftest import ROOT, blobs, small_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

SIGNER = load_signer()  # the session's operator key (tests/conftest.py points SISA_SIGNING_KEY_FILE at it)
KEY = SIGNER.verifier


@pytest.fixture(scope="module")
def deleted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[int, dict[str, Any]]]:
    """A store whose request 1 deleted ids 17 and 42 (receipts returned by delete)."""
    path = tmp_path_factory.mktemp("receipts") / "st"
    x, y = blobs(600, d=10)
    with Ensemble.create(path, small_config()) as ens:
        ens.ingest(x, y)
        ens.fit()
        cert = ens.delete([17, 42], receipts=True)
    return path, cert, cert["receipts"]


def resign(receipt: dict[str, Any], signer: Signer = SIGNER) -> dict[str, Any]:
    """What an operator could do: sign whatever receipt it builds (so the signature alone catches nothing)."""
    body = {k: v for k, v in receipt.items() if k != "signature"}
    body["signature"] = base64.b64encode(signer.sign(SIGNATURE_LABEL + canonical(body))).decode()
    return body


def test_delete_returns_receipts_that_verify(deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]]) -> None:
    _, cert, receipts = deleted
    assert sorted(receipts) == [17, 42]
    receipt = receipts[17]
    assert receipt["format"] == FORMAT and receipt["id"] == 17
    assert receipt["certificate"]["entry"]["request_id"] == cert["request_id"]
    assert [s["shard"] for s in receipt["shards"]] == cert["retrained_shards"]
    done = verify_receipt(receipt, KEY)
    assert done[0].startswith("checkpoint of sisa.log/") and done[1] == "receipt signature checks"
    assert done[2] == f"certificate of request {cert['request_id']} is in the log and names the id"
    assert len(done) == 3 + len(cert["retrained_shards"])
    for item in receipt["shards"]:
        entry = item["published"]["entry"]
        shard = str(item["shard"])
        # the published entry binds the manifest commitment to the weights the certificate names
        assert entry["kind"] == MODEL_PUBLISHED and entry["weights"] == cert["shards"][shard]["live_weights"]
        assert entry["manifest"] == cert["shards"][shard]["manifest"]
    assert len(json.dumps(receipt)) < 64 * 1024
    # the opening is the subject's alone: in no certificate (they publish the keyed id hash), no log entry
    certificate = {k: v for k, v in cert.items() if k != "receipts"}
    assert receipt["id_hash"] in cert["id_hashes"] and receipt["opening"] not in json.dumps(certificate)
    with Ensemble.open(deleted[0], readonly=True) as ens:
        assert receipt["opening"] not in json.dumps(ens.certificates())


def test_the_receipt_is_not_logged_nor_stored(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    path, _, receipts = deleted
    signature = receipts[17]["signature"].encode()
    with caplog.at_level("DEBUG"):
        with Ensemble.open(path, readonly=True) as ens:
            again = ens.receipt(17)
    assert verify_receipt(again, KEY)
    assert again["signature"].encode() not in caplog.text.encode()
    for name in os.listdir(path):
        if (path / name).is_file():
            assert signature not in (path / name).read_bytes()


def test_cli_receipt_and_verifier_with_only_cryptography(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _, _ = deleted
    before = store_digest(path)
    assert main(["keys", "--public"]) == 0
    public = capsys.readouterr().out.strip()
    assert public == KEY.encode()
    out = tmp_path / "r17.json"
    assert main(["receipt", "--store", str(path), "--id", "17", "--out", str(out)]) == 0
    capsys.readouterr()
    assert out.stat().st_mode & 0o777 == 0o600
    assert store_digest(path) == before
    # A Python that sees only the standard library, cryptography (and what it needs) and sisa's
    # receipt package: no torch, Ray, numpy or LMDB can be imported there.
    lone = tmp_path / "lone"
    (lone / "sisa" / "receipt").mkdir(parents=True)
    for rel in (
        "sisa/__init__.py",
        "sisa/errors.py",
        *(f"sisa/receipt/{p.name}" for p in (ROOT / "sisa/receipt").glob("*.py")),
    ):
        shutil.copy(ROOT / rel, lone / rel)
    import cryptography

    site = Path(cryptography.__file__).parents[1]
    for name in os.listdir(site):
        if name.startswith(("cryptography", "cffi", "_cffi_backend", "pycparser")):
            os.symlink(site / name, lone / name)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(lone)}
    cmd = [sys.executable, "-S", "-X", "importtime", "-m", "sisa.receipt", str(out), "--key", public]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[1] == "ok: receipt signature checks"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    top = {name.split(".")[0] for name in imported}
    assert not top & {"torch", "ray", "numpy", "lmdb", "yaml"}
    assert not {n for n in imported if n.startswith(("sisa.store", "sisa.unlearn", "sisa.train", "sisa.cli"))}
    # the same file, one byte changed: exit 1 naming the failure
    bent = json.loads(out.read_text())
    bent["id"] = 18
    (tmp_path / "bent.json").write_text(json.dumps(bent))
    cmd[cmd.index(str(out))] = str(tmp_path / "bent.json")
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "FAIL: receipt signature" in failed.stderr
    # Several receipts at once (`rc/*` after `delete --receipts rc`): each line names its file, one bad one fails all.
    cmd[cmd.index(str(tmp_path / "bent.json"))] = str(out)
    cmd.insert(cmd.index(str(out)) + 1, str(out))
    both = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert both.returncode == 0 and both.stdout.count(f"{out}: ok: receipt signature checks") == 2
    cmd.insert(cmd.index(str(out)) + 1, str(tmp_path / "bent.json"))
    mixed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert mixed.returncode == 1 and f"{tmp_path / 'bent.json'}: FAIL: receipt signature" in mixed.stderr
    assert "1 of 3 receipts failed" in mixed.stderr and mixed.stdout.count("ok: receipt signature checks") == 2


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every scalar in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path


def edited(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value[:-2] + ("A" if value[-2:-1] != "A" else "B") + value[-1:] if len(value) > 1 else value + "x"
    return "x"  # None


def test_a_receipt_edited_in_any_field_is_refused(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]],
) -> None:
    receipt = deleted[2][17]
    paths = list(leaves(receipt))
    assert len(paths) > 50
    for path in paths:
        bent = copy.deepcopy(receipt)
        holder = bent
        for step in path[:-1]:
            holder = holder[step]
        holder[path[-1]] = edited(holder[path[-1]])
        with pytest.raises(ProofError):
            verify_receipt(bent, KEY)


def test_a_checkpoint_signed_by_another_key_is_refused(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]],
) -> None:
    receipt = deleted[2][17]
    other = generate(KEY.name)  # another key, even under the operator's key name
    text = receipt["checkpoint"].split("\n\n")[0] + "\n"
    forged = resign({**receipt, "checkpoint": sign_note(text, other)})
    with pytest.raises(ProofError, match="not signed by the key"):
        verify_receipt(forged, KEY)
    with pytest.raises(ProofError, match="not signed by the key"):
        verify_receipt(receipt, other.verifier)  # the right receipt, checked with another key


def test_a_proof_for_another_id_is_refused(deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]]) -> None:
    receipts = deleted[2]
    # id 42's certificate and proofs, under id 17's name and opening (both ids are in the same certificate)
    swapped = resign({**receipts[42], **{k: receipts[17][k] for k in ("id", "opening", "id_hash")}})
    with pytest.raises(ProofError, match="for another commitment"):
        verify_receipt(swapped, KEY)


def test_a_log_rewritten_after_the_receipt_fails_consistency(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receipt = deleted[2][17]
    path = tmp_path / "copy"
    shutil.copytree(deleted[0], path)
    kept = tmp_path / "kept.checkpoint"
    kept.write_text(receipt["checkpoint"])
    with Ensemble.open(path) as ens:
        ens.delete([5])  # the log grows honestly
    assert main(["audit", "--store", str(path), "--consistency", str(kept), "--json"]) == 0
    grown = json.loads(capsys.readouterr().out)
    assert grown["ok"] is True and grown["new"]["size"] > grown["old"]["size"] == int(
        receipt["checkpoint"].split("\n")[1]
    )
    assert verify_receipt(receipt, KEY, grown)[-1].startswith("the log grew from")
    assert main(["audit", "--store", str(path)]) == 0
    capsys.readouterr()
    # Now the operator rewrites an old entry (shard 0's first publication) and signs a new checkpoint.
    with Ensemble.open(path) as ens:
        store = ens.store

        def rewrite(txn: Any) -> None:
            raw = json.loads(bytes(txn.get(struct.pack(">Q", 0), db=store.db(AUDIT_DB))))
            raw["entry"]["published_at"] += 1
            txn.put(struct.pack(">Q", 0), json.dumps(raw).encode(), db=store.db(AUDIT_DB))
            tlog.sign_checkpoint(store, txn, SIGNER)

        store.write(rewrite)
    assert main(["audit", "--store", str(path), "--consistency", str(kept), "--json"]) == 1
    rewritten = json.loads(capsys.readouterr().out)
    assert rewritten["ok"] is False
    with pytest.raises(ProofError, match="the log was rewritten after the receipt was issued"):
        verify_receipt(receipt, KEY, rewritten)


def test_a_manifest_that_still_contains_the_id_is_refused() -> None:
    """A log (built here) whose published manifest holds the id: the issuer cannot prove it, the verifier refuses."""
    opening = bytes(range(32))
    target = sample_commitment(7, opening)
    others = sorted(sample_commitment(i, bytes([i]) * 32) for i in range(1, 60))
    # three commitments on either side of the id's, so its leaf has neighbours both ways
    commitments = [c for c in others if c < target][-3:] + [target] + [c for c in others if c > target][:3]
    manifest = Tree([hash_leaf(c) for c in commitments])
    with pytest.raises(IntegrityError, match="still contains this id"):
        non_membership(commitments, manifest, target)
    cert = {"request_id": 1, "state": "applied", "id_hashes": ["ab" * 32], "shards": {"0": {}}}
    published = {
        "kind": MODEL_PUBLISHED,
        "shard": 0,
        "weights": "w",
        "manifest_commitment": manifest.root().hex(),
        "manifest_size": len(commitments),
    }
    log = Tree([entry_leaf(cert), entry_leaf(published)])
    note = sign_note(format_checkpoint(Checkpoint("sisa.log/test", 2, log.root())), SIGNER)
    at = commitments.index(target)

    def leaf(i: int) -> dict[str, Any]:
        return {"index": i, "commitment": commitments[i].hex(), "proof": [p.hex() for p in manifest.inclusion_proof(i)]}

    def receipt(left: int, right: int) -> dict[str, Any]:
        return resign(
            {
                "format": FORMAT,
                "id": 7,
                "id_hash": "ab" * 32,
                "opening": opening.hex(),
                "checkpoint": note,
                "certificate": {"index": 0, "entry": cert, "proof": [p.hex() for p in log.inclusion_proof(0)]},
                "shards": [
                    {
                        "shard": 0,
                        "published": {
                            "index": 1,
                            "entry": published,
                            "proof": [p.hex() for p in log.inclusion_proof(1)],
                        },
                        "absent": {
                            "commitment": target.hex(),
                            "size": len(commitments),
                            "left": leaf(left),
                            "right": leaf(right),
                        },
                    }
                ],
            }
        )

    with pytest.raises(ProofError, match="still contains the id"):
        verify_receipt(receipt(at - 1, at), KEY)
    with pytest.raises(ProofError, match="not adjacent"):
        verify_receipt(receipt(at - 1, at + 1), KEY)  # skipping the id's own leaf


def test_receipt_of_an_id_not_deleted_or_pending_is_refused(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "copy"
    shutil.copytree(deleted[0], path)
    with Ensemble.open(path) as ens:
        ens.delete([99], defer=True)
    before = store_digest(path)
    with Ensemble.open(path, readonly=True) as ens:
        with pytest.raises(DataError, match="id 5 was never deleted"):
            ens.receipt(5)
        with pytest.raises(DataError, match="not applied yet"):
            ens.receipt(99)
    assert main(["receipt", "--store", str(path), "--id", "5"]) == 2
    assert "never deleted" in capsys.readouterr().err
    assert store_digest(path) == before


def test_cli_delete_writes_receipts_and_no_store_file_holds_the_signing_key(
    deleted: tuple[Path, dict[str, Any], dict[int, dict[str, Any]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "copy"
    shutil.copytree(deleted[0], path)
    folder = tmp_path / "receipts"
    before = store_digest(path)
    assert main(["delete", "--store", str(path), "--ids", "5", "--defer", "--receipts", str(folder)]) == 2
    assert "--receipts needs the deletion applied" in capsys.readouterr().err
    assert store_digest(path) == before and not folder.exists()
    assert main(["delete", "--store", str(path), "--ids", "5", "6", "--receipts", str(folder), "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)
    assert "receipts" not in cert and cert["receipt_files"] == [
        str(folder / "receipt-5.json"),
        str(folder / "receipt-6.json"),
    ]
    for name in cert["receipt_files"]:
        assert Path(name).stat().st_mode & 0o777 == 0o600
        assert verify_receipt(json.loads(Path(name).read_text()), KEY)
    # the base64 of the signing key's seed: the fifth field, split at most four times (base64 holds "+" too; the
    # last piece after every "+" could be two letters, found by chance among the store's random bytes)
    secret = SIGNER.encode().split("+", 4)[-1].encode()
    assert len(secret) == 44
    for file in path.rglob("*"):
        if file.is_file():
            assert SIGNER.seed not in file.read_bytes() and secret not in file.read_bytes()
