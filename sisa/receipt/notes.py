"""C2SP signed notes with Ed25519, and the ``tlog-checkpoint`` a transparency log signs.

A signed note (https://c2sp.org/signed-note) is UTF-8 text ending in a newline, a blank line, then one
line per signature: an em dash, the key name and ``base64(key hash || signature)``. The key hash is the
first four bytes of ``SHA-256(name || 0x0A || 0x01 || public key)`` (0x01: the Ed25519 algorithm byte).
A verifier key is written ``name+hash+base64(0x01 || public key)`` and a signing key
``PRIVATE+KEY+name+hash+base64(0x01 || seed)``, as Go's ``golang.org/x/mod/sumdb/note`` writes them, so
standard signed-note tools accept both. A checkpoint (https://c2sp.org/tlog-checkpoint) is a note whose
text is the log's origin line, its tree size in decimal and its root hash in base64.

Standard library and ``cryptography`` only: the receipt verifier imports it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sisa.errors import ProofError

__all__ = [
    "Checkpoint",
    "Signer",
    "Verifier",
    "format_checkpoint",
    "generate",
    "parse_checkpoint",
    "sign_note",
    "verify_note",
]

_ED25519 = b"\x01"  # the signed-note algorithm byte of Ed25519
_DASH = "\u2014 "  # a signature line starts with an em dash and a space


def _key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public).digest()[:4]


def _check_name(name: str) -> str:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise ProofError(
            f"key name {name!r} is not a signed-note key name: it must be non-empty, without spaces or '+'"
        )
    return name


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProofError(f"{what} is not valid base64") from exc


@dataclass(frozen=True)
class Verifier:
    """A note verifier: a key name and its Ed25519 public key."""

    name: str
    public: bytes

    @property
    def key_hash(self) -> bytes:
        """The four-byte key id that signature lines carry."""
        return _key_hash(self.name, self.public)

    def encode(self) -> str:
        """The verifier key as signed-note tools read it: ``name+hash+base64(0x01 || key)``."""
        return f"{self.name}+{self.key_hash.hex()}+{base64.b64encode(_ED25519 + self.public).decode()}"

    @classmethod
    def decode(cls, text: str) -> Verifier:
        """Parse ``name+hash+base64``.

        Raises:
            ProofError: If the text is not an Ed25519 verifier key, or its hash does not match.
        """
        parts = text.strip().split("+", 2)  # base64 may hold a '+' itself
        if len(parts) != 3:
            raise ProofError("a verifier key is name+hash+base64 (what `sisa keys --public` prints)")
        name, hexhash, blob = parts
        raw = _b64(blob, "the verifier key")
        if len(raw) != 33 or raw[:1] != _ED25519:
            raise ProofError("the verifier key is not an Ed25519 signed-note key (algorithm byte 0x01, 32 bytes)")
        verifier = cls(_check_name(name), raw[1:])
        if hexhash.lower() != verifier.key_hash.hex():
            raise ProofError(f"the verifier key's hash {hexhash} does not match its name and key")
        return verifier

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """A note signer: a key name and an Ed25519 private key (its 32-byte seed)."""

    name: str
    seed: bytes = field(repr=False)  # a logged or printed signer never shows its key

    # Derived once per signer: a deletion's checkpoint needs the key four times (decode, sign, the
    # signature line's key id, the verifier kept with the log), and each derivation is a scalar multiplication.
    @cached_property
    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @cached_property
    def verifier(self) -> Verifier:
        """The matching verifier."""
        return Verifier(self.name, self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of ``message``."""
        return self._key.sign(message)

    def encode(self) -> str:
        """The signing key as ``PRIVATE+KEY+name+hash+base64(0x01 || seed)``."""
        b64 = base64.b64encode(_ED25519 + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_hash.hex()}+{b64}"

    @classmethod
    def decode(cls, text: str) -> Signer:
        """Parse ``PRIVATE+KEY+name+hash+base64``.

        Raises:
            ProofError: If the text is not an Ed25519 signing key, or its hash does not match.
        """
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise ProofError("a signing key is PRIVATE+KEY+name+hash+base64 (what `sisa keys` creates)")
        raw = _b64(parts[4], "the signing key")
        if len(raw) != 33 or raw[:1] != _ED25519:
            raise ProofError("the signing key is not an Ed25519 signed-note key")
        signer = cls(_check_name(parts[2]), raw[1:])
        if parts[3].lower() != signer.verifier.key_hash.hex():
            raise ProofError("the signing key's hash does not match its name and key (the file is damaged)")
        return signer


def generate(name: str) -> Signer:
    """A new random Ed25519 signer named ``name``."""
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return Signer(_check_name(name), seed)


def sign_note(text: str, signer: Signer) -> str:
    """``text`` (ending in a newline) as a signed note carrying ``signer``'s signature."""
    if not text.endswith("\n") or "\n\n" in text:
        raise ProofError("a note's text ends in one newline and holds no blank line")
    sig = signer.sign(text.encode())
    line = base64.b64encode(signer.verifier.key_hash + sig).decode()
    return f"{text}\n{_DASH}{signer.name} {line}\n"


def verify_note(note: str, verifier: Verifier) -> str:
    """The text of ``note`` once a signature by ``verifier`` is found on it and checks.

    Raises:
        ProofError: If the note is malformed, carries no signature of this key, or that signature is wrong.
    """
    text, sep, sigs = note.partition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise ProofError("not a signed note (text, a blank line, signature lines)")
    text += "\n"
    for line in sigs[:-1].split("\n"):
        if not line.startswith(_DASH):
            raise ProofError(f"signed note: a signature line must start with an em dash: {line[:40]!r}")
        name, _, blob = line[len(_DASH) :].partition(" ")
        if name != verifier.name:
            continue
        raw = _b64(blob, "a note signature")
        if raw[:4] != verifier.key_hash:
            continue  # another key of the same name
        if len(raw) != 68 or not verifier.verify(text.encode(), raw[4:]):
            raise ProofError(f"the note's signature by {verifier.name} does not verify (the note was changed)")
        return text
    raise ProofError(f"the note is not signed by the key {verifier.encode()} (signed by another key?)")


@dataclass(frozen=True)
class Checkpoint:
    """A transparency-log checkpoint: the log's origin, its tree size and root hash."""

    origin: str
    size: int
    root: bytes


def format_checkpoint(checkpoint: Checkpoint) -> str:
    """The checkpoint's note text: origin line, decimal size, base64 root hash."""
    if not checkpoint.origin or "\n" in checkpoint.origin:
        raise ProofError("a checkpoint's origin is one non-empty line")
    return f"{checkpoint.origin}\n{checkpoint.size}\n{base64.b64encode(checkpoint.root).decode()}\n"


def parse_checkpoint(note: str, verifier: Verifier) -> Checkpoint:
    """Verify a signed checkpoint under ``verifier`` and read it.

    Raises:
        ProofError: If the signature fails, or the text is not a checkpoint.
    """
    lines = verify_note(note, verifier).split("\n")
    if len(lines) < 4 or not lines[1].isdigit() or (lines[1] != "0" and lines[1].startswith("0")):
        raise ProofError("the signed note is not a checkpoint (origin, tree size, root hash)")
    root = _b64(lines[2], "the checkpoint's root hash")
    if len(root) != 32:
        raise ProofError("the checkpoint's root hash is not 32 bytes")
    return Checkpoint(lines[0], int(lines[1]), root)
