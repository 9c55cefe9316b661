"""Fixtures of the CLI tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short private TMPDIR (unix socket paths are limited to 107 bytes); its worker is ended after."""
    folder = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
    yield folder
    for lock in folder.glob("sisa-*/worker-*.lock"):
        subprocess.run(["pkill", "-f", str(lock)], check=False)
    shutil.rmtree(folder, ignore_errors=True)
