r"""One prepared GPU check: shards packed on one GPU vs one after another, one deletion, verify.

Run through ``scripts/gpu_check.sh`` (it picks the Python). With CUDA (the real check,
made to finish in well under 8 minutes on one H100):

1. **Packed**: ``configs/fashion_mnist_cnn.yaml`` with ``shards=8`` and
   ``resources.gpus_per_shard=0.125``: eight Ray tasks share the GPU (each caps its
   allocator at 1/8 of the memory). Ray workers are warmed up first on a small subset,
   so worker start and CUDA initialisation are not timed.
2. **Serial**: the very same config and data with ``address=local``: the eight shards
   train one after another in this process on the same GPU.
   ``throughput_ratio = serial wall / packed wall`` (same work, sample-epochs, in both);
   ``packed_equals_serial``: every shard's weights are bit-identical between the two.
3. **One deletion** on the packed store (one seeded random id), wall seconds of
   ``Ensemble.delete`` vs ``sisa.monolithic.train_monolithic`` on all the data on the
   same device (1 torch thread, like a shard): ``deletion_speedup``.
4. **verify** of the shard(s) the deletion retrained: retrained from scratch on the
   device and compared bit for bit with the live models.
5. **bf16**: the monolithic model twice more under ``train.precision=bf16`` (autocast):
   its time against fp32, whether the two runs are bit-identical (they must be) and
   whether its weights differ from fp32's (they should).

Without CUDA, or with ``--tiny`` (or ``SISA_GPU_CHECK_TINY=1``), the same steps run as a
CPU smoke test on tiny settings (``configs/tiny.yaml``: 1,200 samples, small MLP, 4
shards, ``gpus_per_shard=0``) in well under a minute; its numbers are not GPU results.

Writes ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``docs/bench/gpu_check.json``
(``--out`` overrides both). Trailing ``key=value`` arguments are config overrides, e.g.
``train.epochs=4`` or ``train.precision=bf16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before torch touches cuBLAS, and inherited by the Ray workers started below.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import head, machine_info, script_parser, usable_cpus  # noqa: E402

from sisa import orchestrator  # noqa: E402
from sisa.config import SisaConfig, config_to_dict, load_config  # noqa: E402
from sisa.data import FASHION_CACHE_DIR, FASHION_DEBIAN_DIR, LabeledArrays, load_split  # noqa: E402
from sisa.digests import weights_digest  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.errors import DataError, SisaError  # noqa: E402
from sisa.monolithic import train_monolithic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "fashion_mnist_cnn.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
GPU_SHARDS = 8
TINY_SHARDS = 4
TINY_OVERRIDES = ("train.epochs=2", "slices=2")
WARMUP_SAMPLES = 800


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (trailing ``key=value`` strings are config overrides)."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke run on tiny settings (also SISA_GPU_CHECK_TINY=1, or no CUDA)"
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: by mode)")
    parser.add_argument("--shards", type=int, default=None, help=f"S (default {GPU_SHARDS}; {TINY_SHARDS} tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the id to delete")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: $OUT/gpu_check.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=4")
    return parser.parse_args(argv)


def device_info(cuda: bool) -> dict[str, Any]:
    """Device name and the torch / CUDA / cuDNN versions the numbers come from."""
    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device="cuda",
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info.update(device="cpu", device_name=platform.processor() or platform.machine())
    return info


def load_train(cfg: SisaConfig) -> tuple[LabeledArrays, str]:
    """The config's training data, or synthetic data of the same shape where it is not installed."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    installed = any(all((d / n).is_file() for n in names) for d in (FASHION_DEBIAN_DIR, FASHION_CACHE_DIR))
    try:
        if cfg.data.dataset == "fashion-mnist" and cfg.data.root is None and not installed:
            # No download attempt (60 s timeouts each): a GPU machine may have no network.
            raise DataError(f"Fashion-MNIST is in neither {FASHION_DEBIAN_DIR} nor {FASHION_CACHE_DIR}")
        return load_split(cfg.data, "train"), cfg.data.dataset
    except (DataError, OSError, SisaError) as exc:
        # Timings need only the shapes; set data.root=DIR to use the real files.
        n = cfg.data.train_limit or 60000
        print(f"data: {exc}; using {n} synthetic 1x28x28 samples instead", flush=True)
        rng = np.random.default_rng(0)
        y = rng.integers(0, cfg.data.num_classes, size=n).astype(np.int64)
        x = (rng.normal(size=(n, 1, 28, 28)) + y[:, None, None, None] * 0.1).astype(np.float32)
        return LabeledArrays(x, y, np.arange(n, dtype=np.int64)), "synthetic"


