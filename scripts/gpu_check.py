r"""One prepared GPU check: shards packed on one GPU vs one after another, determinism domains, deletion, verify.

Run through ``scripts/gpu_check.sh`` (it picks the Python). With CUDA, the real check,
estimated (not measured) to finish in well under 8 minutes on one H100/H200. **No GPU
numbers are recorded yet**: no session that wrote this check had a GPU, so every GPU
result, the domain, repeat and CPU-vs-GPU verify steps included, is unmeasured until
someone runs it on a GPU machine; only the CPU smoke run below has been run.

The script restarts itself once with ``resources.cpu_isa``'s pins in its environment
(:func:`sisa.train.domain.pin_env`), so that the serial run and the monolithic model train in
this very process in the shard workers' domain, not in a pinned child started per fit.

1. **Packed**: ``configs/fashion_mnist_cnn.yaml`` with ``shards=8`` and
   ``resources.gpus_per_shard=0.125``: eight Ray tasks share the GPU (each caps its
   allocator at 1/8 of the memory). Ray workers are warmed up first on a small subset,
   so worker start and CUDA initialisation are not timed.
2. **Domain**: the determinism domain the shards trained in, read from the live shard
   records (``Ensemble.status()``), printed as ``domain: ID (...)`` with
   :func:`sisa.train.domain.describe` (GPU model, compute capability, SM count, CUDA / cuDNN /
   cuBLAS) and written to the JSON with every stage record's domain id and the domains
   :func:`sisa.train.orchestrator.available_domains` probes; all shards must share one.
3. **Serial**: the very same config and data with ``address=local``: the eight shards
   train one after another in this process on the same GPU.
   ``throughput_ratio = serial wall / packed wall`` (same work, sample-epochs, in both);
   ``packed_equals_serial``: every shard's weights are bit-identical between the two.
4. **Repeat**: the packed fit once more, into a new store: ``repeat_identical`` when
   every stage of every shard has the same weight digest, in the same domain, both times.
5. **One deletion** on the packed store (one seeded random id), wall seconds of
   ``Ensemble.delete`` vs ``sisa.evaluate.monolithic.train_monolithic`` on all the data on the
   same device (1 torch thread, like a shard): ``deletion_speedup``.
6. **verify** of the shard(s) the deletion retrained: retrained from scratch on the
   device and compared bit for bit with the live models; ``gpu_store_verify`` records
   that the replay ran on ``cuda`` in the live model's domain.
7. **CPU store on the GPU machine**: ``configs/tiny.yaml`` (1,200 samples, MLP, 4 shards)
   with ``resources.gpus_per_shard=0``, fitted on Ray and verified: ``cpu_store_verify``
   must replay on ``cpu`` in its live models' (CPU) domain while the GPU store replays
   on ``cuda``.
8. **bf16**: the monolithic model twice more under ``train.precision=bf16`` (autocast):
   its time against fp32, whether the two runs are bit-identical (they must be) and
   whether its weights differ from fp32's (they should).
9. **Shared backbone**: the same packed config with a backbone (the config's network
   without its output layer) trained on the first 10% of the ids and LoRA adapters plus a
   head per shard: fit, one deletion, and ``verify`` of the retrained shard on the device
   (``backbone_verify``).

Every claim the GPU run prints is checked against what the store recorded (``checks``:
``memory_cap``: every stage ran under its share's allocator cap, the CUDA context left out,
and peaked within it; ``on_gpu``; ``domain_gpu_fields``; ``tf32_off``), and the JSON records
the driver version and the math switches (``math``). Before any task, a preflight checks
that Ray sees the GPU; at ``--deadline`` seconds (default 540, inside a 10-minute outside
limit) an alarm stops the run and the JSON holds what was measured until then.

Without CUDA the check fails at once (exit status 2, the reason in the JSON's ``error``): it
never runs on the CPU and exits 0. With ``--tiny`` (or ``SISA_GPU_CHECK_TINY=1``), the same
steps run as a CPU smoke test on tiny settings (``configs/tiny.yaml``: 1,200 samples, small MLP, 4
shards, ``gpus_per_shard=0``) in about a minute; its numbers are not GPU results, and
the "GPU" store, its domain, repeat and verify then run on the CPU (the JSON's ``note``,
``domain.on_gpu`` and ``gpu_store_verify.on_gpu`` say so).

Writes ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``docs/bench/gpu_check.json``
(``--out`` overrides both). Trailing ``key=value`` arguments are config overrides, e.g.
``train.epochs=4`` or ``train.precision=bf16``. Exit status 1 unless every check holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

# Before torch touches cuBLAS, and inherited by the Ray workers started below.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from sisa.config.fields import config_to_dict  # noqa: E402
from sisa.config.loader import load_config  # noqa: E402
from sisa.config.settings import BackboneConfig, SisaConfig  # noqa: E402
from sisa.data.loaders import FASHION_CACHE_DIR, FASHION_DEBIAN_DIR, LabeledArrays, load_split  # noqa: E402
from sisa.ensemble import Ensemble  # noqa: E402
from sisa.errors import DataError, SisaError  # noqa: E402
from sisa.evaluate.monolithic import train_monolithic  # noqa: E402
from sisa.store.digests import weights_digest  # noqa: E402
from sisa.train import domain as domains  # noqa: E402
from sisa.train import gpu, orchestrator  # noqa: E402
from sisa.train.process_tree import kill_trees  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "fashion_mnist_cnn.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
GPU_SHARDS = 8
TINY_SHARDS = 4
TINY_OVERRIDES = ("train.epochs=2", "slices=2")
WARMUP_SAMPLES = 800
# Set in the restarted, pinned process: never restart twice.
PINNED_FLAG = "SISA_GPU_CHECK_PINNED"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (trailing ``key=value`` strings are config overrides)."""
    parser = benchlib.script_parser(__doc__)
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke run on tiny settings (also SISA_GPU_CHECK_TINY=1)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=float(os.environ.get("SISA_GPU_CHECK_DEADLINE", "540")),
        help="seconds after which the check stops and writes what it has (before an outside timeout; default 540)",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: by mode)")
    parser.add_argument("--shards", type=int, default=None, help=f"S (default {GPU_SHARDS}; {TINY_SHARDS} tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the id to delete")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: $OUT/gpu_check.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=4")
    return parser.parse_args(argv)


