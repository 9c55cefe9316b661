"""Where the operator's Ed25519 signing key lives: outside every store, in the user's configuration directory.

The key signs the transparency log's checkpoints and the receipts. It never sits in a store directory,
so a copy of a store cannot sign: by default ``$XDG_CONFIG_HOME/sisa/signing.key`` (``~/.config/sisa/``
without ``XDG_CONFIG_HOME``), or the file ``SISA_SIGNING_KEY_FILE`` names. It is created (owner-only)
the first time a store needs to sign. The file holds one line, ``PRIVATE+KEY+name+hash+base64``, the
signed-note signing-key format.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

from sisa.errors import ConfigError, ProofError
from sisa.receipt.notes import Signer, generate

__all__ = ["ENV", "default_name", "key_path", "load_signer"]

log = logging.getLogger(__name__)

ENV = "SISA_SIGNING_KEY_FILE"
_loaded: tuple[bytes, Signer] | None = None  # the last key read: its file's bytes, and the signer
_outside: set[tuple[str, str]] = set()  # (key file, store directory) names found not to nest, this process


def key_path() -> Path:
    """The signing key's file: ``SISA_SIGNING_KEY_FILE``, else the user's configuration directory."""
    named = os.environ.get(ENV, "").strip()
    if named:
        return Path(named).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".config") / "sisa" / "signing.key"


def default_name() -> str:
    """A key name for a new key: ``sisa-`` and this host's name (signed-note names hold no spaces or '+')."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    return f"sisa-{host}"


def load_signer(*, create: bool = True, name: str | None = None, store_root: Path | None = None) -> Signer:
    """The operator's signer, read from :func:`key_path` (created there on first use when ``create``).

    Args:
        create: Create a new key when the file does not exist.
        name: The key name of a new key (default :func:`default_name`).
        store_root: A store directory the key must not lie in (a copy of the store would carry it).

    Raises:
        ConfigError: If the file lies in the store directory, is missing (``create`` False), cannot be
            read or is not a signing key.
    """
    path = key_path()
    if store_root is not None and (str(path), str(store_root)) not in _outside:
        if path.resolve().is_relative_to(Path(store_root).resolve()):
            raise ConfigError(
                f"the signing key {path} lies in the store directory {store_root}: a copy of the store would carry "
                f"it and could sign. Keep it outside (unset {ENV}, or name a file elsewhere)"
            )
        # Checked once per process and pair of names: a deletion signs every time, and the two path
        # resolutions (a system call per path component) cost more than the rest of reading the key.
        _outside.add((str(path), str(store_root)))
    try:
        raw = _read(path)
    except FileNotFoundError:
        raw = None
    except OSError as exc:
        raise ConfigError(f"{ENV}/{path}: the signing key cannot be read ({exc})") from exc
    if raw is not None and _loaded is not None and _loaded[0] == raw:
        return _loaded[1]  # the same key as last time: parsed and derived once per process
    if raw is None:
        if not create:
            raise ConfigError(f"no signing key at {path}: run `sisa keys --generate`, or set {ENV} to the key file")
        signer = generate(name or default_name())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, written := (signer.encode() + "\n").encode())  # the bytes _remember keys it by
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("created the signing key %s (verifier key %s)", path, signer.verifier.encode())
        _remember(written, signer)
        return signer
    try:
        signer = Signer.decode(raw.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{ENV}/{path}: the signing key cannot be read ({exc})") from exc
    except ProofError as exc:
        raise ConfigError(f"{path} is not a sisa signing key: {exc}") from exc
    _remember(raw, signer)
    return signer


def _read(path: Path) -> bytes:
    """The key file's bytes, with three system calls and no text layer (a deletion reads it each time it signs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _remember(raw: bytes, signer: Signer) -> None:
    """Keep the last key read, so that a process signing after each deletion parses and derives it once.

    Keyed by the file's whole bytes, read every time: a key replaced on disk is never served from memory
    (not by its size or times, which a rewrite within the same clock tick keeps).
    """
    global _loaded
    _loaded = (raw, signer)
