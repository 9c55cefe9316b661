"""Helpers shared by the benchmark scripts.

The machine description, data subsets, the common options (``--out``, ``--workdir``,
``--quick``, overrides), a fresh Ray instance and run folder, building and fitting a store,
the work a fit or a deletion did, and writing the results (JSON, PNG beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from sisa.config.fields import config_to_dict
from sisa.config.settings import SisaConfig
from sisa.data.loaders import LabeledArrays
from sisa.ensemble import Ensemble
from sisa.evaluate.monolithic import usable_threads
from sisa.train.planner import FitReport

T = TypeVar("T")


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return usable_threads(0)


def machine_info() -> dict[str, Any]:
    """Describe the machine and software the numbers come from."""
    import ray

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "loadavg_start": loadavg(),
        "torch": str(torch.__version__),
        "torch_threads_default": torch.get_num_threads(),
        "ray": ray.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def head(data: LabeledArrays, n: int) -> LabeledArrays:
    """The first ``n`` samples of ``data`` (views; the store copies what it ingests)."""
    return LabeledArrays(data.x[:n], data.y[:n], data.ids[:n])


def subset(data: LabeledArrays, n: int, seed: int) -> LabeledArrays:
    """A seeded uniform draw of ``n`` samples of ``data`` without replacement, kept in id order.

    Args:
        data: The samples to draw from.
        n: How many to keep (``n >= len(data)``: all of them).
        seed: Seed of the draw (``numpy.random.default_rng``).

    Returns:
        The drawn samples (copies), sorted by position in ``data``.
    """
    if n >= len(data):
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    # replace() keeps ``scale`` (raw pixels stay raw) and ``numbered``.
    return dataclasses.replace(data, x=data.x[keep], y=data.y[keep], ids=data.ids[keep])


def script_parser(doc: str | None, config: Path | None = None) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of the script's docstring.

    Args:
        doc: The script's docstring.
        config: Default of a ``--config`` option (the YAML config); ``None``: no such option.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config is not None:
        parser.add_argument("--config", type=Path, default=config, help="YAML config")
    return parser


# --------------------------------------------------------------------------- options
DEFAULT_WORKDIR_HELP = "folder for the temporary stores (default: the system tempdir); they are removed"


def add_run_options(
    parser: argparse.ArgumentParser,
    *,
    out: Path | None,
    quick_help: str,
    out_help: str = "JSON output; the PNG goes beside it",
    workdir_help: str = DEFAULT_WORKDIR_HELP,
) -> None:
    """Add the options every full benchmark run shares: ``--out``, ``--workdir``, ``--quick`` and the overrides.

    Args:
        parser: The script's parser (see :func:`script_parser`).
        out: Default of ``--out`` (``None``: the script picks one by mode).
        quick_help: Help of ``--quick`` (what the smoke run changes).
        out_help: Help of ``--out``.
        workdir_help: Help of ``--workdir``.
    """
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    parser.add_argument("--workdir", type=Path, default=None, help=workdir_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=5")


def add_mode_option(
    parser: argparse.ArgumentParser, flag: str, *, kind: type, what: str, full: object, quick: object
) -> None:
    """Add an option whose default depends on ``--quick`` (it stays ``None`` until :func:`by_mode`).

    Args:
        parser: The script's parser.
        flag: The option, e.g. ``--requests``.
        kind: Type of its value (``str`` for comma-separated lists parsed later).
        what: Help text before the defaults.
        full: Default of a full run (shown in the help).
        quick: Default with ``--quick`` (shown in the help).
    """
    parser.add_argument(flag, type=kind, default=None, help=f"{what} (default {full}; {quick} with --quick)")


def by_mode(value: T | None, quick: bool, quick_default: T, full_default: T) -> T:
    """``value`` where the option was given, else the default of the run's mode (see :func:`add_mode_option`)."""
    if value is not None:
        return value
    return quick_default if quick else full_default


