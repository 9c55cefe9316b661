"""The store's cipher: every sample, checkpoint and backbone is sealed with AES-256-GCM (an AEAD).

Sealing does two jobs. Confidentiality makes erasure cheap: once the key that sealed some
bytes is gone from every file, those bytes are unrecoverable wherever copies of them lie (free
LMDB pages, blocks of an unlinked file), so only the small key environment is rewritten to
erase. Authentication makes the records trustworthy: the GCM tag is keyed, and covers the
ciphertext and *associated data* naming what the record is (kind, id, shard, slice, run and key
generation for a sample; token and store key for a checkpoint or the backbone). Without the key
nobody can change a record, fix up a check value, or move a ciphertext to another id, run or
checkpoint: :func:`open_record` fails, and the store raises an
:class:`~sisa.errors.IntegrityError` naming the record.

AES-256-GCM comes from ``cryptography`` (OpenSSL underneath, AES-NI and carry-less multiply
in hardware). Measured here (2 cores with AES-NI/VAES): 1.5 GB/s on 1 KB records and 8.7 GB/s
on 5 MiB blobs, against 0.7 and 3.4 GB/s for ChaCha20-Poly1305, and 0.11 GB/s for the SHAKE-256
keystream it replaces (docs/benchmarks.md, ``scripts/bench_erasure.py``).

Why a (key, nonce) pair never seals two plaintexts. GCM loses both secrecy and authenticity if
one key seals two messages under one nonce, so:

- Every seal draws a fresh 96-bit nonce from the OS's CSPRNG and stores it in front of the
  ciphertext. Nothing about the nonce depends on store state (ids, generations, counters), so
  no crash, rolled-back ingest or retried transaction can replay one: a repeat needs two random
  draws to collide.
- Every key seals few records. A run key seals the ids of one run, at most
  :data:`~sisa.store.layout.RUN_MAX` (508) at a time, once each, and a run that loses ids gets
  a new key (a deletion, a taken-back ingest); a checkpoint or backbone key seals exactly one
  blob. Counting retries, crashes and refills generously, a key seals q < 2**20 records, so the
  chance that any two of its nonces collide is below q**2 / 2**97 < 2**-57, far under NIST SP
  800-38D's 2**-32 bound for random nonces (which allows 2**32 seals per key).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "TOKEN_SIZE",
    "new_key",
    "new_token",
    "open_record",
    "seal_record",
    "seal_records",
]

KEY_SIZE = 32  # bytes of every key: AES-256
NONCE_SIZE = 12  # bytes of GCM's nonce: 96 bits, drawn at random for every seal
TAG_SIZE = 16  # bytes of GCM's authentication tag (the full 128 bits; never truncated)
OVERHEAD = NONCE_SIZE + TAG_SIZE  # what sealing adds to a plaintext: the nonce in front, the tag behind
TOKEN_SIZE = 16  # bytes of a checkpoint's random name, stored in front of its sealed bytes


def new_key() -> bytes:
    """A fresh random key from the OS's CSPRNG (never derived: a derived key could be derived again)."""
    return os.urandom(KEY_SIZE)


def new_token() -> bytes:
    """A fresh random checkpoint token (names the checkpoint's key in the key environment)."""
    return os.urandom(TOKEN_SIZE)


@functools.lru_cache(maxsize=256)
def _aead(key: bytes) -> AESGCM:
    """The AES-GCM context of ``key``, kept for the next records under it.

    Building one costs about as much as sealing a 1 KB record (the key schedule), and a
    re-encryption opens and seals hundreds of records under the same two keys. The cache holds
    the last 256 keys this process used: like every key a process has read, a destroyed one may
    linger in memory until then (erasure is about the store's files; README, Erasure).
    """
    return AESGCM(key)


def seal_record(key: bytes, plaintext: bytes | memoryview, associated: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` under ``key``, bound to ``associated``.

    Args:
        key: A :data:`KEY_SIZE`-byte key.
        plaintext: The record's bytes.
        associated: What the record is (kind, name, place, generation): not stored, but
            needed again, byte for byte, to open it.

    Returns:
        ``nonce || ciphertext || tag``: :data:`OVERHEAD` bytes longer than ``plaintext``.
    """
    return seal_records(key, [(plaintext, associated)])[0]


def seal_records(key: bytes, items: Sequence[tuple[bytes | memoryview, bytes]]) -> list[bytes]:
    """:func:`seal_record` for many records under one key: one CSPRNG draw for all their nonces.

    Each nonce is still 96 fresh random bits (a slice of one ``os.urandom`` read is as random
    as a read of its own); one read per batch saves a system call per record, which showed in
    re-encryption and ingest, where the cipher itself costs little per record (docs/benchmarks.md,
    "Erasure with AES-256-GCM against the keystream").

    Args:
        key: A :data:`KEY_SIZE`-byte key.
        items: ``(plaintext, associated)`` of each record.

    Returns:
        Each record's ``nonce || ciphertext || tag``, in order.
    """
    aead = _aead(key)
    pool = os.urandom(NONCE_SIZE * len(items))  # random per seal: see the module docstring for why it never repeats
    out = []
    for i, (plaintext, associated) in enumerate(items):
        nonce = pool[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
        out.append(nonce + aead.encrypt(nonce, plaintext, associated))
    return out


def open_record(key: bytes, sealed: bytes | memoryview, associated: bytes) -> bytes | None:
    """The plaintext of a :func:`seal_record` output, or None if it fails to authenticate.

    None means: another key, other associated data (the record was moved or mislabelled), or
    bytes changed after sealing. The caller names the record in its error.

    Args:
        key: A :data:`KEY_SIZE`-byte key.
        sealed: ``nonce || ciphertext || tag``.
        associated: The associated data it was sealed with.
    """
    if len(sealed) < OVERHEAD:
        return None
    view = memoryview(sealed)
    try:
        return _aead(key).decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], associated)
    except InvalidTag:
        return None
