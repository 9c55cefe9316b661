"""The ``sisa`` command's argument parser: light (standard library only), shared by the launcher and the commands.

One parser decides what a command line means, so the launcher (which hands small commands to
the warm worker before torch loads) and the command itself can never read it differently:
abbreviations are refused (``--addr`` is not ``--address``), and ``--opt=value`` is the same as
``--opt value`` everywhere. Ids stay text here and are parsed by the command (the id parser
needs numpy).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from typing import Any, NoReturn

from sisa.cli.format import ADDRESS_HELP, VERBOSE_HELP

__all__ = [
    "COMMANDS",
    "ParseError",
    "WORKER_COMMANDS",
    "build_parser",
    "parse",
    "try_parse",
]

CORE_HELP = (
    "file of ids (one per line) of the new samples that form the core set: they train the shared backbone "
    "(backbone.source=core) and can never be deleted"
)
IDS_FILE_HELP = "file with one integer id per line (# comments, blank lines skipped); `-` reads standard input"
ADD_FORMATS = ("npz", "csv", "idx")
# Every command, in the order `sisa --help` lists them.
COMMANDS = (
    "train",
    "eval",
    "status",
    "delete",
    "apply",
    "pending",
    "verify",
    "audit",
    "receipt",
    "keys",
    "add",
    "resume",
    "domains",
    "compact",
    "migrate",
    "evaluate",
    "serve",
)
# What a warm worker takes (:mod:`sisa.cli.worker`): the small training jobs. ``train`` creates stores
# and trains every shard, where a few seconds of start-up do not matter.
WORKER_COMMANDS = ("delete", "apply", "add", "resume", "verify")


class ParseError(Exception):
    """A command line the parser refuses (raised by :func:`try_parse` instead of printing usage and exiting)."""


class _Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with abbreviations off, for the command and every sub-command."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        super().error(message + _ids_hint(message))


def _ids_hint(message: str) -> str:
    """The fix for a parse error that bare sample ids caused (``sisa delete --store S 5 17``), else ``""``."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return ""
    extra = message[len(prefix) :].split()
    if not extra or not all(t.replace(",", "").isdigit() for t in extra):
        return ""
    ids = " ".join(i for t in extra for i in t.split(",") if i)
    return f" (sample ids go after an option: `sisa delete --ids {ids}`, `sisa audit --id N`, `sisa receipt --id N`)"


class _QuietParser(_Parser):
    """A parser that raises :class:`ParseError` where argparse would print usage and exit."""

    def error(self, message: str) -> NoReturn:
        raise ParseError(message + _ids_hint(message))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ParseError(message or f"exit {status}")

    def print_help(self, file: object = None) -> None:
        raise ParseError("help asked for")  # printed by the command itself, once


def _nice(text: str) -> int:
    from sisa.errors import ConfigError
    from sisa.train.priority import check_nice

    try:
        return check_nice(text, "--nice")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


