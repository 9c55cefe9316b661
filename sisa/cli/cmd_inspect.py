"""The ``sisa`` commands that read a store or a cluster (eval, status, pending, audit, domains); compact, migrate."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sisa.cli.inputs import load_command_config, open_writer
from sisa.cli.render import print_audit, print_eval, print_pending, print_status
from sisa.data.loaders import LabeledArrays, load_split
from sisa.ensemble import Ensemble
from sisa.errors import DataError, StoreLockedError

__all__ = [
    "CheckFailed",
    "cmd_audit",
    "cmd_compact",
    "cmd_domains",
    "cmd_eval",
    "cmd_migrate",
    "cmd_pending",
    "cmd_status",
    "score_store",
]


class CheckFailed(Exception):
    """verify or audit completed and failed (or could not check); carries the JSON result and exit code."""

    def __init__(self, result: dict[str, Any], exit_code: int) -> None:
        super().__init__("check failed")
        self.result = result
        self.exit_code = exit_code


def score_store(
    ens: Ensemble, methods: Sequence[str] | None = None, test: LabeledArrays | None = None
) -> dict[str, Any]:
    """Ensemble and per-shard accuracy on ``test`` (default: the config's test split), from one forward pass.

    Args:
        ens: The open ensemble.
        methods: Aggregation methods to score; holding ``"all"``: every one the store can serve;
            None or empty: the config's. ``accuracy`` and ``method`` are the first one's.
        test: The samples to score on.
    """
    test = load_split(ens.config.data, "test") if test is None else test
    started = time.perf_counter()
    chosen = None if "all" in (methods or ()) else list(dict.fromkeys(methods or [ens.config.aggregate.method]))
    scores = ens.scores(test.x, test.y, methods=chosen)
    first = next(iter(scores["accuracy"]))
    return {
        "accuracy": scores["accuracy"][first],
        "method": first,
        "accuracy_by_method": scores["accuracy"],
        "per_shard_accuracy": {str(k): v for k, v in scores["per_shard_accuracy"].items()},
        "test_samples": len(test),
        "eval_seconds": time.perf_counter() - started,
    }


def _read(args: argparse.Namespace, read: Callable[[Ensemble], dict[str, Any]], show: Callable[[Any], None]) -> Any:
    """``read`` the store through a read-only handle (no lock); print the result with ``show`` unless ``--json``."""
    with Ensemble.open(args.store, readonly=True) as ens:
        result = read(ens)
    if not args.json:
        show(result)
    return result


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Ensemble and per-shard accuracy on the configured test split."""
    return _read(args, lambda ens: score_store(ens, args.method), print_eval)


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    """Shards, slices, sample counts and live checkpoint keys."""
    return _read(args, lambda ens: ens.status(), print_status)


def cmd_pending(args: argparse.Namespace) -> dict[str, Any]:
    """List journaled requests not yet applied."""
    return _read(args, lambda ens: {"pending": ens.pending()}, lambda r: print_pending(r["pending"]))


def cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Recompute the audit log's hash chain; with ``--show`` list the certificates, with ``--id`` look ids up."""
    from sisa.cli.exits import EXIT_FAILED_CHECK
    from sisa.unlearn.ids import parse_id_args

    lookup_ids = parse_id_args(args.lookup_ids, "--id") if args.lookup_ids else None
    key = _read_key(args.key) if args.key else None
    old = _read_text(args.consistency, "--consistency") if args.consistency else None
    with Ensemble.open(args.store, readonly=True) as ens:
        if args.checkpoint:
            note = ens.checkpoint()
            if note is None:
                raise DataError(
                    f"store {args.store} has no signed checkpoint yet: open it writable once (`sisa resume`)"
                )
            if not args.json:
                print(note, end="")
            return {"checkpoint": note}
        if old is not None:
            proof = ens.consistency(old, key)
            if not args.json:
                verdict = "the log only grew" if proof["ok"] else "NOT CONSISTENT: the log was rewritten"
                print(f"consistency {proof['old']['size']} -> {proof['new']['size']}: {verdict}")
            if not proof["ok"]:
                raise CheckFailed(proof, EXIT_FAILED_CHECK)
            return proof
        report = ens.audit(key)
        certificates = ens.certificates() if args.show else None
        lookups = ens.lookup(lookup_ids) if lookup_ids else None
    result: dict[str, Any] = {"ok": report.ok, "entries": report.entries, "problems": report.problems}
    result.update(log_size=report.log_size, checkpoint=report.checkpoint)
    if certificates is not None:
        result["certificates"] = certificates
    if lookups is not None:
        result["lookups"] = lookups
    if not args.json:
        print_audit(result)
    if not report.ok:
        raise CheckFailed(result, EXIT_FAILED_CHECK)
    return result


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{option} {path}: cannot read it ({exc})") from exc


def _read_key(value: str) -> str:
    """A verifier key given as ``name+hash+base64`` or as a file holding it."""
    return value if value.count("+") >= 2 and not Path(value).exists() else _read_text(value, "--key").strip()


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
        cfg = load_command_config(args.config, args.overrides)
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


def cmd_compact(args: argparse.Namespace) -> dict[str, Any]:
    """Rewrite data.mdb without its free pages (space; erasure never needs it)."""
    with open_writer(args) as ens:
        before, after = ens.store.compact()
    result = {"store": str(args.store), "bytes_before": before, "bytes_after": after}
    if not args.json:
        print(f"compacted {args.store}/data.mdb: {before:,} -> {after:,} bytes")
    return result


def cmd_migrate(args: argparse.Namespace) -> dict[str, Any]:
    """Copy a store of an older format into a new directory; with ``--remove-source``, delete the old one after.

    The old directory still holds every sample it held (a format-2 store in plaintext), so the
    output says so. ``--remove-source`` holds the old store's writer lock from before the copy
    (no process may write it meanwhile) and removes it only after the migration succeeded.
    """
    from sisa.store.migrate import migrate  # rarely used: keep it off the start-up path

    source = Path(args.store)
    lock = _lock_source(source) if args.remove_source else None
    try:
        result = migrate(source, args.to).to_dict()
        result["source_removed"] = False
        if lock is not None:
            shutil.rmtree(source)
            result["source_removed"] = True
    finally:
        if lock is not None:
            os.close(lock)
    held = (
        "its samples in plaintext (format 2)"
        if result.get("source_format") == 2
        else "every sample, decryptable with the keys beside them"
    )
    if not args.json:
        form = result["feature_dtype"] + ("" if result["feature_scale"] is None else f" / {result['feature_scale']:g}")
        print(
            f"migrated {result['samples']} samples ({form}) and {result['checkpoints']} checkpoints into "
            f"{result['target']}: {result['bytes_before']:,} -> {result['bytes_after']:,} bytes. "
            f"Use --store {result['target']} from now on"
        )
        if result["source_removed"]:
            print(
                f"removed {result['source']}, which held {held}; its files are unlinked, not overwritten: "
                "their blocks stay on the disk until reused (an encrypted volume is what makes them unreadable)"
            )
        else:
            print(
                f"{result['source']} is unchanged and still holds {held}: once the new store works, remove it "
                "(run the migration with --remove-source, or delete the directory yourself)"
            )
    return result


def _lock_source(path: Path) -> int | None:
    """Take the old store's writer lock for the migration and removal (None: not a store; migrate says so).

    Raises:
        StoreLockedError: If another process holds it (nothing is copied or removed).
    """
    if not (path / "data.mdb").is_file():
        return None
    fd = os.open(path / "writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            f"store {path} is in use by another process: nothing was migrated or removed; stop it and run the "
            "migration again"
        ) from None
    return fd
