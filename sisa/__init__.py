"""sisa: exact machine unlearning with SISA training (sharded, isolated, sliced, aggregated) on Ray.

The package tree is the data flow. Layers, lowest first; a module imports only from its own
package and from layers listed before its own, never from one listed after it; and no modules
import each other, directly or in a cycle (local and ``TYPE_CHECKING`` imports included;
``tests/test_layers.py`` reads this list and enforces it):

    errors      SisaError hierarchy, picklable across Ray processes
    user_folder  this user's private folder on this node: warm workers' sockets, serving marks
    receipt     proofs anyone can check: RFC 6962 hashing, signed notes, receipts (stdlib + cryptography only)
    config      frozen dataclasses loaded from YAML, validated on load
    data        validated sample arrays; Fashion-MNIST, IDX, npz, CSV loaders
    partition   sample id -> (shard, slice); deletion priors; the deletion cost model
    store       the LMDB environment, stage and live records, content addresses
    train       determinism domain, models, trainer, Ray orchestration, the planner
    unlearn     deletion ids, journal, apply (retrain, erase, certify), verify, audit log
    serve       live shard models and their aggregation
    ensemble    the public facade: one object per store, delegating to the layers above
    evaluate    the evaluation harness: SISA against retraining and approximate unlearning
    sklearn_state  a fitted scikit-learn transformer's state as canonical JSON (an allow-list, never pickled)
    sklearn_preprocess  fitted scikit-learn transformers inside shard networks (the estimator's preprocessor=)
    sklearn     scikit-learn estimator on top of the facade
    cli         the ``sisa`` command line
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sisa import errors
from sisa.errors import *  # noqa: F403 - the error types are light, and every caller may catch one

if TYPE_CHECKING:  # what type checkers see of the lazily imported names below (explicit re-exports)
    from sisa.config.loader import load_config as load_config
    from sisa.config.settings import SisaConfig as SisaConfig
    from sisa.data.loaders import LabeledArrays as LabeledArrays
    from sisa.data.loaders import as_arrays as as_arrays
    from sisa.data.loaders import load_split as load_split
    from sisa.ensemble import Ensemble as Ensemble
    from sisa.ensemble import FitReport as FitReport

# The public names and the modules that define them, imported on first use (PEP 562): the
# ``sisa`` command reads a store's pins before torch loads (:mod:`sisa.cli.launch`), which an
# eager ``import sisa`` of the facade would defeat.
_LAZY = {
    "SisaConfig": "sisa.config.settings",
    "load_config": "sisa.config.loader",
    "LabeledArrays": "sisa.data.loaders",
    "as_arrays": "sisa.data.loaders",
    "load_split": "sisa.data.loaders",
    "Ensemble": "sisa.ensemble",
    "FitReport": "sisa.ensemble",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sisa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [*sorted(_LAZY), *errors.__all__, "__version__"]
