"""scripts/gpu_bundle.sh: its package list, and a full build from fake wheels (no network, no GPU)."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import io
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_bundle.sh"


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No index at all (PIP_NO_INDEX), and no pip config files (their find-links and constraints): nothing fetched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PYTHON=sys.executable,
        PIP_NO_INDEX="1",
        PIP_CONFIG_FILE=os.devnull,
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        GPU_BUNDLE_DIR=str(tmp_path / "bundle"),
    )
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def listed(tmp_path: Path) -> dict[str, str]:
    proc = run(["--list"], offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", line) for line in lines), lines
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines), "a package is listed twice: pip would refuse two versions"
    return pins


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid wheel: METADATA, WHEEL and a RECORD with every file's hash; a raylet is executable."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    tag = "cp312-cp312-manylinux2014_x86_64" if name == "ray" else "py3-none-any"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    wheel_file = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: {'false' if name == 'ray' else 'true'}\n"
    entries = {**files, f"{dist}.dist-info/METADATA": meta.encode(), f"{dist}.dist-info/WHEEL": wheel_file.encode()}
    entries[f"{dist}.dist-info/WHEEL"] += f"Tag: {tag}\n".encode()
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in entries.items():
        writer.writerow([path, record_hash(data), len(data)])
    writer.writerow([f"{dist}.dist-info/RECORD", "", ""])
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name_in_zip, data in entries.items():
            info = zipfile.ZipInfo(name_in_zip)
            mode = 0o755 if name_in_zip.endswith("/raylet") else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr(f"{dist}.dist-info/RECORD", record.getvalue())
    return path


RAY_FILES = {
    "ray/__init__.py": b"",
    "ray/core/src/ray/raylet/raylet": b"\x7fELF raylet",
    "ray/jars/ray_dist.jar": b"jar" * 1000,
    "ray/dashboard/__init__.py": b"",
    "ray/dashboard/client/build/index.html": b"<html></html>",
    "ray/rllib/__init__.py": b"",
    "ray/data/__init__.py": b"",
}


def fake_index(tmp_path: Path, requires: dict[str, tuple[str, ...]] | None = None, big: str = "") -> Path:
    """A wheel for every listed package at its listed version; `big` gets 60 MiB that do not compress."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name, version in listed(tmp_path).items():
        files = dict(RAY_FILES) if name == "ray" else {f"{name.replace('-', '_')}/__init__.py": b""}
        if name == big:
            files[f"{name.replace('-', '_')}/blob.bin"] = os.urandom(60 * 2**20)
        fake_wheel(folder, name, version, files, (requires or {}).get(name, ()))
    return folder


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_list_names_ray_at_the_venv_version_and_lmdb_jsonschema_cryptography(tmp_path: Path) -> None:
    pins = listed(tmp_path)
    # The versions the test suite runs with are the ones shipped; cryptography may not be in the venv yet.
    for name in ("ray", "lmdb", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"):
        assert pins.get(name) == md.version(name), (name, pins)
    assert "cryptography" in pins and "cffi" in pins and "pycparser" in pins, pins
    assert not (tmp_path / "bundle").exists()  # --list builds nothing


@pytest.mark.parametrize("args", [["--dry-run"], ["--list"]])
def test_dry_run_is_list(tmp_path: Path, args: list[str]) -> None:
    proc = run(args, offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"ray=={md.version('ray')}"


def test_unknown_argument_exits_2(tmp_path: Path) -> None:
    assert run(["--bogus"], offline_env(tmp_path)).returncode == 2


def test_build_strips_ray_and_its_record_and_the_wheel_installs(tmp_path: Path) -> None:
    index = fake_index(tmp_path, requires={"jsonschema": ("referencing>=0.1", "attrs", "isoduration; extra == 'x'")})
    proc = run([], offline_env(tmp_path, PIP_FIND_LINKS=str(index)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = tmp_path / "bundle"
    pins = listed(tmp_path)
    wheels = sorted(p.name.split("-")[0] for p in bundle.glob("*.whl"))
    assert wheels == sorted(re.sub(r"[-_.]+", "_", n) for n in pins)
    assert (bundle / "MANIFEST.txt").is_file()

    (ray_wheel,) = bundle.glob("ray-*.whl")
    with zipfile.ZipFile(ray_wheel) as z:
        names = set(z.namelist())
        record = z.read(f"ray-{pins['ray']}.dist-info/RECORD").decode()
        raylet_mode = z.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16
    assert "ray/__init__.py" in names and "ray/dashboard/__init__.py" in names and "ray/data/__init__.py" in names
    for gone in ("ray/jars/ray_dist.jar", "ray/dashboard/client/build/index.html", "ray/rllib/__init__.py"):
        assert gone not in names and gone not in record, gone
    assert raylet_mode & 0o111, "the raylet binary lost its executable bit"

    # pip installs the stripped wheel, for the GPU machine's Python, the way the README says.
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--only-binary=:all:", "--python-version", "3.12", "--platform", "manylinux2014_x86_64"]
    subprocess.run(
        [*pip, "--target", str(target), *map(str, bundle.glob("*.whl"))],
        check=True,
        timeout=120,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    assert (target / "ray" / "data" / "__init__.py").is_file()
    assert not (target / "ray" / "jars").exists()
    assert os.access(target / "ray" / "core" / "src" / "ray" / "raylet" / "raylet", os.X_OK)


def test_build_fails_on_a_requirement_neither_shipped_nor_in_the_image(tmp_path: Path) -> None:
    index = fake_index(tmp_path, requires={"referencing": ("no-such-package-in-the-image>=1",)})
    proc = run([], offline_env(tmp_path, PIP_FIND_LINKS=str(index)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no-such-package-in-the-image (needed by referencing)" in proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_build_fails_when_the_bundle_would_not_fit_beside_the_repo(tmp_path: Path) -> None:
    index = fake_index(tmp_path, big="lmdb")  # 60 MiB + the repo's few MiB > 64 MiB
    proc = run([], offline_env(tmp_path, PIP_FIND_LINKS=str(index)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bundle too large" in proc.stderr
    assert not (tmp_path / "bundle").exists()
