"""``sisa keys`` (the operator's signing key) and ``sisa receipt`` (a deleted id's receipt)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sisa.errors import DataError

__all__ = ["cmd_keys", "cmd_receipt", "write_private"]


def cmd_keys(args: argparse.Namespace) -> dict[str, Any]:
    """Where the signing key lives and its verifier key (``--public``: that key alone); ``--generate`` creates it."""
    from sisa.receipt.keys import key_path, load_signer

    path = key_path()
    if args.generate and path.exists():
        raise DataError(f"a signing key exists at {path} already; it is kept (move it away first to make a new one)")
    signer = load_signer(create=args.generate, name=args.name)
    result = {"path": str(path), "public": signer.verifier.encode()}
    if not args.json:
        print(result["public"] if args.public else f"signing key {path}\nverifier key {result['public']}")
    return result


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new owner-only file (a receipt names a person's id); never overwrite one.

    Raises:
        DataError: If the file exists or cannot be written.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise DataError(f"cannot create {path} ({exc.strerror}); name a new file") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def cmd_receipt(args: argparse.Namespace) -> dict[str, Any]:
    """Write the receipt of a deleted id: to ``--out`` (owner-only), else to standard output. Never logged."""
    from sisa.ensemble import Ensemble
    from sisa.unlearn.ids import parse_id_args

    [sample_id] = parse_id_args([args.receipt_id], "--id")
    with Ensemble.open(args.store, readonly=True) as ens:
        receipt = ens.receipt(sample_id)
    text = json.dumps(receipt, indent=1, sort_keys=True) + "\n"
    if args.out:
        write_private(Path(args.out), text)
        if not args.json:
            print(
                f"receipt of id {sample_id} written to {args.out}; "
                f"check it with sisa-verify-receipt {args.out} --key KEY"
            )
        return {"receipt": args.out}
    if not args.json:
        print(text, end="")
    return receipt
