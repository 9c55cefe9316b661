"""Signed notes and checkpoints against the golang.org/x/mod/sumdb/note reference example."""

from __future__ import annotations

import pytest

from sisa.errors import ProofError
from sisa.receipt.notes import (
    Checkpoint,
    Signer,
    Verifier,
    format_checkpoint,
    generate,
    parse_checkpoint,
    sign_note,
    verify_note,
)

# The example of Go's sumdb/note package documentation (keys, text and signed note).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (
    GO_TEXT
    + "\n\u2014 PeterNeumann "
    + "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_keys_and_signature_match_go_byte_for_byte() -> None:
    signer = Signer.decode(GO_SKEY)
    assert signer.encode() == GO_SKEY
    assert signer.verifier.encode() == GO_VKEY
    assert Verifier.decode(GO_VKEY) == signer.verifier
    assert sign_note(GO_TEXT, signer) == GO_NOTE  # Ed25519 is deterministic
    assert verify_note(GO_NOTE, Verifier.decode(GO_VKEY)) == GO_TEXT


def test_a_changed_note_or_another_key_is_refused() -> None:
    verifier = Verifier.decode(GO_VKEY)
    with pytest.raises(ProofError, match="does not verify"):
        verify_note(GO_NOTE.replace("cryptography", "cryptographY"), verifier)
    other = generate("PeterNeumann")  # same name, other key: its hash differs
    with pytest.raises(ProofError, match="not signed by the key"):
        verify_note(sign_note(GO_TEXT, other), verifier)
    with pytest.raises(ProofError, match="hash"):
        Verifier.decode(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def test_checkpoint_round_trip() -> None:
    signer = generate("sisa-test")
    cp = Checkpoint("sisa.test/log", 7, bytes(range(32)))
    note = sign_note(format_checkpoint(cp), signer)
    assert note.splitlines()[:3] == ["sisa.test/log", "7", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]
    assert parse_checkpoint(note, signer.verifier) == cp
    with pytest.raises(ProofError, match="does not verify"):
        parse_checkpoint(note.replace("\n7\n", "\n8\n"), signer.verifier)


def test_a_signer_never_shows_its_key_and_signs_the_same_after_its_first_use() -> None:
    signer = Signer.decode(GO_SKEY)
    seed_text = (signer.seed.hex(), repr(signer.seed), str(signer.seed))
    assert not any(part in repr(signer) or part in str(signer) for part in seed_text)
    first = sign_note(GO_TEXT, signer)
    # The key derived once and kept: the same signature (Ed25519 is deterministic) and the same verifier.
    assert sign_note(GO_TEXT, signer) == first == GO_NOTE
    assert signer.verifier == Verifier.decode(GO_VKEY)
    assert signer == Signer.decode(GO_SKEY)  # equality is still by name and key