NICE_HELP = (
    "CPU niceness of this command and its training child processes (0-19; default $SISA_TRAIN_NICE, else 0): a "
    "retrain yields the cores to serving on the same node; Ray tasks are not niced"
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


# Long on purpose (about 130 lines): a flat declaration, one add_parser per command in --help's order
# with its options beside it, which reads as the command line's reference; split, it would scatter that.
@functools.cache
def build_parser(quiet: bool = False) -> argparse.ArgumentParser:
    """The argument parser of the ``sisa`` command.

    Args:
        quiet: Raise :class:`ParseError` on a bad command line instead of printing usage and
            exiting (for the launcher, which then leaves the command to report it).

    Returns:
        The parser; ``args.command`` names the sub-command. Built once per process and kept
        (the launcher, the command and the worker parse with it; parsing changes no parser state).
    """
    cls = _QuietParser if quiet else _Parser
    common = cls(add_help=False)
    common.add_argument("--store", required=True, help="store directory of the ensemble")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    common.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)

    writer = cls(add_help=False)
    writer.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for another writer (a running apply, say) to release the store (default: 0)",
    )
    ray_opt = cls(add_help=False)
    ray_opt.add_argument("--address", default=None, help=ADDRESS_HELP)
    trainer = cls(add_help=False)  # the commands that may train
    trainer.add_argument("--nice", type=_nice, default=None, metavar="N", help=NICE_HELP)

    parser = cls(prog="sisa", description="Exact machine unlearning with SISA training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cls)

    train = sub.add_parser(
        "train", parents=[common, ray_opt, trainer, writer], help="ingest the configured data and train"
    )
    train.add_argument("--config", help="YAML config (e.g. configs/fashion_mnist.yaml)")
    train.add_argument("--core-ids", metavar="FILE", help=CORE_HELP)
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. shards=8 train.lr=0.01"
    )

    ev = sub.add_parser("eval", parents=[common], help="test accuracy of the ensemble and of each shard")
    ev.add_argument(
        "--method",
        nargs="+",
        choices=["mean", "vote", "weighted", "combiner", "all"],
        default=None,
        help="aggregation(s), scored from one pass of the shard models (default: the config's; all: every one "
        "the store serves)",
    )
    sub.add_parser("status", parents=[common], help="shards, slices, sample counts, live checkpoints")

    de = sub.add_parser(
        "delete", parents=[common, ray_opt, trainer, writer], help="forget samples: erase now, retrain, certify"
    )
    de.add_argument("--ids", nargs="+", metavar="ID", help="sample ids to delete, separated by spaces")
    de.add_argument("--ids-file", metavar="FILE", help=IDS_FILE_HELP)
    de.add_argument(
        "--receipts",
        metavar="DIR",
        help="also write each deleted id's receipt to DIR/receipt-ID.json (owner-only; personal data, keep private)",
    )
    de.add_argument(
        "--defer", action="store_true", help="journal and erase now (keys destroyed); retrain with `sisa apply` later"
    )

    sub.add_parser("apply", parents=[common, ray_opt, trainer, writer], help="apply deferred deletions as one batch")
    sub.add_parser("pending", parents=[common], help="deletion requests not yet applied")

    ve = sub.add_parser(
        "verify", parents=[common, ray_opt, trainer], help="retrain from scratch; bit-identical or fail"
    )
    ve.add_argument("--shard", type=int, action="append", help="shard to verify (repeatable; default all)")

    au = sub.add_parser(
        "audit", parents=[common], help="check the audit log's hash chain; show certificates; look ids up"
    )
    au.add_argument("--show", action="store_true", help="also print every certificate in the log (all with --json)")
    au.add_argument(
        "--id",
        dest="lookup_ids",
        nargs="+",
        metavar="ID",
        help="was this id deleted, when, by which request? (named by its keyed hash under the store's key)",
    )
    au.add_argument(
        "--checkpoint", action="store_true", help="print the transparency log's latest signed checkpoint and stop"
    )
    au.add_argument(
        "--consistency",
        metavar="OLD",
        help="a signed checkpoint kept earlier (a file): prove the log only grew since (JSON proof with --json)",
    )
    au.add_argument(
        "--key", help="verifier key (name+hash+base64, or a file) to check signatures with (default: the operator's)"
    )

    rc = sub.add_parser(
        "receipt", parents=[common], help="write the deletion receipt of an id (personal data: keep it private)"
    )
    rc.add_argument("--id", dest="receipt_id", required=True, metavar="ID", help="a deleted sample id")
    rc.add_argument("--out", metavar="FILE", help="write the receipt here (owner-only; default: standard output)")

    ke = sub.add_parser("keys", help="the operator's signing key (outside every store) and its verifier key")
    ke.add_argument("--public", action="store_true", help="print only the verifier key (name+hash+base64)")
    ke.add_argument("--generate", action="store_true", help="create the signing key (refused if one exists)")
    ke.add_argument("--name", help="key name of a new key (default: sisa-HOSTNAME)")
    ke.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ke.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)

    ad = sub.add_parser(
        "add",
        parents=[common, ray_opt, trainer, writer],
        help="add samples (npz, CSV or IDX) as new slices and train them",
    )
    ad.add_argument(
        "--input",
        required=True,
        help="samples in any format train reads: .npz (x, y, optional ids), .csv (the store's data.label_column "
        "and data.id_column) or IDX images (with --labels); without ids they continue after the store's largest id",
    )
    ad.add_argument("--format", choices=ADD_FORMATS, help="the input's format (default: from its name)")
    ad.add_argument("--labels", help="IDX labels file for IDX images")
    ad.add_argument("--core-ids", metavar="FILE", help=CORE_HELP + "; the backbone and every shard retrain")

    sub.add_parser(
        "resume", parents=[common, ray_opt, trainer, writer], help="finish interrupted deletions and training"
    )

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

    sub.add_parser(
        "compact",
        parents=[common, writer],
        help="rewrite data.mdb without free pages (reclaims space; also drops deleted ids' numbers from them)",
    )
    mi = sub.add_parser(
        "migrate", parents=[common], help="copy a store of an older format (2 or 3) into a new format-4 directory"
    )
    mi.add_argument("--to", required=True, metavar="DIR", help="new directory for the migrated store")
    mi.add_argument(
        "--remove-source",
        action="store_true",
        help="delete the old directory once the migration succeeded (it still holds every sample; format 2 in "
        "plaintext); its writer lock is held from the start, so no process writes it meanwhile",
    )

    _add_evaluate(sub)
    _add_serve(sub, common, ray_opt)
    return parser


