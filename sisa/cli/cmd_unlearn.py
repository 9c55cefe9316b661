"""The ``sisa`` commands that forget and prove it: delete, apply, resume, verify."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sisa.cli.cmd_inspect import CheckFailed
from sisa.cli.cmd_receipt import write_private
from sisa.cli.exits import EXIT_ERROR, EXIT_FAILED_CHECK
from sisa.cli.format import stage_progress
from sisa.cli.inputs import delete_ids, open_writer
from sisa.cli.render import print_certificate, print_verify
from sisa.ensemble import Ensemble
from sisa.errors import DataError

__all__ = ["cmd_apply", "cmd_delete", "cmd_resume", "cmd_verify"]


def cmd_delete(args: argparse.Namespace) -> dict[str, Any]:
    """Forget samples by id: journal, erase (before any retrain), retrain affected shards, certify."""
    ids = delete_ids(args)
    folder = Path(args.receipts) if args.receipts else None
    if folder is not None:
        if args.defer:
            raise DataError(
                "--receipts needs the deletion applied: drop --defer, or run `sisa receipt` after `sisa apply`"
            )
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # before deleting: a bad folder fails first
    with open_writer(args) as ens, stage_progress(args.json, "retraining") as tick:
        cert = ens.delete(ids, defer=args.defer, progress=tick, receipts=folder is not None)
    receipts = cert.pop("receipts", {})
    if folder is not None:
        files = []
        for sample_id, receipt in receipts.items():
            path = folder / f"receipt-{sample_id}.json"
            write_private(path, json.dumps(receipt, indent=1, sort_keys=True) + "\n")
            files.append(str(path))
        cert["receipt_files"] = files
    if not args.json:
        print_certificate(cert)
        if folder is not None:
            print(f"{len(receipts)} receipt(s) in {folder} (personal data: hand each to its data subject)")
    return cert


def cmd_apply(args: argparse.Namespace) -> dict[str, Any]:
    """Apply all deferred requests as one batch."""
    with open_writer(args) as ens, stage_progress(args.json, "retraining") as tick:
        certs = ens.apply(progress=tick)
    if not args.json:
        print(f"applied {len(certs)} request(s)")
        for cert in certs:
            print_certificate(cert)
    return {"applied": certs}


def cmd_resume(args: argparse.Namespace) -> dict[str, Any]:
    """Finish interrupted deletions and training."""
    with open_writer(args) as ens:
        result = ens.resume()
    if not args.json:
        print(f"resumed: applied {len(result['applied'])} request(s), trained {result['trained'] or 'nothing'}")
    return result


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    """Retrain shards from scratch and compare with the live models."""
    with (
        Ensemble.open(args.store, readonly=True, address=args.address) as ens,
        stage_progress(args.json, "replaying") as tick,
    ):
        result = ens.verify(args.shard, progress=tick)
    if not args.json:
        print_verify(result)
    if not result["ok"]:
        # Not checkable is not a failed check: exit 2 (as for any request that cannot run here), not 1.
        unavailable = result.get("reason") == "domain_unavailable"
        raise CheckFailed(result, EXIT_ERROR if unavailable else EXIT_FAILED_CHECK)
    return result
