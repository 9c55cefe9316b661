"""``sisa train`` and ``sisa add``: read data, check it against the recipe before anything is written, train.

Config, data files, model and shard sizes are checked before a store is created or changed,
so a run refused for bad input leaves no store behind and an existing store byte for byte
as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from sisa.cli.cmd_inspect import score_store
from sisa.cli.format import stage_progress
from sisa.cli.inputs import core_ids, load_command_config, open_writer
from sisa.cli.parser import ADD_FORMATS
from sisa.cli.render import print_eval
from sisa.config.settings import SisaConfig
from sisa.data.loaders import LabeledArrays, load_split
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError
from sisa.partition.placement import check_shard_sizes, place
from sisa.store.database import Store
from sisa.store.ingest import number_after_stored
from sisa.train.adapters import build_shard_model
from sisa.train.backbone import build_network

__all__ = ["cmd_add", "cmd_train", "load_input"]


def _preflight(
    cfg: SisaConfig, shape: tuple[int, ...], train: LabeledArrays | None, core: list[int] | None = None
) -> None:
    """Refuse, before anything is written, what training would refuse later.

    The model must build for the data's sample shape (a CNN needs images, a custom
    callable must import and run, a backbone must run and have the LoRA targets), and new
    data must give every shard at least ``slices`` samples (else the first fit refuses,
    after the store was created). A core-set backbone needs core ids among the new samples.
    """
    backbone = build_network(cfg, shape) if cfg.backbone.enabled else None
    build_shard_model(cfg, shape, cfg.data.num_classes, backbone)
    if train is not None:
        shard, _, _ = place(cfg, train.ids, None, None)
        check_shard_sizes(cfg, np.bincount(shard, minlength=cfg.shards).tolist())
    _check_core(cfg, train, core)


def _check_core(cfg: SisaConfig, train: LabeledArrays | None, core: list[int] | None) -> None:
    """``--core-ids`` goes with a core-trained backbone, with new data, and names ids of that data."""
    if core is not None and cfg.backbone.source != "core":
        raise ConfigError(
            f"--core-ids declares the core set a core-trained backbone learns from, and backbone.source is "
            f"{cfg.backbone.source}: set backbone.source=core with backbone.name, or drop --core-ids"
        )
    if core is not None and train is None:
        raise ConfigError(
            "--core-ids names another core set than this store's, and the store holds its training data already: "
            "the core set is declared when samples are ingested (re-running `sisa train` with the same file is "
            "fine); add core samples with `sisa add --input FILE --core-ids IDS` (the backbone and every shard "
            "retrain), or train the new core set into another --store"
        )
    if core is not None and train is not None:
        outside = sorted(set(core) - set(train.ids.tolist()))
        if outside:
            raise DataError(
                f"{len(outside)} core id(s) are not ids of the training data (first: {outside[:5]}); list ids of "
                "the samples being ingested (Fashion-MNIST and IDX samples are numbered 0..n-1)"
            )
    if cfg.backbone.source == "core" and core is None and train is not None:
        raise ConfigError(
            "backbone.source=core trains the shared backbone on a core set of never-deletable samples: give their "
            "ids with --core-ids FILE (one id per line), or use backbone.source=pretrained"
        )


def _open_for_train(args: argparse.Namespace, store: Path, core: list[int] | None) -> tuple[Ensemble, Any, Any]:
    """The store of ``sisa train``: opened (resumed) or created, its config, data and core set checked.

    Returns:
        The ensemble, the training data to ingest (None: the store holds its data) and the test split.
    """
    train: LabeledArrays | None = None
    if (store / "data.mdb").exists():
        ens = Ensemble.open(store, address=args.address, lock_timeout=args.wait)
        try:
            cfg = ens.config
            if args.config or args.overrides:
                # Overrides apply on top of the given file, or else on top of the stored config.
                cfg = load_command_config(args.config, args.overrides, ens.config)
            shape = ens.feature_shape
            if shape is None:  # created, never ingested
                train = load_split(cfg.data, "train", raw=True)
                shape = train.feature_shape
            else:
                _refuse_new_train_data(store, ens.config, cfg)
                core = _same_core(ens, core)
            test = _test_split(cfg)
            _preflight(cfg, shape, train, core)
            if cfg is not ens.config:
                ens.reconfigure(cfg)
        except BaseException:
            ens.close()
            raise
        return ens, train, test
    # Refused before Ray starts or data is read (Ensemble.create would refuse it only after that).
    Store.check_new_path(store)
    cfg = load_command_config(args.config, args.overrides)
    train, test = load_split(cfg.data, "train", raw=True), _test_split(cfg)
    _preflight(cfg, train.feature_shape, train, core)
    # Join the cluster (or start the local instance a plan of every shard needs) before the store
    # exists: a wrong address or token leaves nothing behind.
    from sisa.train import orchestrator  # Ray is imported only by commands that train

    if orchestrator.choose_runner(args.address, cfg.shards) == "ray":
        orchestrator.connect(args.address)
    return Ensemble.create(store, cfg, address=args.address), train, test


def _test_split(cfg: SisaConfig) -> LabeledArrays | None:
    """The test split ``train`` scores the ensemble on; ``None`` for a file dataset without ``data.test``.

    A team with one training file can train (and delete) without a test split: ``train`` then says
    that it measured no accuracy, rather than refusing to train at all.
    """
    if cfg.data.dataset != "fashion-mnist" and cfg.data.test is None:
        return None
    return load_split(cfg.data, "test")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Create (or resume) a store, ingest the configured training data, train, evaluate."""
    started = time.perf_counter()
    store = Path(args.store)
    core = core_ids(args)
    ens, train, test = _open_for_train(args, store, core)
    with ens:
        ingested = ens.ingest(train, core=core) if train is not None else 0
        cfg = ens.config
        with stage_progress(args.json, "training", cfg.shards * cfg.slices) as tick:
            report = ens.fit(progress=tick)
        result: dict[str, Any] = {"accuracy": None, "test_samples": 0}
        if test is not None:
            result = score_store(ens, test=test)
        result.update(
            {
                "store": str(store),
                "ingested": ingested,
                "trained": {str(k): v for k, v in report.trained.items()},
                "skipped": report.skipped,
                "fit_seconds": report.seconds,
                "train_compute_seconds": report.stage_seconds,
                "retries": report.retries,
                "rebound": {str(k): v for k, v in report.rebound.items()},
                "runner": report.runner,
                "wall_seconds": time.perf_counter() - started,
            }
        )
    if not args.json:
        if test is not None:
            print_eval(result)
        else:
            print("no test data (data.test is not set): accuracy not measured; `sisa eval` measures it once it is set")
        print(
            f"trained {sum(len(v) for v in report.trained.values())} stages on {len(report.trained)} shards "
            f"(skipped {len(report.skipped)} up-to-date), fit {result['fit_seconds']:.1f}s, "
            f"wall {result['wall_seconds']:.1f}s"
        )
        for retry in report.retries:
            print(
                f"shard {retry['shard']} lost its worker ({retry['error']}); "
                f"resumed after stage {retry['after_stage']} (retry {retry['attempt']})"
            )
        for shard, info in report.rebound.items():
            print(f"shard {shard} was retrained from scratch (rebound): {info['reason']}")
    return result


