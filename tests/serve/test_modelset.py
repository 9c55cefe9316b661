"""A replica's model views built from a real store's serving state: what a swap rebuilds, and what it reuses."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from sisa.serve.modelset import ModelView, read_models, read_state
from sisa.store.database import Store
from tests.conftest import blobs, trained_blobs_store


def test_a_swap_that_only_takes_shards_out_deserialises_nothing_and_shares_the_models(tmp_path: Path) -> None:
    store_path = trained_blobs_store(tmp_path / "store", "shards=3", "slices=1")
    store = Store.open(store_path, readonly=True)
    try:
        with store.read() as txn:
            digest, state = read_state(store, txn)
            weights = read_models(store, txn, state, set())
    finally:
        store.close()
    first = ModelView(1, digest, state, weights)
    x, _ = blobs(5, d=10)

    # What exclude publishes after a deletion: the same state less one shard. No weights come with it.
    out = copy.deepcopy(state)
    gone = out["shards"].pop(1)
    second = ModelView(2, "d2", out, {}, first.models, previous=first)
    assert [e.shard for e in second.entries] == [0, 2]
    assert all(second.models[e.key] is first.models[e.key] for e in second.entries)  # the same modules
    assert gone["key"] not in second.models
    assert second.config is first.config  # the unchanged stored config is not parsed again
    answer = second.predict(x.tolist())
    assert answer["provenance"] == {"0": state["shards"][0]["key"], "2": state["shards"][2]["key"]}
    np.testing.assert_allclose(np.asarray(answer["probabilities"]).sum(axis=1), 1.0, rtol=1e-5)

    # A changed config (a reconfigure) is parsed anew.
    changed = copy.deepcopy(out)
    changed["config"]["aggregate"]["method"] = "vote" if first.config.aggregate.method != "vote" else "mean"
    third = ModelView(3, "d3", changed, {}, second.models, previous=second)
    assert (
        third.config is not second.config and third.config.aggregate.method == changed["config"]["aggregate"]["method"]
    )
