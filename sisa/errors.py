"""Exception hierarchy of sisa: one type per failure a caller may want to handle.

Every error survives pickling (Ray ships exceptions between processes), so each
subclass keeps the plain ``Exception(message)`` constructor signature.
"""

from __future__ import annotations

__all__ = [
    "ClusterConnectionError",
    "ConfigError",
    "CoreSetError",
    "DataError",
    "DomainMismatchError",
    "DomainUnavailableError",
    "GpuMemoryError",
    "IntegrityError",
    "ModelError",
    "NotTrainedError",
    "ProofError",
    "SisaError",
    "StoreChangedError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "TrainingError",
]


class SisaError(Exception):
    """Base class of every error raised by sisa."""


class ConfigError(SisaError, ValueError):
    """A configuration file or override is malformed or holds a bad value."""


class DataError(SisaError, ValueError):
    """Input data is malformed: wrong shape, dtype, NaN, bad label, duplicate id."""


class CoreSetError(DataError):
    """A deletion names core-set samples: they trained the shared backbone, so retraining shards cannot forget them."""


class StoreError(SisaError):
    """The store directory is missing, not a store, or inconsistent."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


class StoreFullError(StoreError):
    """A write could not complete because the disk or the map is full."""


class StoreChangedError(StoreError):
    """A read met a record whose key a concurrent deletion destroyed after the read's snapshot: read again."""


class IntegrityError(StoreError):
    """A stored record or checkpoint does not match its recorded digest."""


class ModelError(SisaError, ValueError):
    """A model name or ``module:callable`` spec cannot be built."""


class TrainingError(SisaError):
    """Training a shard failed (after any retries)."""


class NotTrainedError(SisaError):
    """Prediction was asked of an ensemble with no live shard models."""


class ProofError(SisaError, ValueError):
    """A signature, a signed note or a Merkle proof does not check, or is not in its format."""


class ClusterConnectionError(SisaError):
    """The Ray cluster at the given address cannot be reached or joined (wrong address, no token)."""


class DomainUnavailableError(SisaError):
    """No node of a shard's determinism domain is available to retrain or replay it."""


class DomainMismatchError(TrainingError):
    """A worker found itself in another determinism domain than its shard needs, and refused to train."""


class GpuMemoryError(TrainingError):
    """A shard ran out of GPU memory within its share; the message says what packing to change."""
