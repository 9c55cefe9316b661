"""The ``sisa`` command line: train, eval, status, delete, apply, pending, verify, audit, add, resume, domains.

(``sisa evaluate`` lives in :mod:`sisa.cli.evaluate`.)

Every command takes ``--json`` (one JSON object on stdout) and exits 2 with a one-line
``error:`` message on bad input (and when verify cannot replay a shard because no node
of its determinism domain is available), 1 when verify or audit finds a problem;
progress bars go to stderr. Ray's own log lines go to a file (:mod:`sisa.cli.ray_log`), to
stderr with ``-v``.
"""

# The imports below run_in_worker() and reexec_pinned() come after them on purpose: both must run
# before torch loads.
# ruff: noqa: E402

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sisa.cli.launch import command_line, reexec_pinned, run_in_worker

# The `sisa` command only (never an import), before torch loads: a small training command goes to
# the user's warm worker if one answers; else the process restarts in the store's pinned domain.
run_in_worker()
reexec_pinned()

import numpy as np

from sisa.cli import evaluate as cli_evaluate
from sisa.cli.format import ADDRESS_HELP, VERBOSE_HELP, progress_bar, table
from sisa.cli.ray_log import RayLog
from sisa.config.settings import SisaConfig, config_from_dict, config_to_dict, load_config
from sisa.data.loaders import LabeledArrays, load_split
from sisa.ensemble import Ensemble
from sisa.errors import ConfigError, DataError, SisaError
from sisa.evaluate.settings import load_evaluate_config
from sisa.partition.placement import check_shard_sizes, place
from sisa.store.ingest import number_after_stored
from sisa.train.adapters import build_shard_model
from sisa.train.backbone import build_network
from sisa.train.domain import DOMAIN_FIX, missing_reason

__all__ = ["main", "run"]

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader, as after SIGPIPE
EXIT_FAILED_CHECK = 1  # verify or audit ran and found a problem
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class VerificationError(Exception):
    """verify or audit completed and failed (or could not check); carries the JSON result and exit code."""

    def __init__(self, result: dict[str, Any], exit_code: int = EXIT_FAILED_CHECK) -> None:
        super().__init__("check failed")
        self.result = result
        self.exit_code = exit_code


