"""The store's HMAC secret: in the store directory (``hmac.key``) or outside it (``SISA_SECRET_FILE``).

One 32-byte secret keys the hashes that name ids (tombstones, certificates, the journal)
and the audit chain's MACs. Kept beside the tombstones, a copy of the store carries it,
and whoever holds the copy can hash every candidate id (the id space is small: row
numbers, user ids) and learn which ones were deleted. Kept outside, in a file that
``SISA_SECRET_FILE`` names when the store is created and whenever it is opened, a copy of
the store directory holds only the secret's fingerprint (an HMAC of a fixed label under
it, which reveals nothing about ids). The trade-off: lose that file and the store can no
longer name ids by hash, so deleting, ingesting (which refuses deleted ids), looking ids
up and checking the audit chain all fail; training and prediction do not need it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from sisa.errors import ConfigError, IntegrityError, StoreError

__all__ = ["ENV", "SECRET_NAME", "SIZE", "create", "fingerprint", "outside_path", "preflight", "read"]

ENV = "SISA_SECRET_FILE"
SECRET_NAME = "hmac.key"  # the secret's file inside the store directory (when it is kept there)
SIZE = 32
_LABEL = b"sisa-secret-fingerprint"


def outside_path() -> Path | None:
    """The file ``SISA_SECRET_FILE`` names, or None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else None


def fingerprint(secret: bytes) -> str:
    """What the store keeps of an outside secret: enough to tell the right file from a wrong one."""
    return hmac.new(secret, _LABEL, hashlib.sha256).hexdigest()


def create(root: Path, given: bytes | None) -> dict[str, Any]:
    """Put a new store's secret in place; returns the meta record that says where it lives.

    Without ``SISA_SECRET_FILE``, the secret is written to ``root/hmac.key`` (owner-only).
    With it, the named file is used if it exists (several stores may share it), else
    created (owner-only) with ``given`` or fresh random bytes; the store directory then
    holds no secret.

    Args:
        root: The new store directory (exists, empty of a secret).
        given: The secret to keep (a migrated store keeps its source's), or None for a new one.

    Returns:
        ``{"location": "store"}`` or ``{"location": "outside", "fingerprint": ...}``.

    Raises:
        ConfigError: If the outside file has the wrong size, or holds another secret than ``given``.
    """
    outside = outside_path()
    if outside is None:
        _write_new(root / SECRET_NAME, os.urandom(SIZE) if given is None else given)
        return {"location": "store"}
    existing = preflight(given)
    if existing is not None:
        secret = existing
    else:
        secret = os.urandom(SIZE) if given is None else given
        outside.parent.mkdir(parents=True, exist_ok=True)
        _write_new(outside, secret)
    return {"location": "outside", "fingerprint": fingerprint(secret)}


def preflight(given: bytes | None) -> bytes | None:
    """Check ``SISA_SECRET_FILE`` before a store is created (nothing is written); its secret if it exists.

    Raises:
        ConfigError: If the file has the wrong size, or holds another secret than ``given``.
    """
    outside = outside_path()
    if outside is None or not outside.exists():
        return None
    secret = _read_outside(outside)
    if given is not None and not hmac.compare_digest(given, secret):
        raise ConfigError(
            f"{ENV}={outside} holds another HMAC secret than the one this store must keep (a migrated "
            f"store keeps its source's, so its id hashes and audit chain stay valid); name a new file in {ENV}"
        )
    return secret


def read(root: Path, record: dict[str, Any] | None) -> bytes:
    """The secret of the store at ``root``, from where its meta ``record`` says it lives.

    Raises:
        ConfigError: If the store keeps its secret outside and ``SISA_SECRET_FILE`` is unset,
            names no readable file, or names another store's secret (nothing is changed).
        IntegrityError: If the store's own ``hmac.key`` is missing or has the wrong size.
    """
    if record is None or record.get("location") == "store":
        try:
            key = (root / SECRET_NAME).read_bytes()
        except OSError as exc:
            raise IntegrityError(f"store {root}: its HMAC secret {SECRET_NAME} cannot be read ({exc})") from exc
        if len(key) != SIZE:
            raise IntegrityError(f"store {root}: its HMAC secret {SECRET_NAME} is corrupt")
        return key
    outside = outside_path()
    if outside is None:
        raise ConfigError(
            f"store {root} keeps its HMAC secret outside the store directory: set {ENV} to the file it was "
            "created with (deleting, ingesting, lookups and the audit check need it; nothing was changed)"
        )
    secret = _read_outside(outside)
    if not hmac.compare_digest(fingerprint(secret), str(record.get("fingerprint", ""))):
        raise ConfigError(
            f"{ENV}={outside} is not the HMAC secret of store {root} (its fingerprint differs); "
            "name the file the store was created with (nothing was changed)"
        )
    return secret


def _read_outside(path: Path) -> bytes:
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{ENV}={path}: the HMAC secret file cannot be read ({exc.strerror})") from exc
    if len(secret) != SIZE:
        raise ConfigError(f"{ENV}={path} is not an HMAC secret: it has {len(secret)} bytes, a secret has {SIZE}")
    return secret


def _write_new(path: Path, secret: bytes) -> None:
    """Create ``path`` (never overwrite), owner-only, with ``secret``, durably."""
    if len(secret) != SIZE:
        raise StoreError(f"an HMAC secret has {SIZE} bytes, not {len(secret)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
