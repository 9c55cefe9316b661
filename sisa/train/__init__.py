"""Layer 5, training: the determinism domain, models, the pure-torch trainer, Ray fan-out, the planner.

``trainer`` trains one shard slice by slice (no Ray); ``orchestrator`` is the one module
that imports Ray (with ``routing`` choosing nodes by domain and ``local_runner`` training
in-process); ``slices`` reads a shard's slices from the store lazily.
This package's ``__init__`` imports nothing, so ``import sisa`` stays Ray-free.
"""