def parse_ints(text: str, name: str) -> list[int]:
    """Turn a comma-separated option into a sorted list of distinct positive ints.

    Args:
        text: The option's value, e.g. ``1,10,100``.
        name: The option's name without dashes, for the error message.

    Returns:
        The distinct values, ascending.

    Raises:
        SystemExit: On a non-integer or non-positive value.
    """
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise SystemExit(f"--{name}={text!r} must be comma-separated integers") from exc
    if not values or values[0] < 1:
        raise SystemExit(f"--{name}={text!r} must list positive integers")
    return values


# --------------------------------------------------------------------------- Ray and run folders
def start_ray(num_cpus: int | None = None) -> float | None:
    """Stop any Ray instance of this process and start a fresh local one.

    Args:
        num_cpus: CPUs of the new instance (default: all cores).

    Returns:
        The instance's CPU count, as Ray reports it.
    """
    import ray

    from sisa.train import orchestrator

    orchestrator.shutdown()
    # address="local": a new local instance even when RAY_ADDRESS names a cluster.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU")
    return float(cpus) if cpus is not None else None


@contextmanager
def run_folder(parent: Path | None, prefix: str) -> Iterator[Path]:
    """A fresh temporary folder for one run's stores; on exit Ray is shut down and the folder removed.

    Args:
        parent: Where to make it (created if missing); ``None``: the system tempdir.
        prefix: Start of the folder's name, e.g. ``bench_train-``.

    Yields:
        The new folder. Only it is removed, never ``parent``.
    """
    from sisa.train import orchestrator

    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        orchestrator.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- stores
def build_and_fit(
    cfg: SisaConfig, train: LabeledArrays, path: Path, *, address: str | None = None
) -> tuple[Ensemble, FitReport, dict[str, float]]:
    """Create a store at ``path``, ingest ``train`` and fit it, timing both steps.

    On a CUDA config the device is synchronised before the fit's clock starts.

    Args:
        cfg: The ensemble's config.
        train: Training samples to ingest.
        path: Store directory (new).
        address: Where to train (``None``: Ray, as :meth:`Ensemble.create` takes it).

    Returns:
        The open ensemble (the caller closes it), the fit's report, and the wall seconds
        ``ingest_s`` and ``fit_s``.

    Raises:
        Exception: Whatever creating, ingesting or fitting raises; the ensemble is closed first.
    """
    ens = Ensemble.create(path, cfg, address=address)
    try:
        t0 = time.perf_counter()
        ens.ingest(train)
        ingest_s = time.perf_counter() - t0
        if cfg.resources.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        report = ens.fit()
        fit_s = time.perf_counter() - t0
    except BaseException:
        ens.close()
        raise
    return ens, report, {"ingest_s": ingest_s, "fit_s": fit_s}


def warm_up(
    cfg: SisaConfig,
    train: LabeledArrays,
    path: Path,
    *,
    samples: int = 400,
    per_stage: int = 8,
    address: str | None = None,
) -> float:
    """Fit a tiny throw-away store with ``cfg``, so workers are up and have imported torch before a timed fit.

    Args:
        cfg: Config of the fits to warm up for (same shards, so as many workers start).
        train: Training data; only its first samples are used.
        path: Store directory (new); removed afterwards.
        samples: Samples to fit at the least.
        per_stage: Samples per stage (``shards x slices``) to fit at the least, so no slice is empty.
        address: Where to train (``None``: Ray).

    Returns:
        Wall seconds of the warm-up fit.
    """
    n = min(len(train), max(samples, per_stage * cfg.shards * cfg.slices))
    ens, _, times = build_and_fit(cfg, head(train, n), path, address=address)
    ens.close()
    shutil.rmtree(path, ignore_errors=True)
    return times["fit_s"]


def stage_records(ens: Ensemble) -> list[dict[str, Any]]:
    """Every stage record of the store now, in (shard, stage) order."""
    with ens.store.read() as txn:
        return [r for s in range(ens.config.shards) for r in ens.store.stage_records(txn, s)]


def sample_epochs(records: Iterable[dict[str, Any]]) -> int:
    """Training work of stage records: the sum of ``n_samples x epochs``."""
    return sum(int(r["n_samples"]) * int(r["epochs"]) for r in records)


