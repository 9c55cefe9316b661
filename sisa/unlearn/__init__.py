"""Layer 6, unlearning: deletion requests, their journal, the retrain, erasure, certificates, verify.

``ids`` validates what a request names, ``journal`` records it durably, ``deletion`` erases
it at once (key destruction) and applies it later (the planner's retrain, a certificate in the ``audit`` log), and
``replay`` verifies live models against a retrain from scratch. Works on the store and
the training layer's planner; never on the :class:`~sisa.ensemble.Ensemble` facade.
"""

from sisa.unlearn.deletion import apply, delete, finish_interrupted, recover_erasure
from sisa.unlearn.ids import normalize_ids, parse_id, read_ids_file
from sisa.unlearn.journal import pending
from sisa.unlearn.replay import verify

__all__ = [
    "apply",
    "delete",
    "finish_interrupted",
    "normalize_ids",
    "parse_id",
    "pending",
    "read_ids_file",
    "recover_erasure",
    "verify",
]