def fit(cfg: SisaConfig, train: LabeledArrays, path: Path, address: str | None) -> tuple[Ensemble, dict[str, Any]]:
    """Create a store, ingest ``train``, fit it; returns the open ensemble and its timings."""
    ens = Ensemble.create(path, cfg, address=address)
    try:
        ens.ingest(train)
        if cfg.resources.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        report = ens.fit()
        wall = time.perf_counter() - started
        with ens.store.read() as txn:
            records = [r for s in range(cfg.shards) for r in ens.store.stage_records(txn, s)]
    except BaseException:
        ens.close()
        raise
    work = sum(int(r["n_samples"]) * int(r["epochs"]) for r in records)
    return ens, {
        "address": address or "ray",
        "fit_s": wall,
        "compute_s": report.stage_seconds,
        "stages": len(records),
        "work_sample_epochs": work,
        "sample_epochs_per_s": work / wall if wall > 0 else None,
        "weights": [s["live_weights"] for s in ens.status()["per_shard"]],
    }


def precision_check(cfg: SisaConfig, train: LabeledArrays, fp32_weights: str, fp32_s: float) -> dict[str, Any]:
    """The monolithic model under the other ``train.precision``, twice: reproducible, and not the same weights."""
    other = "fp32" if cfg.train.precision == "bf16" else "bf16"
    alt = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=other))
    runs = [train_monolithic(alt, train, seed=cfg.seed, threads=1) for _ in range(2)]
    digests = [weights_digest(model.state_dict()) for model, _ in runs]
    seconds = min(s for _, s in runs)
    print(f"monolithic under {other}: {seconds:.1f}s, repeat identical {digests[0] == digests[1]}", flush=True)
    return {
        "precision": other,
        "seconds": seconds,
        "speedup_vs_config_precision": fp32_s / seconds,
        "repeat_identical": digests[0] == digests[1],
        "differs_from_config_precision": digests[0] != fp32_weights,
    }


