"""Layer 4, store: the LMDB environment, its records and content addresses.

``database`` owns the environment (transactions, locking, compaction), ``records`` the
stage/live record schema in it, ``digests`` the checkpoint keys and keyed id hashes.
"""