def _add_serve(sub: Any, common: argparse.ArgumentParser, ray_opt: argparse.ArgumentParser) -> None:
    """``sisa serve``: its flags here (light), its work in :mod:`sisa.cli.cmd_serve`."""
    se = sub.add_parser(
        "serve",
        parents=[common, ray_opt],
        help="serve the ensemble over HTTP with Ray Serve; replicas follow every deletion (until SIGTERM / Ctrl-C)",
    )
    se.add_argument("--host", default="127.0.0.1", help="HTTP host of Ray Serve's proxy (default 127.0.0.1)")
    se.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    se.add_argument("--replicas", type=int, default=1, help="number of replicas (default 1)")
    se.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least this many replicas")
    se.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most this many replicas")
    se.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    se.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    se.add_argument(
        "--resources",
        default=None,
        metavar="JSON",
        help="custom Ray resources per replica, for placement, e.g. '{\"serving_node\": 0.01}'",
    )
    se.add_argument(
        "--policy",
        choices=["exclude", "serve-clean", "serve-stale"],
        default=None,
        help="while a deletion is pending, answer only with clean models (exclude), also the clean earlier slice's "
        "(serve-clean), or whatever the store serves (serve-stale; default: the store's own, set at delete time)",
    )
    se.add_argument("--name", default="sisa", help="Ray Serve application name (default sisa)")
    se.add_argument("--route-prefix", default="/", help="route prefix of the application (default /)")
    se.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MB (default 16; 413 above)")
    se.add_argument(
        "--lease",
        type=_seconds,
        default=15.0,
        metavar="SECONDS",
        help="a replica that cannot reach the store's publisher this long stops answering (default 15)",
    )
    se.add_argument(
        "--await-replicas",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="start nothing: wait until every replica of the running application serves the store as it is now "
        "(after a delete, say), up to SECONDS; exit 0 when confirmed, 1 on timeout",
    )


def _add_evaluate(sub: Any) -> None:
    """``sisa evaluate``: its flags here (light), its work in :mod:`sisa.cli.evaluate`."""
    ev = sub.add_parser(
        "evaluate", help="compare sisa with retraining and approximate unlearning (accuracy, MIA, KL, time)"
    )
    ev.add_argument("--config", help="YAML config (data, model, recipe and the evaluate: section)")
    ev.add_argument(
        "--forget",
        action="append",
        metavar="SPEC",
        help=(
            "forget set: random:FRACTION, class:LABEL, or a poisoning scenario "
            "backdoor:rate=R,target=T[,found=F][,patch=P] or flip:rate=R,from=A,to=B[,found=F]; "
            "repeat or comma-separate (default random:0.01)"
        ),
    )
    ev.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of retrain,sisa,gradient_ascent,finetune,prune,newton (default all)",
    )
    ev.add_argument("--out", default="runs/evaluate", help="output directory (stores, JSON, PNG); replaced")
    ev.add_argument("--address", default=None, help=ADDRESS_HELP)
    ev.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ev.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    ev.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. evaluate.prune.fraction=0.1"
    )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a ``sisa`` command line as the command does: usage errors print and exit 2, ``--help`` exits 0."""
    return build_parser().parse_args(argv)


def try_parse(argv: Sequence[str]) -> argparse.Namespace | None:
    """Parse ``argv`` without printing or exiting; None when the parser refuses it (or it asks for help)."""
    try:
        return build_parser(quiet=True).parse_args(argv)
    except ParseError:
        return None