def run(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Every step, filling ``result`` as it goes (so a failure still leaves what was measured)."""
    tiny = args.tiny or os.environ.get("SISA_GPU_CHECK_TINY", "") not in ("", "0") or not torch.cuda.is_available()
    cuda = not tiny
    config = args.config or (GPU_CONFIG if cuda else TINY_CONFIG)
    shards = args.shards or (GPU_SHARDS if cuda else TINY_SHARDS)
    gpus = 1 / shards if cuda else 0.0
    overrides = [
        *(() if cuda else TINY_OVERRIDES),
        f"shards={shards}",
        f"resources.gpus_per_shard={gpus}",
        "resources.cpus_per_shard=1",
        "resources.threads_per_shard=1",
        *args.overrides,
    ]
    cfg = load_config(config, overrides)
    info = device_info(cuda)
    print(f"mode {'gpu' if cuda else 'cpu-smoke'}: {info['device_name']}, torch {info['torch']}", flush=True)
    print(f"config {config} overrides {overrides}", flush=True)
    train, source = load_train(cfg)
    print(f"data: {len(train)} samples of {train.feature_shape} ({source})", flush=True)

    import ray

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    result.update(
        {
            "mode": "gpu" if cuda else "cpu-smoke",
            "note": None if cuda else "CPU smoke run on tiny settings: not GPU numbers",
            "device": info,
            "machine": machine_info(),
            "config_path": str(config),
            "overrides": overrides,
            "config": config_to_dict(cfg),
            "data": {"source": source, "train": len(train), "feature_shape": list(train.feature_shape)},
        }
    )
    try:
        orchestrator.shutdown()
        ray.init(
            address="local",
            num_cpus=max(usable_cpus(), shards),
            include_dashboard=False,
            log_to_driver=False,
        )
        result["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        t0 = time.perf_counter()
        # Ray workers start, import torch and initialise CUDA; this process warms up too (for serial and monolithic).
        subset = head(train, min(len(train), max(WARMUP_SAMPLES, 4 * shards * cfg.slices)))
        for name, address in (("warm-ray", None), ("warm-local", orchestrator.LOCAL)):
            warm, _ = fit(cfg, subset, workdir / name, address)
            warm.close()
        result["warmup_s"] = time.perf_counter() - t0
        print(f"warm-up {result['warmup_s']:.1f}s", flush=True)

        packed_ens, packed = fit(cfg, train, workdir / "packed", None)
        print(f"packed: {shards} shards on Ray at {gpus:g} GPU each: {packed['fit_s']:.1f}s", flush=True)
        serial_ens, serial = fit(cfg, train, workdir / "serial", orchestrator.LOCAL)
        serial_ens.close()
        print(f"serial: one after another in this process: {serial['fit_s']:.1f}s", flush=True)
        result["packed"] = packed
        result["serial"] = serial
        result["throughput_ratio"] = serial["fit_s"] / packed["fit_s"]
        result["packed_equals_serial"] = packed["weights"] == serial["weights"]

        mono, mono_s = train_monolithic(cfg, train, seed=cfg.seed, threads=1)
        result["monolithic"] = {"seconds": mono_s, "device": cfg.resources.device, "threads": 1}
        print(f"monolithic retrain on {cfg.resources.device}: {mono_s:.1f}s", flush=True)
        result["bf16"] = precision_check(cfg, train, weights_digest(mono.state_dict()), mono_s)

        victim = int(np.random.default_rng(args.seed).choice(train.ids))
        t0 = time.perf_counter()
        cert = packed_ens.delete([victim])
        delete_s = time.perf_counter() - t0
        retrained = [int(s) for s in cert["retrained_shards"]]
        result["deletion"] = {
            "id": victim,
            "state": cert.get("state"),
            "wall_s": delete_s,
            "retrain_s": float(cert["batch"]["retrain_seconds"]),
            "retrained_shards": retrained,
            "from_slice": {str(k): int(v["from_slice"]) for k, v in cert["shards"].items()},
        }
        result["deletion_speedup"] = mono_s / delete_s
        print(f"deletion of id {victim}: {delete_s:.2f}s ({result['deletion_speedup']:.1f}x vs monolithic)")

        t0 = time.perf_counter()
        report = packed_ens.verify(retrained or None)
        result["verify"] = {"ok": bool(report["ok"]), "shards": retrained, "seconds": time.perf_counter() - t0}
        packed_ens.close()
        print(f"verify shards {retrained}: ok={report['ok']}", flush=True)
    finally:
        orchestrator.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    result["total_s"] = time.perf_counter() - started
    checks = (result["verify"]["ok"], result["packed_equals_serial"], result["bf16"]["repeat_identical"])
    result["ok"] = all(bool(c) for c in checks)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the JSON; exit status 1 unless verify, packed == serial and the bf16 repeat hold."""
    args = parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    out = out or ROOT / "docs" / "bench" / "gpu_check.json"
    result: dict[str, Any] = {}
    try:
        run(args, result)
    except BaseException as exc:
        # A device run is one shot: keep whatever was measured, and why it stopped.
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"FAILED ({result['error']}); partial results in {out}", flush=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"throughput ratio packed/serial {result['throughput_ratio']:.2f}x, deletion speedup "
        f"{result['deletion_speedup']:.1f}x, verify ok={result['verify']['ok']}, packed == serial "
        f"{result['packed_equals_serial']}; total {result['total_s']:.0f}s; wrote {out}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
