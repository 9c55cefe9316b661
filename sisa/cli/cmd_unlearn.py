"""The ``sisa`` commands that forget and prove it: delete, apply, resume, verify."""

from __future__ import annotations

import argparse
from typing import Any

from sisa.cli.cmd_inspect import CheckFailed
from sisa.cli.exits import EXIT_ERROR, EXIT_FAILED_CHECK
from sisa.cli.format import stage_progress
from sisa.cli.inputs import delete_ids, open_writer
from sisa.cli.render import print_certificate, print_verify
from sisa.ensemble import Ensemble

__all__ = ["cmd_apply", "cmd_delete", "cmd_resume", "cmd_verify"]


def cmd_delete(args: argparse.Namespace) -> dict[str, Any]:
    """Forget samples by id: journal, erase (before any retrain), retrain affected shards, certify."""
    ids = delete_ids(args)
    with open_writer(args) as ens, stage_progress(args.json, "retraining") as tick:
        cert = ens.delete(ids, defer=args.defer, progress=tick)
    if not args.json:
        print_certificate(cert)
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
