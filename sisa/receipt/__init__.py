"""Proofs anyone can check: RFC 6962 Merkle hashing, C2SP signed notes, deletion receipts and their verifier.

Standard library and ``cryptography`` only, so ``python -m sisa.receipt`` (``sisa-verify-receipt``) runs
where neither torch, Ray, numpy nor LMDB is installed. The store side (the log, the receipts it issues)
lives in :mod:`sisa.unlearn` and builds on these formats.
"""
