"""Layer 9, evaluation harness: SISA against retraining and approximate unlearning, metrics, scenarios.

Builds on the :class:`~sisa.ensemble.Ensemble` facade; nothing below imports it.
"""
