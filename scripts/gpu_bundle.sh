#!/usr/bin/env bash
# Build, on a machine with a package registry, the Python packages the GPU check needs on the lent GPU machine,
# which has Python 3.12 with its own CUDA torch and numpy/pyyaml/tqdm/psutil/msgpack/protobuf/click/filelock/
# requests/attrs/packaging/pyarrow... (the image list in the device notes), but no ray, lmdb or jsonschema, and no
# registry or network. What it lacks must travel with the working tree, which may total 64 MiB.
#
# Output: .gpu_bundle/ (git-ignored), one folder of manylinux x86_64 wheels for CPython 3.12, plus MANIFEST.txt.
# Ray's wheel (about 76 MiB) is re-zipped without what a local `ray.init()` + tasks never load (see STRIP below),
# its RECORD rewritten to match, so it still installs with pip. Install on the GPU machine (README, "GPUs"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_bundle/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
#   bash scripts/gpu_bundle.sh           # build .gpu_bundle/ (cleans it first); non-zero if too large
#   bash scripts/gpu_bundle.sh --list    # print NAME==VERSION for each package it would fetch; no download
#                                        # (--dry-run is the same)
# GPU_BUNDLE_DIR names another output folder (the tests build a bundle from fake wheels, with PIP_NO_INDEX=1 and
# PIP_FIND_LINKS, into a temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=build
case "${1:-}" in
  "") ;;
  --list | --dry-run) mode=list ;;
  -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
  *) echo "gpu_bundle.sh: unknown argument: $1 (try --list or --help)" >&2; exit 2 ;;
esac

# The venv's Python: its installed ray/lmdb/jsonschema are the versions the tests ran with, so those are shipped.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUNDLE=${GPU_BUNDLE_DIR:-.gpu_bundle}
LIMIT_TOTAL=$((64 * 1024 * 1024))  # the device tool's cap on everything that travels with one call
HEADROOM=$((1024 * 1024))          # files the repo gains between bundling and the run (a results file, a note)

# One NAME==VERSION per line. The version is the venv's where the package is installed there (what the test suite
# used); the fallback pins are for packages the venv does not have yet (cryptography, which the project is adding,
# and its cffi/pycparser). Which packages: ray and lmdb (sisa's dependencies the image lacks), and the image's
# missing runtime requirements of ray (jsonschema and its own: jsonschema-specifications, referencing, rpds-py;
# attrs is in the image). After downloading, the build checks this list is closed (every requirement of a shipped
# wheel, and of sisa, is shipped or in the image), so a new dependency fails the build instead of the GPU run.
package_list() {
  "$PY" - <<'PY'
import importlib.metadata as md
import sys

WANTED = [
    ("ray", None),
    ("lmdb", None),
    ("jsonschema", None),
    ("jsonschema-specifications", None),
    ("referencing", None),
    ("rpds-py", None),
    ("cryptography", "51.0.1"),
    ("cffi", "2.1.1"),
    ("pycparser", "3.12"),
]
missing = []
for name, fallback in WANTED:
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        version = fallback
    if version is None:
        missing.append(name)
    else:
        print(f"{name}=={version}")
if missing:
    sys.exit(f"gpu_bundle.sh: {', '.join(missing)} not installed for {sys.executable}: run scripts/setup_env.sh first")
PY
}

# A plain assignment, not mapfile < <(...): set -e then stops here when the list cannot be made.
list=$(package_list)
mapfile -t packages <<<"$list"
if [ "$mode" = list ]; then
  printf '%s\n' "${packages[@]}"
  exit 0
fi

# Build in a scratch folder and move it into place only once complete, so a failed run leaves no half bundle.
rm -rf "$BUNDLE"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/dl" "$work/out"

# pip matches each manylinux tag exactly, so name every one these wheels are published under.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/dl" "${packages[@]}"

# Strip ray's wheel and check the bundle is complete; fails on a requirement neither shipped nor in the image.
"$PY" - "$work/dl" "$work/out" <<'PY'
import base64
import csv
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

src, dst = Path(sys.argv[1]), Path(sys.argv[2])

# What a local ray.init(), tasks and ray.get never load. jars: the Java worker (sisa's tasks are Python);
# dashboard/client: the web UI's built JavaScript (the dashboard only starts with ray[default]'s packages, and
# the image lacks aiohttp_cors); rllib, serve, llm: Ray's RL, model-serving and LLM libraries, which sisa never
# imports. ray.data, ray.train, ray.tune and ray.air stay: ray.data imports ray.air, and sisa streams ray.data.
STRIP = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/llm/")