class NoCudaError(RuntimeError):
    """The GPU check was asked for where CUDA is not available."""


class Settings(NamedTuple):
    """What the command line chooses: the mode, the config and the overrides it was loaded with."""

    cuda: bool
    config: Path
    shards: int
    gpus: float
    overrides: list[str]
    cfg: SisaConfig


def settings(args: argparse.Namespace) -> Settings:
    """The mode (GPU or CPU smoke) and the loaded config."""
    tiny = args.tiny or os.environ.get("SISA_GPU_CHECK_TINY", "") not in ("", "0")
    if not tiny and not torch.cuda.is_available():
        # Never a silent CPU run that exits 0 where a GPU check was asked for.
        raise NoCudaError(
            f"CUDA is not available to this Python (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): the GPU check cannot run. On a GPU machine, use the Python whose "
            "torch is a CUDA build (README, 'GPUs'); for the CPU smoke run, pass --tiny"
        )
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
    return Settings(cuda, config, shards, gpus, overrides, load_config(config, overrides))


def restart_pinned(cpu_isa: str, device: str) -> None:
    """Re-run this script with ``cpu_isa``'s pins in its start environment, unless it has them.

    torch, MKL and oneDNN read their kernel-level switches once per process, so only a
    process started pinned trains in the shard workers' domain itself; otherwise every
    ``address=local`` fit would start (and time) a pinned child process of its own.
    """
    if domains.pinned_from_start(cpu_isa, device) or os.environ.get(PINNED_FLAG):
        return
    pins = domains.pin_env(cpu_isa, device)
    print(f"restarting pinned to cpu_isa={cpu_isa} on {device}: {pins}", flush=True)
    env = {**os.environ, **pins, PINNED_FLAG: "1"}
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


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
            driver=driver_version(),
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
    ens, report, times = benchlib.build_and_fit(cfg, train, path, address=address)
    try:
        records = benchlib.stage_records(ens)
    except BaseException:
        ens.close()
        raise
    wall = times["fit_s"]
    work = benchlib.sample_epochs(records)
    per_shard = ens.status()["per_shard"]
    # Every stage's weights, in (shard, stage) order: two fits agree on it only if every stage does.
    stages = "\n".join(f"{r['shard']}:{r['stage']}:{r['weights']}" for r in records)
    return ens, {
        "address": address or "ray",
        "fit_s": wall,
        "compute_s": report.stage_seconds,
        "stages": len(records),
        "work_sample_epochs": work,
        "sample_epochs_per_s": work / wall if wall > 0 else None,
        "weights": [s["live_weights"] for s in per_shard],
        "stage_weights_digest": hashlib.sha256(stages.encode()).hexdigest(),
        # the live models' domains (status) and the domain of every stage record
        "live_domains": [domains.domain_id(s) for s in per_shard],
        "stage_domains": sorted({str(domains.domain_id(r)) for r in records}),
        # per stage on a GPU: device index, card memory, allocator cap, peak (None on the CPU)
        "stage_gpu": [r.get("gpu") for r in records],
        "stage_devices": sorted({str((r.get("domain") or {}).get("device")) for r in records}),
    }


