"""Peak driver memory of an ingest against the number of samples: a stream of batches against arrays.

Each measurement runs in a fresh child process, so its peak memory is its own: the peak of
its anonymous memory (``RssAnon``, sampled every 20 ms). The memory-mapped store's pages are
file-backed and the kernel drops them at will, so they are not the driver's to hold; ``VmHWM``,
which counts them too, is recorded beside it.

``stream`` ingests a generator that makes one batch at a time (never the whole dataset);
``arrays`` first builds the whole feature matrix, as a caller holding the dataset in memory
does, and ingests that. Both write the same synthetic 784-feature samples (features derived
from the id, so nothing random) into a uniform S=8, R=4 store. The claim under test: the
stream's peak does not grow with N (issue 14, item 3).

Usage:
    python scripts/bench_ingest_memory.py                      # N = 25k, 100k, 400k
    python scripts/bench_ingest_memory.py --quick              # N = 10k, 40k
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 784
BATCH = 8192
MODES = ("stream", "arrays")


def make_batch(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``start..stop-1``: features a pure function of the id (bytes 0..255 scaled to [0, 1])."""
    ids = np.arange(start, stop, dtype=np.int64)
    x = ((ids[:, None] * 2654435761 + np.arange(FEATURES)) % 256).astype(np.float32) / 255.0
    return x, (ids % 10).astype(np.int64), ids


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, n: int, store: Path) -> dict[str, Any]:
    """One measurement (in its own process): ingest ``n`` samples the ``mode`` way; report memory and time."""
    import sisa

    cfg = sisa.load_config(ROOT / "configs" / "fashion_mnist.yaml", ["shards=8", "slices=4"])
    baseline = rss_kib("RssAnon")
    # The store is memory-mapped: pages of data.mdb the writes touch count in VmRSS/VmHWM as
    # file-backed memory the kernel can drop at will. What the process itself holds is its
    # anonymous memory, whose peak a sampling thread records.
    peak_anon = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], rss_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with sisa.Ensemble.create(store, cfg) as ens:
        if mode == "stream":

            def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
                for start in range(0, n, BATCH):
                    yield make_batch(start, min(n, start + BATCH))

            written = ens.ingest(batches(), batch_size=BATCH)
        else:
            x, y, ids = make_batch(0, n)
            written = ens.ingest(x, y, ids, batch_size=BATCH)
        samples = ens.status()["samples"]
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], rss_kib("RssAnon"))
    return {
        "mode": mode,
        "n": n,
        "written": written,
        "stored": samples,
        "baseline_anon_mib": baseline / 1024,
        "peak_mib": peak_anon[0] / 1024,  # anonymous memory: what the process holds
        "peak_rss_with_mapped_store_mib": rss_kib("VmHWM") / 1024,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "store_bytes": sum(f.stat().st_size for f in store.iterdir() if f.is_file()),
    }


def draw(result: dict[str, Any], png: Path) -> None:
    """Peak memory against N, one line per mode."""
    plt = benchlib.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        rows = [r for r in result["runs"] if r["mode"] == mode]
        ax.plot([r["n"] for r in rows], [r["peak_mib"] for r in rows], marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("samples ingested (N)")
    ax.set_ylabel("peak anonymous memory (MiB)")
    ax.legend()
    benchlib.save_figure(fig, png, "ingest: peak driver memory against N")


def main() -> int:
    """Run every (mode, N) in a fresh child, side by side, and write the JSON and PNG."""
    parser = benchlib.script_parser(__doc__)
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 25000,100000,400000)")
    parser.add_argument("--quick", action="store_true", help="N = 10000,40000")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "ingest_memory.json")
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "N", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), Path(args.child[2]))))
        return 0
    default = [10_000, 40_000] if args.quick else [25_000, 100_000, 400_000]
    sizes = benchlib.parse_ints(args.sizes, "--sizes") if args.sizes else default
    runs = []
    with benchlib.run_folder(args.workdir, "sisa-ingest-mem-") as work:
        for n in sizes:
            for mode in MODES:  # side by side at each N
                store = work / f"{mode}-{n}"
                cmd = [sys.executable, __file__, "--child", mode, str(n), str(store)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"N={n:>8} {mode:<6} peak {row['peak_mib']:8.1f} MiB anonymous "
                    f"(after imports {row['baseline_anon_mib']:6.1f})"
                    f"  {row['samples_per_s']:9.0f} samples/s"
                )
                runs.append(row)
                shutil.rmtree(store)  # the next run's disk
    stream = {r["n"]: r["peak_mib"] for r in runs if r["mode"] == "stream"}
    arrays = {r["n"]: r["peak_mib"] for r in runs if r["mode"] == "arrays"}
    lo, hi = min(sizes), max(sizes)
    result = {
        "machine": benchlib.machine_info(),
        "command": " ".join(sys.argv),
        "features": FEATURES,
        "batch": BATCH,
        "runs": runs,
        "stream_peak_growth": stream[hi] / stream[lo],
        "arrays_peak_growth": arrays[hi] / arrays[lo],
        "n_growth": hi / lo,
        "loadavg_end": benchlib.loadavg(),
    }
    print(
        f"\nN x{hi / lo:.0f}: stream peak x{result['stream_peak_growth']:.2f}, "
        f"arrays peak x{result['arrays_peak_growth']:.2f}"
    )
    benchlib.write_results(args.out, result, lambda png: draw(result, png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
