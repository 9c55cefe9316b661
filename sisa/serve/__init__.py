"""Layer 7, serving: load the live shard models and aggregate their predictions."""
