"""The operator's signing key: where it lives, its file format, and that a store never holds or signs with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sisa.cli.main import main
from sisa.errors import ConfigError
from sisa.receipt import keys
from sisa.receipt.notes import Signer


def test_the_key_is_created_once_owner_only_in_the_signed_note_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cfg" / "k.key"
    monkeypatch.setenv(keys.ENV, str(path))
    assert main(["keys", "--generate", "--name", "op.example", "--json"]) == 0
    capsys.readouterr()
    text = path.read_text()
    assert text.startswith("PRIVATE+KEY+op.example+") and text.endswith("\n")
    assert path.stat().st_mode & 0o777 == 0o600
    signer = Signer.decode(text)
    assert keys.load_signer() == signer  # read again, not replaced
    assert main(["keys", "--public"]) == 0
    assert capsys.readouterr().out == signer.verifier.encode() + "\n"
    assert main(["keys", "--generate"]) == 2  # never replaces a key
    assert "exists at" in capsys.readouterr().err and path.read_text() == text


def test_the_default_place_is_the_user_configuration_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keys.ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert keys.key_path() == tmp_path / "xdg" / "sisa" / "signing.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert keys.key_path() == tmp_path / "home" / ".config" / "sisa" / "signing.key"


def test_a_key_inside_the_store_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv(keys.ENV, str(store / "signing.key"))
    with pytest.raises(ConfigError, match="lies in the store directory"):
        keys.load_signer(store_root=store)
    assert list(store.iterdir()) == []  # nothing created


def test_a_damaged_key_file_is_a_config_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k.key"
    path.write_text("PRIVATE+KEY+x+00000000+AAAA\n")
    monkeypatch.setenv(keys.ENV, str(path))
    with pytest.raises(ConfigError, match=f"{path} is not a sisa signing key"):
        keys.load_signer()
    path.write_bytes(b"PRIVATE+KEY+\xff\xfe\n")  # not ASCII: named as unreadable, never decoded as a key
    with pytest.raises(ConfigError, match=f"{path}: the signing key cannot be read"):
        keys.load_signer()
    monkeypatch.setenv(keys.ENV, str(tmp_path))  # a directory, not a file
    with pytest.raises(ConfigError, match="the signing key cannot be read"):
        keys.load_signer()
    missing = tmp_path / "none.key"
    monkeypatch.setenv(keys.ENV, str(missing))
    with pytest.raises(ConfigError, match="sisa keys --generate"):
        keys.load_signer(create=False)
    assert not missing.exists()


def test_a_key_replaced_on_disk_is_read_again_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sisa.receipt.notes import generate

    path = tmp_path / "k.key"
    monkeypatch.setenv(keys.ENV, str(path))
    first = keys.load_signer()
    assert keys.load_signer() is first  # the same file: parsed once in this process
    # Rotated in place within the same instant (same inode, same size: a key of the same name).
    other = generate(first.name)
    path.write_text(other.encode() + "\n")
    assert keys.load_signer() == other != first
    path.write_text("PRIVATE+KEY+x+00000000+AAAA\n")  # and damaged after: refused, never the key kept in memory
    with pytest.raises(ConfigError, match="is not a sisa signing key"):
        keys.load_signer()
