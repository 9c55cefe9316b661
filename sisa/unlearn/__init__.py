"""Layer 6, unlearning: deletion requests, their journal, the retrain, erasure, certificates, verify.

Works on the store and the training layer; never on the :class:`~sisa.ensemble.Ensemble` facade.
"""