# The data fields that decide what `train` ingests; on a store that holds samples they are not read again.
_TRAIN_DATA_FIELDS = ("dataset", "train", "train_labels", "root", "label_column", "id_column", "train_limit")


def _refuse_new_train_data(store: Path, stored: SisaConfig, cfg: SisaConfig) -> None:
    """Refuse a ``train`` that points an ingested store at other training data.

    ``train`` ingests only into a store that holds no samples yet; silently training the old
    samples while the user believes the new file was read is the trap this closes.

    Raises:
        ConfigError: If a field in :data:`_TRAIN_DATA_FIELDS` differs from the stored config.
    """
    changed = [
        f"data.{name}: {getattr(stored.data, name)!r} -> {getattr(cfg.data, name)!r}"
        for name in _TRAIN_DATA_FIELDS
        if getattr(stored.data, name) != getattr(cfg.data, name)
    ]
    if changed:
        raise ConfigError(
            f"store {store} already holds its training data, so `sisa train` would not read the new setting "
            f"({'; '.join(changed)}): add new samples with `sisa add --store {store} --input FILE` (npz, CSV or "
            "IDX; they train as new slices), or train the new data into another --store"
        )


def _input_format(args: argparse.Namespace, cfg: SisaConfig) -> str:
    """The format of ``sisa add --input``: ``--format``, else the file's suffix, else the store's dataset."""
    if args.format:
        return str(args.format)
    name = Path(args.input).name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".csv"):
        return "csv"
    if args.labels is not None or "ubyte" in name or "idx" in name:
        return "idx"
    if cfg.data.dataset in ADD_FORMATS:
        return cfg.data.dataset
    raise DataError(f"cannot tell the format of {args.input}: pass --format {'|'.join(ADD_FORMATS)}")