def retrain_cost(ens: Ensemble, cert: dict[str, Any]) -> dict[str, Any]:
    """What an applied deletion retrained, from its certificate, checked against the store.

    Args:
        ens: The ensemble just after the deletion.
        cert: The deletion's certificate.

    Returns:
        ``stages`` (new checkpoints), ``work`` (their sample-epochs) and ``compute_s``
        (their training seconds), summed over the certificate's retrained shards;
        ``samples`` (sum of ``n_samples`` of those stages) and ``new_checkpoints_match``
        (the store's stage records after each shard's restart stage are exactly the
        certificate's ``new_checkpoints``), read from the store.
    """
    shards = cert["shards"]
    out: dict[str, Any] = {
        "stages": sum(len(info["new_checkpoints"]) for info in shards.values()),
        "work": sum(int(info["sample_epochs"]) for info in shards.values()),
        "compute_s": sum(float(info["compute_seconds"]) for info in shards.values()),
        "samples": 0,
        "new_checkpoints_match": True,
    }
    with ens.store.read() as txn:
        for key, info in shards.items():
            new = [r for r in ens.store.stage_records(txn, int(key)) if r["stage"] > info["restart_stage"]]
            out["samples"] += sum(int(r["n_samples"]) for r in new)
            same = [r["sha256"] for r in new] == list(info["new_checkpoints"])
            out["new_checkpoints_match"] = out["new_checkpoints_match"] and same
    return out


def applied_delete(ens: Ensemble, sample_id: int, tag: str = "") -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Delete one id, timed, and read what its retrain cost (:func:`retrain_cost`).

    Args:
        ens: A writable, fitted ensemble holding ``sample_id``.
        sample_id: The id to delete.
        tag: Prefix of the error message, e.g. ``[head S=16] ``.

    Returns:
        The certificate, ``delete()`` wall seconds and :func:`retrain_cost` of the certificate.

    Raises:
        RuntimeError: The deletion was not applied at once.
    """
    t0 = time.perf_counter()
    cert = ens.delete([sample_id])
    wall = time.perf_counter() - t0
    if cert.get("state") != "applied":
        raise RuntimeError(f"{tag}deletion of id {sample_id} was not applied: {cert.get('state')}")
    return cert, wall, retrain_cost(ens, cert)


# --------------------------------------------------------------------------- results
def pyplot() -> types.ModuleType:
    """``matplotlib.pyplot`` on the file-only ``Agg`` backend (imported here, when a script first plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, title: str | None = None, *, fontsize: int = 9, dpi: int = 120) -> None:
    """Title a figure, lay it out, write it to ``path`` and close it.

    Args:
        fig: A matplotlib figure.
        path: Image file to write (its format from the suffix).
        title: The figure's suptitle; ``None``: none.
        fontsize: The title's font size.
        dpi: Resolution of the image.
    """
    if title is not None:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def run_header(config_path: Path, overrides: Sequence[str], quick: bool, cfg: SisaConfig) -> dict[str, Any]:
    """The first keys of a run's JSON: ``config_path``, ``overrides``, ``quick`` and the resolved ``config``."""
    return {
        "config_path": str(config_path),
        "overrides": list(overrides),
        "quick": quick,
        "config": config_to_dict(cfg),
    }


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the OS has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def write_results(
    out: Path, result: dict[str, Any], draw: Callable[[Path], None] | None = None, *, indent: int = 2, note: str = ""
) -> Path | None:
    """Write ``result`` as JSON to ``out``, draw its PNG beside it, and say where both went.

    Args:
        out: JSON path (its folder is created).
        result: What the run measured.
        draw: Writes the figure to the path it is given (``out`` with ``.png``); ``None``: no figure.
        indent: JSON indentation.
        note: Appended to the printed ``wrote ...`` line.

    Returns:
        The PNG's path, or ``None`` without ``draw``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent))
    if draw is None:
        print(f"\nwrote {out}{note}")
        return None
    png = out.with_suffix(".png")
    draw(png)
    print(f"\nwrote {out} and {png}{note}")
    return png