def replay_check(ens: Ensemble, shards: list[int] | None, device: str) -> dict[str, Any]:
    """``verify`` of ``shards``: ok only when bit-identical, replayed on ``device`` in each live model's domain."""
    t0 = time.perf_counter()
    report = ens.verify(shards)
    seconds = time.perf_counter() - t0
    checked = report["shards"]  # the shards asked for (all when None)
    live = {k: domains.domain_id(v) for k, v in checked.items()}
    replay = {k: (v.get("replay_domain") or {}).get("id") for k, v in checked.items()}
    devices = sorted({str((v.get("replay_domain") or {}).get("device")) for v in checked.values()})
    same = all(replay[k] is not None and replay[k] == live[k] for k in checked)
    return {
        "ok": bool(report["ok"]) and same and devices == [device],
        "bit_identical": bool(report["ok"]),
        "shards": [int(k) for k in checked],
        "seconds": seconds,
        "replay_devices": devices,
        "live_domain_ids": live,
        "replay_domain_ids": replay,
        "same_domain": same,
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


def cpu_store_check(train: LabeledArrays, path: Path, gpu_domain: str) -> dict[str, Any]:
    """A small CPU store (``gpus_per_shard=0``) fitted on Ray and verified: its replay must run on the CPU."""
    overrides = [*TINY_OVERRIDES, f"shards={TINY_SHARDS}", "resources.gpus_per_shard=0", "resources.cpus_per_shard=1"]
    cfg = load_config(TINY_CONFIG, [*overrides, "resources.threads_per_shard=1"])
    data = benchlib.head(train, min(len(train), cfg.data.train_limit or len(train)))
    ens, fitted = fit(cfg, data, path, None)
    try:
        check = replay_check(ens, None, "cpu")
        live = ens.status()["per_shard"][0]["domain"]
    finally:
        ens.close()
    return {
        "overrides": overrides,
        "train": len(data),
        "fit_s": fitted["fit_s"],
        "stages": fitted["stages"],
        "domain": live.get("id") if live else None,
        "description": domains.describe(live),
        "differs_from_gpu_store_domain": bool(live) and live.get("id") != gpu_domain,
        **check,
    }


def backbone_check(cfg: SisaConfig, train: LabeledArrays, path: Path, device: str) -> dict[str, Any]:
    """A shared frozen backbone with LoRA adapters, packed like the plain store: fit, one deletion, verify.

    The backbone is the config's own network without its output layer, trained on a core set of
    the first 10% of the ids; each shard trains LoRA on every Linear/Conv2d of it plus a head.
    """
    b = dataclasses.replace(
        cfg,
        backbone=BackboneConfig(
            source="core", name=cfg.model.name, hidden=cfg.model.hidden, channels=cfg.model.channels, epochs=2
        ),
        model=dataclasses.replace(cfg.model, adapter="lora"),
    )
    core = np.sort(train.ids)[: max(1, len(train) // 10)]
    with Ensemble.create(path, b) as ens:
        ens.ingest(train, core=core)
        t0 = time.perf_counter()
        ens.fit()
        fit_s = time.perf_counter() - t0
        victim = int(np.sort(train.ids)[-1])  # never core: the core set is the lowest ids
        t0 = time.perf_counter()
        cert = ens.delete([victim])
        delete_s = time.perf_counter() - t0
        check = replay_check(ens, [int(s) for s in cert["retrained_shards"]] or None, device)
        backbone = ens.store.meta()["backbone"]
    print(f"backbone + LoRA: fit {fit_s:.1f}s, deletion {delete_s:.2f}s, verify ok={check['ok']}", flush=True)
    return {
        "core": len(core),
        "backbone_bytes": backbone["bytes"],
        "backbone_train_s": backbone["seconds"],
        "fit_s": fit_s,
        "delete_s": delete_s,
        **check,
    }


def gpu_claims(packed: dict[str, Any], live: dict[str, Any], share: float) -> dict[str, bool]:
    """Each claim the GPU run prints, checked against what the store recorded.

    Args:
        packed: The packed fit's entry (its per-stage ``stage_gpu`` and ``stage_devices``).
        live: The live models' domain record.
        share: ``resources.gpus_per_shard`` of the packed fit.

    Returns:
        ``memory_cap`` (every stage ran under the share's cap, the CUDA context left out,
        and stayed within it), ``on_gpu`` (every stage trained on cuda), ``domain_gpu_fields``
        (the domain names the GPU, its capability, SMs, CUDA, cuDNN and math switches) and
        ``tf32_off`` (the domain records TF32 off for matmuls and convolutions).
    """
    stages = packed["stage_gpu"]
    capped = bool(stages) and all(
        g is not None
        and g["fraction"] is not None
        and abs(g["fraction"] - gpu.cap_fraction(share, g["total_bytes"])) < 1e-9
        and g["peak_bytes"] <= g["fraction"] * g["total_bytes"]
        for g in stages
    )
    math = str(live.get("gpu_math") or "")
    fields = ("gpu", "gpu_capability", "cuda", "cudnn", "gpu_math")
    return {
        "memory_cap": capped,
        "on_gpu": packed["stage_devices"] == ["cuda"] and all(g is not None for g in stages),
        "domain_gpu_fields": all(live.get(k) for k in fields) and int(live.get("gpu_sms") or 0) > 0,
        "tf32_off": "matmul_allow_tf32=0" in math and "cudnn_allow_tf32=0" in math,
    }


def driver_version() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (None where it is missing)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def run(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Every step, filling ``result`` as it goes (so a failure still leaves what was measured)."""
    cuda, config, shards, gpus, overrides, cfg = settings(args)
    isa = cfg.resources.cpu_isa
    info = device_info(cuda)
    result.update(mode="gpu" if cuda else "cpu-smoke", device=info)  # first: in the JSON even if the alarm comes early
    print(f"mode {'gpu' if cuda else 'cpu-smoke'}: {info['device_name']}, torch {info['torch']}", flush=True)
    print(f"config {config} overrides {overrides}", flush=True)
    train, source = load_train(cfg)
    print(f"data: {len(train)} samples of {train.feature_shape} ({source})", flush=True)

    import ray

    started = time.perf_counter()
    result.update(
        {
            "mode": "gpu" if cuda else "cpu-smoke",
            "note": None
            if cuda
            else (
                "CPU smoke run on tiny settings: not GPU numbers (the 'GPU' store, its domain, repeat and "
                "verify ran on the CPU)"
            ),
            "device": info,
            "machine": benchlib.machine_info(),
            # started with the pins: serial and monolithic training run in this process, in the shards' domain
            "pinned": {"cpu_isa": isa, "from_start": domains.pinned_from_start(isa)},
            "config_path": str(config),
            "overrides": overrides,
            "config": config_to_dict(cfg),
            "data": {"source": source, "train": len(train), "feature_shape": list(train.feature_shape)},
        }
    )
    result["math"] = {
        "outside_training": gpu.math_flags(),  # this process's switches, as torch left them
        "pinned_in_training": gpu.PINNED_MATH,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    with benchlib.run_folder(None, "gpu_check-") as workdir:
        benchlib.start_ray(max(benchlib.usable_cpus(), shards))
        result["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        if cuda and result["ray_resources"].get("GPU", 0) < 1:
            # Preflight: shard tasks asking for a GPU share would wait forever.
            raise RuntimeError(
                f"Ray sees no GPU (cluster resources {result['ray_resources']}) although torch sees "
                f"{torch.cuda.device_count()}: check CUDA_VISIBLE_DEVICES and that Ray detects the GPUs"
            )
        t0 = time.perf_counter()
        # Ray workers start, import torch and initialise CUDA; this process warms up too (for serial and monolithic).
        for name, address in (("warm-ray", None), ("warm-local", orchestrator.LOCAL)):
            benchlib.warm_up(cfg, train, workdir / name, samples=WARMUP_SAMPLES, per_stage=4, address=address)
        result["warmup_s"] = time.perf_counter() - t0
        print(f"warm-up {result['warmup_s']:.1f}s", flush=True)

        packed_ens, packed = fit(cfg, train, workdir / "packed", None)
        print(f"packed: {shards} shards on Ray at {gpus:g} GPU each: {packed['fit_s']:.1f}s", flush=True)
        result["packed"] = packed

        # The domain the shards trained in, as the store recorded it for the live models.
        live = packed_ens.status()["per_shard"][0]["domain"] or {}
        available = orchestrator.available_domains(None, cfg.resources)
        result["domain"] = {
            "id": live.get("id"),
            "description": domains.describe(live or None),
            "device": live.get("device"),
            "on_gpu": cuda and live.get("device") == "cuda",
            "record": live,
            "single": set(packed["live_domains"]) == {live.get("id")} and packed["stage_domains"] == [live.get("id")],
            "available": [{"id": d.domain.id, "description": domains.describe(d.domain)} for d in available],
            "is_available": live.get("id") in {d.domain.id for d in available},
        }
        print(f"domain: {result['domain']['description']}", flush=True)

        serial_ens, serial = fit(cfg, train, workdir / "serial", orchestrator.LOCAL)
        serial_ens.close()
        print(f"serial: one after another in this process: {serial['fit_s']:.1f}s", flush=True)
        result["serial"] = serial
        result["throughput_ratio"] = serial["fit_s"] / packed["fit_s"]
        result["packed_equals_serial"] = packed["weights"] == serial["weights"]

        repeat_ens, repeat = fit(cfg, train, workdir / "repeat", None)
        repeat_ens.close()
        result["repeat"] = repeat
        result["repeat_identical"] = (
            repeat["stage_weights_digest"] == packed["stage_weights_digest"]
            and repeat["weights"] == packed["weights"]
            and repeat["stage_domains"] == packed["stage_domains"]
        )
        print(f"repeat: packed fit again: every stage identical {result['repeat_identical']}", flush=True)

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
            "domains": {str(k): domains.domain_id(v) for k, v in cert["shards"].items()},
        }
        result["deletion_speedup"] = mono_s / delete_s
        print(f"deletion of id {victim}: {delete_s:.2f}s ({result['deletion_speedup']:.1f}x vs monolithic)")

        check = replay_check(packed_ens, retrained or None, cfg.resources.device)
        packed_ens.close()
        result["verify"] = {"ok": check["bit_identical"], "shards": check["shards"], "seconds": check["seconds"]}
        result["gpu_store_verify"] = {"on_gpu": cuda, **check}
        print(
            f"verify shards {check['shards']}: ok={check['ok']} (replayed on {', '.join(check['replay_devices'])} "
            f"in the live domain: {check['same_domain']})",
            flush=True,
        )

        result["backbone"] = backbone_check(cfg, train, workdir / "backbone", cfg.resources.device)
        cpu = cpu_store_check(train, workdir / "cpu", str(result["domain"]["id"]))
        result["cpu_store_verify"] = cpu
        print(f"cpu store: domain {cpu['description']}; verify ok={cpu['ok']} on {cpu['replay_devices']}", flush=True)
    result["total_s"] = time.perf_counter() - started
    checks = {
        "verify": result["verify"]["ok"],
        "packed_equals_serial": result["packed_equals_serial"],
        "bf16_repeat_identical": result["bf16"]["repeat_identical"],
        "single_domain": result["domain"]["single"] and result["domain"]["is_available"],
        "repeat_identical": result["repeat_identical"],
        "gpu_store_verify": result["gpu_store_verify"]["ok"],
        "cpu_store_verify": result["cpu_store_verify"]["ok"],
        "backbone_verify": result["backbone"]["ok"],
    }
    if cuda:  # two domains on a GPU machine (device cuda vs cpu); in the smoke run both stores are the CPU's
        checks["cpu_and_gpu_domains_differ"] = result["cpu_store_verify"]["differs_from_gpu_store_domain"]
        result["claims"] = gpu_claims(result["packed"], result["domain"]["record"], gpus)
        checks.update(result["claims"])
    result["checks"] = {k: bool(v) for k, v in checks.items()}
    result["ok"] = all(result["checks"].values())
    return result


DEADLINE_EXIT = 124  # what `timeout` returns: the run was cut short


def write_json(out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out`` (its folder made if needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


def on_deadline(result: dict[str, Any], out: Path) -> Any:
    """A SIGALRM handler that writes what was measured, ends this run's processes and exits 124.

    Not an exception raised into the run: Ray and the libraries it calls may catch and log
    one, and the run would go on past the outside limit with nothing written.
    """

    def handler(_signum: int, _frame: Any) -> None:
        error = "DeadlineError: the check ran past its --deadline; the JSON holds what was measured until then"
        try:
            snapshot = json.loads(json.dumps(result, default=str))  # the main thread may be changing it
        except (RuntimeError, ValueError):
            snapshot = {}
        write_json(out, {**snapshot, "ok": False, "error": error})
        print(f"FAILED ({error}); partial results in {out}", flush=True)
        kill_trees({child.pid for child in psutil.Process().children()})  # Ray's processes, worker children
        os._exit(DEADLINE_EXIT)

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the JSON; exit status 1 unless every entry of its ``checks`` holds.

    From the command line (``argv`` None) the script first restarts itself pinned
    (:func:`restart_pinned`); called with ``argv`` it runs in this process as it is.
    """
    args = parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    out = out or ROOT / "docs" / "bench" / "gpu_check.json"
    result: dict[str, Any] = {}
    try:
        if argv is None:
            res = settings(args).cfg.resources
            restart_pinned(res.cpu_isa, res.device)
        # A device run is one shot with an outside time limit: stop in time to write what was measured.
        signal.signal(signal.SIGALRM, on_deadline(result, out))
        signal.alarm(max(1, int(args.deadline)))
        run(args, result)
        signal.alarm(0)
    except NoCudaError as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        write_json(out, result)
        print(f"gpu_check: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException as exc:
        # A device run is one shot: keep whatever was measured, and why it stopped.
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        write_json(out, result)
        print(f"FAILED ({result['error']}); partial results in {out}", flush=True)
        raise
    write_json(out, result)
    failed = [name for name, held in result["checks"].items() if not held]
    print(
        f"throughput ratio packed/serial {result['throughput_ratio']:.2f}x, deletion speedup "
        f"{result['deletion_speedup']:.1f}x, verify ok={result['verify']['ok']}, packed == serial "
        f"{result['packed_equals_serial']}, repeat identical {result['repeat_identical']}; "
        f"{'all checks hold' if not failed else 'FAILED: ' + ', '.join(failed)}; "
        f"total {result['total_s']:.0f}s; wrote {out}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