def load_input(args: argparse.Namespace, cfg: SisaConfig, raw: bool = False) -> LabeledArrays:
    """The samples ``sisa add --input`` names, in any format ``train`` reads (npz, CSV, IDX).

    CSV files are read with the store's ``data.label_column`` and ``data.id_column``; an IDX
    images file needs ``--labels``. Without ids in the file, the samples are numbered after the
    largest id the store has held (see :meth:`Ensemble.ingest`). With ``raw``, IDX pixels
    stay uint8 (for a store that keeps raw pixels).
    """
    fmt = _input_format(args, cfg)
    if fmt == "idx" and args.labels is None:
        raise DataError(f"{args.input} is read as IDX images: give its labels file with --labels FILE")
    if fmt != "idx" and args.labels is not None:
        raise DataError(f"--labels goes with IDX images only; {args.input} is read as {fmt}")
    data_cfg = dataclasses.replace(
        cfg.data, dataset=fmt, train=str(args.input), train_labels=args.labels, train_limit=None
    )
    return load_split(data_cfg, "train", raw=raw)


def _same_core(ens: Ensemble, core: list[int] | None) -> list[int] | None:
    """None when ``core`` is the store's core set already (``train`` re-run on its store), else ``core``.

    The preflight then refuses a different core set on a store that holds its data.
    """
    if core is None:
        return None
    with ens.store.read() as txn:
        stored = ens.store.core_ids(txn)
    return None if set(core) == set(stored.tolist()) else core


def cmd_add(args: argparse.Namespace) -> dict[str, Any]:
    """Add samples from a file (npz, CSV or IDX) as new slices and train only those."""
    core = core_ids(args)
    with open_writer(args) as ens:
        data = load_input(args, ens.config, raw=ens.store.meta().get("feature_scale") is not None)
        numbered = data.numbered
        if numbered:
            data = number_after_stored(ens.store, data)
        with stage_progress(args.json, "training") as tick:
            report = ens.add(data, progress=tick, core=core)
    result: dict[str, Any] = {
        "added": len(data),
        "ids": [int(data.ids.min()), int(data.ids.max())],
        "numbered": numbered,
        "trained": {str(k): v for k, v in report.trained.items()},
        "seconds": report.seconds,
    }
    if not args.json:
        how = " (the file has no ids: numbered after the store's largest id)" if numbered else ""
        print(
            f"added {len(data)} samples, ids {result['ids'][0]}..{result['ids'][1]}{how}; "
            f"trained stages {result['trained']} in {report.seconds:.1f}s"
        )
    return result
