"""sisa: exact machine unlearning with SISA training (sharded, isolated, sliced, aggregated) on Ray."""

from sisa.config import SisaConfig, load_config
from sisa.data import LabeledArrays, as_arrays, load_split
from sisa.ensemble import Ensemble, FitReport
from sisa.errors import (
    ConfigError,
    DataError,
    DomainMismatchError,
    DomainUnavailableError,
    IntegrityError,
    ModelError,
    NotTrainedError,
    SisaError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    TrainingError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "DomainMismatchError",
    "DomainUnavailableError",
    "Ensemble",
    "FitReport",
    "IntegrityError",
    "LabeledArrays",
    "ModelError",
    "NotTrainedError",
    "SisaConfig",
    "SisaError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "TrainingError",
    "as_arrays",
    "load_config",
    "load_split",
    "__version__",
]