# The image's packages that matter here (the device notes' list, read 2026-11-17), canonical names.
IMAGE = {
    "aiohttp", "attrs", "certifi", "charset-normalizer", "click", "filelock", "fsspec", "grpcio", "idna",
    "jinja2", "msgpack", "numpy", "packaging", "pandas", "protobuf", "psutil", "pyarrow", "pyyaml",
    "requests", "setuptools", "tqdm", "torch", "typing-extensions", "urllib3",
}

# The GPU machine's interpreter: CPython 3.12 on x86-64 Linux, no extras requested.
env = default_environment()
env.update(python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
           platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", os_name="posix", extra="")


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(wheel: Path, out: Path) -> int:
    """Copy a wheel without the STRIP folders; its RECORD loses their lines. Returns the bytes left out."""
    dropped = 0
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        names = zin.namelist()
        record = next(n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        for info in zin.infolist():
            if info.filename == record:
                continue
            if info.filename.startswith(STRIP):
                dropped += info.file_size
                continue
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        rows = [row for row in csv.reader(zin.read(record).decode().splitlines()) if row]
        rows = [row for row in rows if not row[0].startswith(STRIP)]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        zout.writestr(record, text.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    # The rewritten wheel must still name every file it holds in RECORD with the right hash, or pip may refuse it.
    with zipfile.ZipFile(out) as z:
        hashes = {row[0]: row[1] for row in csv.reader(z.read(record).decode().splitlines()) if row}
        for name in z.namelist():
            if name != record and hashes.get(name) != record_hash(z.read(name)):
                sys.exit(f"gpu_bundle.sh: RECORD of {out.name} does not match {name}")
        if z.testzip() is not None:
            sys.exit(f"gpu_bundle.sh: {out.name} is corrupt")
    return dropped


shipped: dict[str, str] = {}
requires: list[tuple[str, str]] = []
for wheel in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))).decode()
    name = canonicalize_name(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
    shipped[name] = wheel.name
    requires += [(name, line[len("Requires-Dist:"):].strip()) for line in meta.splitlines()
                 if line.startswith("Requires-Dist:")]
    if name == "ray":
        dropped = strip_wheel(wheel, dst / wheel.name)
        print(f"ray: left out {dropped / 2**20:.1f} MiB unpacked ({', '.join(STRIP)})")
    else:
        (dst / wheel.name).write_bytes(wheel.read_bytes())

# sisa's own requirements (pyproject.toml's dependencies) must be there too.
text = Path("pyproject.toml").read_text()
deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
requires += [("sisa", d) for d in re.findall(r'^\s*"([^"]+)"', deps, re.M)]

missing = []
for who, spec in requires:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    name = canonicalize_name(req.name)
    if name not in shipped and name not in IMAGE:
        missing.append(f"{name} (needed by {who})")
if missing:
    sys.exit("gpu_bundle.sh: neither shipped nor in the GPU image: " + ", ".join(sorted(set(missing))))
PY

{
  echo "# Built by scripts/gpu_bundle.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?'); CPython 3.12, manylinux x86_64."
  echo "# ray's wheel is stripped (jars, dashboard/client, rllib, serve, llm); install with pip --no-index --no-deps."
  (cd "$work/out" && sha256sum -- *.whl)
} > "$work/out/MANIFEST.txt"

# The bundle travels once, as a carried ignored path; were git not ignoring it, it would travel again as untracked.
case "$(realpath -m "$BUNDLE")/" in
  "$PWD"/*) git check-ignore -q "$BUNDLE/MANIFEST.txt" || { echo "gpu_bundle.sh: $BUNDLE/ is not git-ignored" >&2; exit 1; } ;;
esac
# What else travels: tracked files and untracked files git does not ignore.
repo_bytes=$(git ls-files -z --cached --others --exclude-standard \
  | "$PY" -c 'import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p) and not os.path.islink(p)))')
bundle_bytes=$(du -cb "$work/out"/* | tail -1 | cut -f1)
limit=$((LIMIT_TOTAL - repo_bytes - HEADROOM))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
(cd "$work/out" && ls -l -- *)
echo "bundle: $(mib "$bundle_bytes"); repo: $(mib "$repo_bytes"); limit for the bundle: $(mib "$limit")" \
     "(64 MiB - repo - $(mib "$HEADROOM") headroom)"
# Too large: no bundle is left behind, since carrying it would have the whole device call refused.
if [ "$bundle_bytes" -gt "$limit" ]; then
  echo "gpu_bundle.sh: bundle too large by $(mib $((bundle_bytes - limit))); nothing written to $BUNDLE" >&2
  exit 1
fi
mkdir -p "$(dirname "$BUNDLE")"
mv "$work/out" "$BUNDLE"
echo "wrote $BUNDLE/"
