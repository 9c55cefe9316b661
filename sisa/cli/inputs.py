"""What a ``sisa`` command reads besides its flags: its store, its config, the ids it names."""

from __future__ import annotations

import argparse
import sys

from sisa.config.fields import config_to_dict
from sisa.config.loader import config_from_dict, load_config
from sisa.config.settings import SisaConfig
from sisa.ensemble import Ensemble
from sisa.errors import DataError
from sisa.evaluate.settings import load_evaluate_config
from sisa.unlearn.ids import parse_id_args, parse_ids_text, read_ids_file

__all__ = ["core_ids", "delete_ids", "load_command_config", "open_writer"]


def open_writer(args: argparse.Namespace) -> Ensemble:
    """The store of a writing command, opened for writing (waiting ``--wait`` seconds for the lock)."""
    return Ensemble.open(args.store, address=getattr(args, "address", None), resume=False, lock_timeout=args.wait)


def load_command_config(path: str | None, overrides: list[str], stored: SisaConfig | None = None) -> SisaConfig:
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


def delete_ids(args: argparse.Namespace) -> list[int]:
    """The ids of ``sisa delete``: ``--ids ID ...``, ``--ids-file FILE``, or ``--ids-file -`` (standard input).

    Raises:
        DataError: If both or neither are given, or an id is not an integer.
    """
    if (args.ids is None) == (args.ids_file is None):
        raise DataError("give the ids to delete with exactly one of --ids ID [ID ...] or --ids-file FILE")
    if args.ids is not None:
        return parse_id_args(args.ids)
    if args.ids_file == "-":
        return parse_ids_text(sys.stdin.read(), "standard input")
    return read_ids_file(args.ids_file)


def core_ids(args: argparse.Namespace) -> list[int] | None:
    """The ids ``--core-ids FILE`` lists (one per line), or None."""
    return read_ids_file(args.core_ids) if args.core_ids else None
