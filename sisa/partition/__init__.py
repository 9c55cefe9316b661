"""Layer 3, partition: where each sample lives (shard, slice) and what deletions will cost.

``assign`` holds the pure assignment functions (uniform hashing, SISA's Algorithm 1),
``prior`` reads deletion probabilities, ``placement`` applies both to a batch being
ingested, ``cost_model`` predicts the retrain cost of a deletion under a layout.
"""