def _int_id(text: str) -> int:
    from sisa.unlearn.ids import parse_id

    try:
        return parse_id(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer id") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def _evaluate(ens: Ensemble, method: str | None = None, test: LabeledArrays | None = None) -> dict[str, Any]:
    test = load_split(ens.config.data, "test") if test is None else test
    started = time.perf_counter()
    accuracy = ens.score(test.x, test.y, method=method)
    per_shard = ens.shard_scores(test.x, test.y)
    return {
        "accuracy": accuracy,
        "method": method or ens.config.aggregate.method,
        "per_shard_accuracy": {str(k): v for k, v in per_shard.items()},
        "test_samples": len(test),
        "eval_seconds": time.perf_counter() - started,
    }


def _print_eval(result: dict[str, Any]) -> None:
    rows = [[f"shard {k}", f"{v:.4f}"] for k, v in result["per_shard_accuracy"].items()]
    rows.append([f"ensemble ({result['method']})", f"{result['accuracy']:.4f}"])
    print(table(["model", "test accuracy"], rows))


def _load_config(path: str | None, overrides: Sequence[str], stored: SisaConfig | None = None) -> SisaConfig:
    """The config of ``path`` (or else of ``stored``) with ``overrides``, checking the ``evaluate:`` section too.

    ``load_config`` ignores that section (only ``sisa evaluate`` reads it); checking it here makes a
    typo in it, or in an ``evaluate.*`` override, fail every command at once rather than at the next evaluate.
    """
    if not path and stored is not None:
        cfg = config_from_dict(config_to_dict(stored), overrides)
        load_evaluate_config(None, overrides)
    else:
        cfg = load_config(path, overrides)
        load_evaluate_config(path, overrides)
    return cfg


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


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """Create (or resume) a store, ingest the configured training data, train, evaluate.

    Config, data files, model and shard sizes are all checked before the store is created
    or changed, so a run refused for bad input leaves no store behind and an existing
    store byte for byte as it was.
    """
    started = time.perf_counter()
    store = Path(args.store)
    train: LabeledArrays | None = None
    core = _core_ids(args)
    if (store / "data.mdb").exists():
        ens = Ensemble.open(store, address=args.address, lock_timeout=args.wait)
        try:
            cfg = ens.config
            if args.config or args.overrides:
                # Overrides apply on top of the given file, or else on top of the stored config.
                cfg = _load_config(args.config, args.overrides, ens.config)
            shape = ens.feature_shape
            if shape is None:  # created, never ingested
                train = load_split(cfg.data, "train", raw=True)
                shape = train.feature_shape
            else:
                _refuse_new_train_data(store, ens.config, cfg)
                core = _same_core(ens, core)
            test = load_split(cfg.data, "test")
            _preflight(cfg, shape, train, core)
            if cfg is not ens.config:
                ens.reconfigure(cfg)
        except BaseException:
            ens.close()
            raise
    else:
        cfg = _load_config(args.config, args.overrides)
        train, test = load_split(cfg.data, "train", raw=True), load_split(cfg.data, "test")
        _preflight(cfg, train.feature_shape, train, core)
        # Join the cluster (or start the local instance a plan of every shard needs) before the store
        # exists: a wrong address or token leaves nothing behind.
        from sisa.train import orchestrator  # Ray is imported only by commands that train

        if orchestrator.choose_runner(args.address, cfg.shards) == "ray":
            orchestrator.connect(args.address)
        ens = Ensemble.create(store, cfg, address=args.address)
    with ens:
        ingested = ens.ingest(train, core=core) if train is not None else 0
        cfg = ens.config
        bar = progress_bar(cfg.shards * cfg.slices, "training") if not args.json else None
        report = ens.fit(progress=(lambda _r: bar.update(1)) if bar is not None else None)
        if bar is not None:
            bar.close()
        result = _evaluate(ens, test=test)
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
        _print_eval(result)
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


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Ensemble and per-shard accuracy on the configured test split."""
    with Ensemble.open(args.store, readonly=True) as ens:
        result = _evaluate(ens, args.method)
    if not args.json:
        _print_eval(result)
    return result


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    """Shards, slices, sample counts and live checkpoint digests."""
    with Ensemble.open(args.store, readonly=True) as ens:
        result = ens.status()
    if not args.json:
        low, high = min(result["shard_slices"]), max(result["shard_slices"])
        slices = f"{low}" if low == high else f"{low}-{high}"  # add() gives touched shards one more slice each
        print(
            f"store {result['store']}: {result['samples']} samples, {result['shards']} shards x "
            f"{slices} slices, model {result['model']}, {result['trained_shards']} shards live"
        )
        if result["backbone"]:
            b = result["backbone"]
            stored = b["stored"]
            held = f"digest {stored['digest'][:16]}, {stored['bytes']} bytes" if stored else "not stored yet (fit)"
            core = f", core set of {b['core_samples']} samples (not deletable)" if b["source"] == "core" else ""
            print(f"shared backbone: {b['source']} {b['name']}, {held}; per-shard {b['adapter']}{core}")
        rows = [
            [
                s["shard"],
                s["samples"],
                " ".join(map(str, s["slice_samples"])),
                s["stages_done"],
                (s["live_checkpoint"] or "-")[:16],
                (s["domain"] or {}).get("id", "-"),
                _serving(s),
            ]
            for s in result["per_shard"]
        ]
        print(table(["shard", "samples", "per slice", "stages", "live checkpoint", "domain", "serving"], rows))
    return result


def _serving(shard: dict[str, Any]) -> str:
    """What a shard serves, in a word or two, for the status table."""
    if not shard["live"]:
        return "out of service" if shard["stages_done"] else "-"
    if shard["interim"]:
        return f"stage {shard['live_stage']} (clean, deletion pending)"
    if shard["stale"]:
        return "stale (deletion pending)"
    return f"stage {shard['live_stage']}"


def _writer(args: argparse.Namespace) -> Ensemble:
    return Ensemble.open(args.store, address=getattr(args, "address", None), resume=False, lock_timeout=args.wait)


def _stage_bar(args: argparse.Namespace, desc: str) -> tuple[Any, Any]:
    """A progress bar over committed stages (none with --json), and the callback advancing it."""
    if args.json:
        return None, None
    bar = progress_bar(None, desc)
    return bar, lambda _r: bar.update(1)


def _print_certificate(cert: dict[str, Any]) -> None:
    if cert["state"] == "noop":
        print(f"nothing to do: {cert['already_deleted']} id(s) were already deleted")
        return
    what = "journaled (deferred; run `sisa apply`)" if cert["state"] == "pending" else "applied"
    print(
        f"request {cert['request_id']} {what}: {cert['deleted']} sample(s) deleted, "
        f"{cert['already_deleted']} already deleted before"
    )
    rows = [
        [
            k,
            f"{v['from_slice']} (rebound)" if v.get("rebound") else v["from_slice"],
            len(v["removed_checkpoints"]),
            len(v.get("new_checkpoints", [])),
            (v.get("live_checkpoint") or "-")[:16],
        ]
        for k, v in cert["shards"].items()
    ]
    print(table(["shard", "from slice", "removed ckpts", "new ckpts", "new live checkpoint"], rows))
    for k, v in cert["shards"].items():
        if v.get("rebound"):
            print(f"shard {k} was retrained from scratch (rebound): {v['rebind_reason']}")
    if "seconds" in cert:
        applied = f"applied in {cert['apply_seconds']:.2f}s, " if "apply_seconds" in cert else ""
        print(f"done: {applied}{cert['seconds']:.2f}s since the request was journaled; audit entry {cert['audit_seq']}")
    for other in cert.get("also_applied", []):
        print(f"also finished pending request {other['request_id']}:")
        _print_certificate(other)


def cmd_delete(args: argparse.Namespace) -> dict[str, Any]:
    """Forget samples by id: journal, retrain affected shards, erase, certify."""
    from sisa.unlearn.ids import read_ids_file

    if (args.ids is None) == (args.ids_file is None):
        raise DataError("give the ids to delete with exactly one of --ids ID [ID ...] or --ids-file FILE")
    ids = read_ids_file(args.ids_file) if args.ids_file else args.ids
    with _writer(args) as ens:
        bar, tick = _stage_bar(args, "retraining")
        cert = ens.delete(ids, defer=args.defer, progress=tick)
        if bar is not None:
            bar.close()
    if not args.json:
        _print_certificate(cert)
    return cert


def cmd_apply(args: argparse.Namespace) -> dict[str, Any]:
    """Apply all deferred requests as one batch."""
    with _writer(args) as ens:
        bar, tick = _stage_bar(args, "retraining")
        certs = ens.apply(progress=tick)
        if bar is not None:
            bar.close()
    if not args.json:
        print(f"applied {len(certs)} request(s)")
        for cert in certs:
            _print_certificate(cert)
    return {"applied": certs}


def cmd_pending(args: argparse.Namespace) -> dict[str, Any]:
    """List journaled requests not yet applied."""
    with Ensemble.open(args.store, readonly=True) as ens:
        requests = ens.pending()
    if not args.json:
        print(f"{len(requests)} pending request(s)")
        for r in requests:
            print(f"  request {r['request_id']}: {r['deleted']} id(s), shards {', '.join(r['shards'])}")
    return {"pending": requests}


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    """Retrain shards from scratch and compare with the live models."""
    with Ensemble.open(args.store, readonly=True, address=args.address) as ens:
        bar, tick = _stage_bar(args, "replaying")
        result = ens.verify(args.shard, progress=tick)
        if bar is not None:
            bar.close()
    if not args.json:
        rows = [
            [
                k,
                v["samples"],
                (v["domain"] or {}).get("id", "-"),
                (v["live_weights"] or "-")[:16],
                (v["replay_weights"] or "-")[:16],
                "ok" if v["ok"] else "NOT CHECKED" if v.get("reason") == "domain_unavailable" else "FAIL",
                "no node of its domain" if v.get("reason") == "domain_unavailable" else v.get("reason", ""),
            ]
            for k, v in result["shards"].items()
        ]
        print(table(["shard", "samples", "domain", "live weights", "replay weights", "", ""], rows))
        missing = {k: v for k, v in result["shards"].items() if v.get("reason") == "domain_unavailable"}
        for k, v in missing.items():
            print(f"shard {k}: {missing_reason(v['needs'], '?', v['available'])}", file=sys.stderr)
        if missing:
            print(DOMAIN_FIX, file=sys.stderr)
        if result["ok"]:
            print("verify: OK, every live model is bit-identical to a retrain from scratch in its domain")
        elif result.get("reason") == "domain_unavailable":
            print("verify: INCOMPLETE, no tampering found, but some shards could not be replayed (see above)")
        else:
            print("verify: FAILED")
    if not result["ok"]:
        # Not checkable is not a failed check: exit 2 (as for any request that cannot run here), not 1.
        unavailable = result.get("reason") == "domain_unavailable"
        raise VerificationError(result, EXIT_ERROR if unavailable else EXIT_FAILED_CHECK)
    return result


def _utc(seconds: float | None) -> str:
    """Unix seconds as an ISO 8601 UTC time, or ``-``."""
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _print_lookup(found: dict[str, Any]) -> None:
    if not found["deleted"]:
        print(f"{found['message']}; keyed hash {found['id_hash']}")
    elif found["state"] == "applied":
        print(
            f"id {found['id']}: deleted by request {found['request_id']}, requested {_utc(found['requested_at'])}, "
            f"applied {_utc(found['applied_at'])}, certificate in audit entry {found['audit_seq']}; "
            f"keyed hash {found['id_hash']}"
        )
    else:
        print(
            f"id {found['id']}: deletion requested by request {found['request_id']} at "
            f"{_utc(found['requested_at'])}, still {found['state']} (no certificate yet; `sisa apply` or "
            f"`sisa resume` finishes it); keyed hash {found['id_hash']}"
        )


def cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Recompute the audit log's hash chain; with ``--show`` list the certificates, with ``--id`` look ids up."""
    with Ensemble.open(args.store, readonly=True) as ens:
        report = ens.audit()
        certificates = ens.certificates() if args.show else None
        lookups = ens.lookup(args.lookup_ids) if args.lookup_ids else None
    result: dict[str, Any] = {"ok": report.ok, "entries": report.entries, "problems": report.problems}
    if certificates is not None:
        result["certificates"] = certificates
    if lookups is not None:
        result["lookups"] = lookups
    if not args.json:
        for cert in certificates or []:
            print(
                f"audit entry {cert['audit_seq']}: request {cert['request_id']}, requested "
                f"{_utc(cert.get('requested_at'))}, applied {_utc(cert.get('applied_at'))}, "
                f"{len(cert.get('id_hashes', []))} id hash(es), policy {cert.get('policy')}"
            )
            _print_certificate(cert)
            print()
        for found in lookups or []:
            _print_lookup(found)
        print(f"audit: {report.entries} entries, " + ("chain OK" if report.ok else "CHAIN BROKEN"))
        for problem in report.problems:
            print(f"  {problem}")
    if not report.ok:
        raise VerificationError(result)
    return result


_FORMATS = ("npz", "csv", "idx")


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
    if cfg.data.dataset in _FORMATS:
        return cfg.data.dataset
    raise DataError(f"cannot tell the format of {args.input}: pass --format {'|'.join(_FORMATS)}")


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


def _core_ids(args: argparse.Namespace) -> list[int] | None:
    """The ids ``--core-ids FILE`` lists (one per line), or None."""
    from sisa.unlearn.ids import read_ids_file

    return read_ids_file(args.core_ids) if args.core_ids else None


def cmd_add(args: argparse.Namespace) -> dict[str, Any]:
    """Add samples from a file (npz, CSV or IDX) as new slices and train only those."""
    core = _core_ids(args)
    with _writer(args) as ens:
        data = load_input(args, ens.config, raw=ens.store.meta().get("feature_scale") is not None)
        numbered = data.numbered
        if numbered:
            data = number_after_stored(ens.store, data)
        bar, tick = _stage_bar(args, "training")
        report = ens.add(data, progress=tick, core=core)
        if bar is not None:
            bar.close()
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


def cmd_domains(args: argparse.Namespace) -> dict[str, Any]:
    """Which determinism domains the cluster's nodes offer, and which shards need which."""
    from sisa.train import orchestrator
    from sisa.train.domain import describe

    if (args.store is None) == (args.config is None):
        raise DataError("give exactly one of --store STORE (a trained ensemble) or --config FILE (before training)")
    if args.store is not None and args.overrides:
        raise DataError("key=value overrides go with --config; a store's settings are its stored config")
    shards: dict[str, list[int]] = {}  # domain id -> live shards trained in it
    records: dict[str, dict[str, Any]] = {}  # domain id -> its record
    if args.store is not None:
        # The live records alone: status() would also count every slice's members.
        with Ensemble.open(args.store, readonly=True) as ens, ens.store.read() as txn:
            cfg = ens.config
            for shard, live in sorted(ens.store.live(txn).items()):
                if live.get("domain") is not None:
                    shards.setdefault(live["domain"]["id"], []).append(shard)
                    records[live["domain"]["id"]] = live["domain"]
    else:
        cfg = _load_config(args.config, args.overrides)
    res = cfg.resources
    found = orchestrator.available_domains(args.address, res)
    have = {d.domain.id for d in found}
    missing: list[dict[str, Any]] = [
        {"domain": records[i], "shards": sorted(ids)} for i, ids in sorted(shards.items()) if i not in have
    ]
    result: dict[str, Any] = {
        "cpu_isa": res.cpu_isa,
        "threads": res.threads_per_shard,
        "device": res.device,
        "available": [
            {"domain": d.domain.to_dict(), "nodes": list(d.nodes), "shards": shards.get(d.domain.id, [])} for d in found
        ],
        "missing": missing,
    }
    if not args.json:
        print(
            f"determinism domains (resources.cpu_isa={res.cpu_isa}, {res.threads_per_shard} thread(s), {res.device}):"
        )
        for d in found:
            bound = " ".join(map(str, shards.get(d.domain.id, []))) or "-"
            print(f"  {describe(d.domain)}\n    nodes: {len(d.nodes)}; live shards: {bound}")
        for m in missing:
            print(
                f"  MISSING {describe(m['domain'])}\n    no node; live shards {' '.join(map(str, m['shards']))} "
                "cannot be verified here, and a deletion in them retrains from scratch (on_missing_domain=rebind)"
            )
    return result


def cmd_resume(args: argparse.Namespace) -> dict[str, Any]:
    """Finish interrupted deletions and training."""
    with _writer(args) as ens:
        result = ens.resume()
    if not args.json:
        print(f"resumed: applied {len(result['applied'])} request(s), trained {result['trained'] or 'nothing'}")
    return result


def cmd_compact(args: argparse.Namespace) -> dict[str, Any]:
    """Rewrite data.mdb without its free pages (space; erasure never needs it)."""
    with _writer(args) as ens:
        before, after = ens.store.compact()
    result = {"store": str(args.store), "bytes_before": before, "bytes_after": after}
    if not args.json:
        print(f"compacted {args.store}/data.mdb: {before:,} -> {after:,} bytes")
    return result


def cmd_migrate(args: argparse.Namespace) -> dict[str, Any]:
    """Copy a format-2 store into a new format-3 directory (the old one is only read)."""
    from sisa.store.migrate import migrate  # rarely used: keep it off the start-up path

    result = migrate(args.store, args.to).to_dict()
    if not args.json:
        form = result["feature_dtype"] + ("" if result["feature_scale"] is None else f" / {result['feature_scale']:g}")
        print(
            f"migrated {result['samples']} samples ({form}) and {result['checkpoints']} checkpoints into "
            f"{result['target']}: {result['bytes_before']:,} -> {result['bytes_after']:,} bytes; "
            f"{result['source']} is unchanged. Use --store {result['target']} from now on"
        )
    return result


CORE_HELP = (
    "file of ids (one per line) of the new samples that form the core set: they train the shared backbone "
    "(backbone.source=core) and can never be deleted"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sisa`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", required=True, help="store directory of the ensemble")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    common.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)

    writer = argparse.ArgumentParser(add_help=False)
    writer.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for another writer (a running apply, say) to release the store (default: 0)",
    )

    parser = argparse.ArgumentParser(prog="sisa", description="Exact machine unlearning with SISA training.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", parents=[common, writer], help="ingest the configured data and train (or resume)")
    train.add_argument("--config", help="YAML config (e.g. configs/fashion_mnist.yaml)")
    train.add_argument("--address", default=None, help=ADDRESS_HELP)
    train.add_argument("--core-ids", metavar="FILE", help=CORE_HELP)
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. shards=8 train.lr=0.01"
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", parents=[common], help="test accuracy of the ensemble and of each shard")
    ev.add_argument(
        "--method", choices=["mean", "vote", "weighted"], default=None, help="aggregation (default: config)"
    )
    ev.set_defaults(func=cmd_eval)

    st = sub.add_parser("status", parents=[common], help="shards, slices, sample counts, live checkpoints")
    st.set_defaults(func=cmd_status)

    ray_opt = argparse.ArgumentParser(add_help=False)
    ray_opt.add_argument("--address", default=None, help=ADDRESS_HELP)

    de = sub.add_parser("delete", parents=[common, ray_opt, writer], help="forget samples: retrain, erase, certify")
    de.add_argument("--ids", nargs="+", type=_int_id, help="sample ids to delete")
    de.add_argument("--ids-file", help="file with one integer id per line")
    de.add_argument("--defer", action="store_true", help="only journal now (ids tombstoned); `sisa apply` later")
    de.set_defaults(func=cmd_delete)

    ap = sub.add_parser("apply", parents=[common, ray_opt, writer], help="apply deferred deletions as one batch")
    ap.set_defaults(func=cmd_apply)

    pe = sub.add_parser("pending", parents=[common], help="deletion requests not yet applied")
    pe.set_defaults(func=cmd_pending)

    ve = sub.add_parser("verify", parents=[common, ray_opt], help="retrain from scratch; bit-identical or fail")
    ve.add_argument("--shard", type=int, action="append", help="shard to verify (repeatable; default all)")
    ve.set_defaults(func=cmd_verify)

    au = sub.add_parser(
        "audit", parents=[common], help="check the audit log's hash chain; show certificates; look ids up"
    )
    au.add_argument("--show", action="store_true", help="also print every certificate in the log (all with --json)")
    au.add_argument(
        "--id",
        dest="lookup_ids",
        nargs="+",
        type=_int_id,
        metavar="ID",
        help="was this id deleted, when, by which request? (named by its keyed hash under the store's key)",
    )
    au.set_defaults(func=cmd_audit)

    ad = sub.add_parser(
        "add", parents=[common, ray_opt, writer], help="add samples (npz, CSV or IDX) as new slices and train them"
    )
    ad.add_argument(
        "--input",
        required=True,
        help="samples in any format train reads: .npz (x, y, optional ids), .csv (the store's data.label_column "
        "and data.id_column) or IDX images (with --labels); without ids they continue after the store's largest id",
    )
    ad.add_argument("--format", choices=_FORMATS, help="the input's format (default: from its name)")
    ad.add_argument("--labels", help="IDX labels file for IDX images")
    ad.add_argument("--core-ids", metavar="FILE", help=CORE_HELP + "; the backbone and every shard retrain")
    ad.set_defaults(func=cmd_add)

    re_ = sub.add_parser("resume", parents=[common, ray_opt, writer], help="finish interrupted deletions and training")
    re_.set_defaults(func=cmd_resume)

    do = sub.add_parser(
        "domains", parents=[ray_opt], help="determinism domains of the nodes, and which shards need which"
    )
    do.add_argument("--store", default=None, help="a trained ensemble: also list the domain each live shard needs")
    do.add_argument("--config", default=None, help="a YAML config (before training): its pins, threads and device")
    do.add_argument(
        "overrides", nargs="*", metavar="key=value", help="with --config: overrides, e.g. resources.cpu_isa=native"
    )
    do.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    do.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    do.set_defaults(func=cmd_domains)

    co = sub.add_parser(
        "compact",
        parents=[common, writer],
        help="rewrite data.mdb without free pages (reclaims space; also drops deleted ids' numbers from them)",
    )
    co.set_defaults(func=cmd_compact)

    mi = sub.add_parser(
        "migrate", parents=[common], help="copy a store of the previous format (2) into a new directory"
    )
    mi.add_argument("--to", required=True, metavar="DIR", help="new directory for the migrated store")
    mi.set_defaults(func=cmd_migrate)

    cli_evaluate.register(sub)
    return parser


def _interrupted_message(args: argparse.Namespace) -> str:
    """What a Ctrl-C left behind, and the command that finishes it."""
    store = getattr(args, "store", None)
    if store is None or args.command not in ("train", "delete", "apply", "add", "resume"):
        return "interrupted"
    again = " (or the same `sisa train` command)" if args.command == "train" else ""
    return (
        f"interrupted: every stage committed so far is kept in {store}, and a journaled deletion stays pending; "
        f"`sisa resume --store {store}`{again} finishes the training and any interrupted deletion"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sisa`` command line.

    Run as the ``sisa`` command (``argv`` None), the process ends as soon as the command's
    output is out and its store closed (:func:`_exit_now`): a Python process that loaded
    torch and Ray takes about a second more to tear its modules down, and a graceful
    ``ray.shutdown()`` of a local instance it started takes over a second, neither of which
    a finished command needs to wait for.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 on success, 2 on a sisa error.
    """
    code = _main(argv)
    if argv is None and command_line():  # never end a process that called main() itself
        _exit_now(code)
    return code


# Commands whose every file and store is closed when they return (``evaluate`` keeps the normal exit).
_EXIT_NOW = frozenset({"train", "eval", "status", "delete", "pending", "apply", "verify", "audit", "add", "resume"})


def _exit_now(code: int) -> None:
    """End the ``sisa`` process at once with ``code``, without the interpreter's slow teardown.

    Everything that matters is done first: stdout and stderr flushed, logging shut down,
    the pinned child of local training ended, and a local Ray instance this process started
    killed with every process of it (:func:`sisa.train.orchestrator.abandon_local_instance`).
    A process joined to a cluster exits normally, so Ray disconnects its driver cleanly.
    """
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in _EXIT_NOW:
        return
    ray = sys.modules.get("ray")
    orchestrator = sys.modules.get("sisa.train.orchestrator")
    if ray is not None and ray.is_initialized():
        if orchestrator is None or not orchestrator.started_local_instance():
            return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: nothing more can reach it
            pass
    logging.shutdown()
    local_runner = sys.modules.get("sisa.train.local_runner")
    if local_runner is not None:
        local_runner.close_all()
    if orchestrator is not None:
        orchestrator.abandon_local_instance()
    os._exit(code)


def run(argv: Sequence[str]) -> int:
    """Run one command in this process and return its exit code; the process goes on.

    What :mod:`sisa.cli.worker` calls for each command it is handed.
    """
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ray_log: RayLog | None = None
    ray_logged = False
    try:
        try:
            ray_log = RayLog.start(args.command, args.verbose)
            result = args.func(args)
        finally:
            ray_logged = ray_log is not None and ray_log.stop()
    except KeyboardInterrupt:
        print(_interrupted_message(args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`sisa ... | head`): whatever the command did is done;
        # point stdout at /dev/null so the interpreter's final flush does not fail again, and
        # exit as a process killed by SIGPIPE would (128 + 13), as git and coreutils do. Only the
        # `sisa` process itself: a caller of main() in its own process (a test, a notebook, the
        # worker) keeps its stdout.
        if command_line():
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except VerificationError as failed:
        if args.json:
            print(json.dumps(failed.result, sort_keys=True))
        return failed.exit_code
    except SisaError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        if ray_log is not None and ray_logged:
            print(f"(Ray's own log lines of this run: {ray_log.path}; -v prints them here)", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
