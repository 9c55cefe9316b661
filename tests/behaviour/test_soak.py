"""The soak at small scale: a deletion stream on Ray while a reader process serves predictions.

Runs ``scripts/soak.py``'s core (real store, real Ray, a real reader subprocess) and
asserts its end checks: every request applied exactly once, a valid audit chain,
``verify`` on every shard, no retired model served after acknowledgement, deleted ids
absent. Also checks that the checker itself catches a retired model served late.
"""

import sys
from pathlib import Path

import pytest

from sisa.data.loaders import as_arrays
from tests.conftest import blobs, small_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import soak  # noqa: E402

pytestmark = pytest.mark.soak


def test_plan_stream_is_seeded_and_exact() -> None:
    w = soak.Workload(requests=200, seed=5)
    events = soak.plan_stream(w)
    assert sum(len(e.sizes) for e in events) == 200
    assert {e.kind for e in events} == {"single", "burst"}
    assert all(len(e.sizes) == 1 for e in events if e.kind == "single")
    assert all(s >= 1 for e in events for s in e.sizes)
    assert [(e.kind, e.sizes) for e in soak.plan_stream(w)] == [(e.kind, e.sizes) for e in events]


def test_checker_catches_a_retired_model_served_after_ack() -> None:
    requests = [
        {
            "request_id": 1,
            "kind": "burst",
            "retired": ["old"],
            "certificates": 1,
            "journaled_at": 1.0,
            "acked_at": 2.0,
        }
    ]
    reader = {
        "start": [0.5, 1.5, 2.5],
        "end": [0.6, 1.6, 2.6],
        "status": [0, 0, 0],
        "key_set": [0, 0, 0],  # the second starts after the journal, the third after the ack: both use "old"
        "key_sets": [[[0, "old"]], [[0, "new"]]],
        "errors": [],
        "probe": {"ids": 1, "present": 0},
    }
    final = {
        "audit_request_ids": [1],
        "pending": 0,
        "audit_entries": 1,
        "audit_ok": True,
        "audit_problems": [],
        "verify_ok": True,
        "verify_failed": [],
        "live_keys": ["new"],
        "deleted": 1,
        "present": 0,
        "tombstoned": 1,
    }
    batches = [{"stray_certificates": [], "present_after_ack": 0}]
    checks = soak.check(requests, batches, reader, final)
    served = checks["no_retired_model_served"]
    assert not served["ok"] and served["after_ack"] == 1 and served["after_journal"] == 2
    assert not checks["reader_follows"]["ok"]
    assert checks["applied_exactly_once"]["ok"] and checks["deleted_ids_absent"]["ok"]


@pytest.mark.usefixtures("ray_session")
def test_soak_small_scale(tmp_path: Path) -> None:
    x, y = blobs(600, d=10)
    train = as_arrays(x, y, num_classes=3)
    test_x, test_y = blobs(64, d=10, seed=5)
    w = soak.Workload(requests=40, predict_rate=50.0, predict_batch=64, settle=0.5, seed=3)
    res = soak.run_soak(small_config(), train, test_x, test_y, tmp_path, w)
    failed = {name: c for name, c in res["checks"].items() if not c["ok"]}
    assert res["ok"], failed
    checks, summary = res["checks"], res["summary"]
    assert checks["applied_exactly_once"]["audit_entries"] == 40 == summary["requests"]
    assert checks["applied_exactly_once"]["pending"] == 0
    assert checks["no_retired_model_served"]["after_ack"] == 0
    assert checks["no_retired_model_served"]["retired_keys"] > 0
    assert checks["deleted_ids_absent"]["deleted"] == summary["ids"] == 600 - res["final_samples"]
    assert summary["events"]["bursts"] > 0 and summary["events"]["singles"] > 0
    # The reader really served during the stream, from many live sets, and followed to the end.
    assert summary["predictions"]["during_stream"] > 0 and summary["predictions"]["live_sets_seen"] > 1
    assert checks["reader_follows"]["predictions_after_last_ack"] > 0
