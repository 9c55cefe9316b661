"""One process, several threads: serving threads predict while the main thread deletes.

The shape of a model server that also takes deletion requests. Every handle on a store in
one process shares one LMDB environment, which compaction closes and swaps; before the
environment had a readers-writer lock, a reader thread's transaction or its follow of the
swap raced the writer's compaction, and deletions failed with raw lmdb errors.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sisa.ensemble import Ensemble
from tests.conftest import blobs, small_config

DELETES = 20
PREDICTORS = 4


def live_keys(ens: Ensemble) -> dict[int, str]:
    """Shard -> checkpoint key of the live model, read from the store."""
    with ens.store.read() as txn:
        return {shard: record["key"] for shard, record in ens.store.live(txn).items()}


def test_threads_predict_while_another_deletes_in_the_same_process(tmp_path: Path) -> None:
    x, y = blobs(480, d=8)
    path = tmp_path / "st"
    writer = Ensemble.create(path, small_config("shards=4", "slices=2", "train.epochs=2"), address="local")
    writer.ingest(x, y)
    writer.fit()
    # live_sets[k]: the live set after k deletions were acknowledged
    live_sets = [live_keys(writer)]
    done = 0  # deletions acknowledged so far
    stop = threading.Event()
    errors: list[BaseException] = []
    # per prediction: (deletions acknowledged before it started, its provenance)
    seen: list[tuple[int, dict[int, str]]] = []
    # per thread: (start, end) of each prediction; per deletion: (first commit, acknowledgement)
    spans: dict[int, list[tuple[float, float]]] = {}
    deleting: list[tuple[float, float]] = []

    def serve(ens: Ensemble) -> None:
        mine = spans.setdefault(threading.get_ident(), [])
        try:
            while not stop.is_set():
                before, started = done, time.monotonic()
                ens.predict(x[:16])
                mine.append((started, time.monotonic()))
                seen.append((before, ens.provenance()))
        except BaseException as exc:  # every error fails the test below, with its type
            errors.append(exc)

    readers = [Ensemble.open(path, readonly=True) for _ in range(PREDICTORS - 1)]
    # Three read-only handles in this process, and the writer's own handle serving a fourth thread.
    threads = [threading.Thread(target=serve, args=(ens,)) for ens in [*readers, writer]]
    for t in threads:
        t.start()
    certificates = []
    try:
        for k in range(DELETES):
            # From its first retrained stage's commit (the deletion is under way, past any lock it
            # takes) to its acknowledgement.
            committed: list[float] = []
            certificates.append(writer.delete([k * 23], progress=lambda _r, c=committed: c.append(time.monotonic())))
            deleting.append((committed[0], time.monotonic()))
            live_sets.append(live_keys(writer))
            done = k + 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        for ens in readers:
            ens.close()
    assert errors == []
    assert [c["state"] for c in certificates] == ["applied"] * DELETES
    assert writer.pending() == []
    writer.close()
    assert len(seen) >= PREDICTORS  # every thread predicted
    # The predictions ran during the deletions, not between them: every thread (the writer's own
    # handle too) began and finished predictions inside a deletion under way (after its first
    # retrained stage's commit, before its acknowledgement), and most deletions saw one. A lock
    # that serialised predictions with deletions would leave none.
    everything = [span for mine in spans.values() for span in mine]
    inside = [[(s, e) for s, e in mine if any(a < s and e < b for a, b in deleting)] for mine in spans.values()]
    assert len(inside) == PREDICTORS and all(inside), [len(i) for i in inside]
    overlapped = [any(a < s and e < b for s, e in everything) for a, b in deleting]
    assert sum(overlapped) >= DELETES // 2, overlapped
    for before, used in seen:
        # Its models are all of one live set: the one current when it started or a later one, or
        # that set with the shards a deletion in progress had taken out of service (a subset).
        # Never a model retired by a deletion acknowledged before the prediction started.
        assert any(used.items() <= live.items() for live in live_sets[before:]), (before, used)
