"""The store's cipher: every sample and checkpoint is kept encrypted, so erasure can destroy keys.

Cryptographic erase (NIST SP 800-88 r1, Purge): once the key that encrypted some bytes is
gone from every file, those bytes are unrecoverable wherever copies of them lie, in free
LMDB pages or in the blocks of an unlinked file. Only the small key environment then has
to be rewritten to erase, never the bulk of the store.

The keystream is SHAKE-256 (FIPS 202) over a domain tag, a 128-bit random key and the
record's name (its id, or a checkpoint's random token), used as a stream cipher: the XOF
keyed this way is a pseudo-random function, and no (key, name) pair ever encrypts two
different plaintexts (a slice key encrypts each id once; a re-ingested id after a rolled
back ingest gets a new key; a checkpoint gets a fresh key and token at every commit).
Integrity is not the cipher's job: every plaintext carries its own digest, checked after
decryption, so a flipped ciphertext byte is caught as before.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["KEY_SIZE", "TOKEN_SIZE", "new_key", "new_token", "xor_stream"]

KEY_SIZE = 16  # bytes of every key: 128 bits
TOKEN_SIZE = 16  # bytes of a checkpoint's random name, stored in front of its ciphertext


def new_key() -> bytes:
    """A fresh random key from the OS's CSPRNG (never derived: a derived key could be derived again)."""
    return os.urandom(KEY_SIZE)


def new_token() -> bytes:
    """A fresh random checkpoint token (names the checkpoint's key in the key environment)."""
    return os.urandom(TOKEN_SIZE)


def xor_stream(key: bytes, tag: bytes, name: bytes, data: bytes | memoryview) -> bytes:
    """Encrypt or decrypt ``data`` (the same operation) under ``key`` for the record ``name``.

    Args:
        key: A :data:`KEY_SIZE`-byte key.
        tag: Domain tag of the record kind (``b"sample"``, ``b"ckpt"``), so one key can
            never produce the same stream for two kinds.
        name: The record's name within its key (an id key, a token).
        data: Plaintext or ciphertext.

    Returns:
        ``data`` XOR the keystream, as bytes.
    """
    n = len(data)
    stream = hashlib.shake_256(b"sisa-" + tag + b"|" + key + name).digest(n)
    # Python's big integers XOR a whole record in one C loop: faster than numpy for the
    # ~1 KB records of a sample, and as fast for a checkpoint's megabytes.
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")
