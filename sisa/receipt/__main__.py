"""``sisa-verify-receipt RECEIPT [RECEIPT ...] --key PUBKEY`` (or ``python -m sisa.receipt``): check deletion receipts.

Exit 0 when every signature and proof checks; 1 naming the first that fails; 2 when a file cannot be read.
Standard library and ``cryptography`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sisa.errors import ProofError
from sisa.receipt.notes import Verifier
from sisa.receipt.verify import verify_receipt

__all__ = ["main"]


def _load(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"sisa-verify-receipt: cannot read the {what} {path}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the verifier; returns the exit code."""
    parser = argparse.ArgumentParser(prog="sisa-verify-receipt", description=__doc__.splitlines()[0])
    parser.add_argument(
        "receipt", nargs="+", help="the receipt JSON (`sisa receipt --id N` writes it); several are checked one by one"
    )
    parser.add_argument(
        "--key", required=True, help="the operator's verifier key (name+hash+base64) or a file holding it"
    )
    parser.add_argument(
        "--consistency", metavar="FILE", help="JSON of `sisa audit --consistency` run later on the receipt's checkpoint"
    )
    args = parser.parse_args(argv)
    key = args.key if args.key.count("+") >= 2 and not Path(args.key).exists() else _load(args.key, "key").strip()
    try:
        verifier = Verifier.decode(key)
    except ProofError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    doc = json.loads(_load(args.consistency, "consistency proof")) if args.consistency else None
    failed = 0
    for path in args.receipt:
        # One receipt prints as before; several name their file on each line.
        name = f"{path}: " if len(args.receipt) > 1 else ""
        try:
            done = verify_receipt(json.loads(_load(path, "receipt")), verifier, doc)
        except json.JSONDecodeError as exc:
            print(f"{name}FAIL: not JSON: {exc}", file=sys.stderr)
            failed += 1
            continue
        except ProofError as exc:
            print(f"{name}FAIL: {exc}", file=sys.stderr)
            failed += 1
            continue
        for line in done:
            print(f"{name}ok: {line}")
    if failed and len(args.receipt) > 1:
        print(f"{failed} of {len(args.receipt)} receipts failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
