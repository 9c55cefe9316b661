"""The evaluation's report: its rows in reading order, the forget sets' sizes, and SISA's targets as measured facts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sisa.evaluate.forgets import METHODS
from sisa.evaluate.scoring import MethodRow, Scorer
from sisa.evaluate.sets import EvalSets

__all__ = ["forget_set_sizes", "ordered_rows", "targets"]


def ordered_rows(
    per_spec: Sequence[tuple[Scorer, MethodRow, list[MethodRow]]], methods: Sequence[str]
) -> tuple[list[MethodRow], dict[str, Any]]:
    """Every spec's rows in reading order, each with its speed-up over retraining, and each spec's targets.

    Args:
        per_spec: Per forget spec: its scorer, the retrains' summary row and the other methods' rows.
        methods: The methods asked for (the ``retrain`` row is shown only when asked for).

    Returns:
        The rows, and the targets by forget-set name (:func:`targets`).
    """
    order = {m: i for i, m in enumerate(("retrain", "unpoisoned", "original", *METHODS[1:]))}
    rows: list[MethodRow] = []
    by_spec: dict[str, Any] = {}
    for scorer, retrain, spec_rows in per_spec:
        shown = sorted(([retrain] if "retrain" in methods else []) + spec_rows, key=lambda r: order[r.method])
        for r in shown:
            r.extra["speedup_vs_retrain"] = retrain.seconds / r.seconds if r.seconds > 0 else None
        rows.extend(shown)
        by_spec[scorer.sets.spec.name] = targets(retrain, spec_rows)
    return rows, by_spec


def forget_set_sizes(groups: Sequence[list[EvalSets]], group_info: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per forget set: its forget and retain sizes; a scenario's also its poisoned ids, attack set and group's times."""
    out: dict[str, Any] = {}
    for info, members in zip(group_info, groups, strict=True):
        for s in members:
            out[s.spec.name] = {"forget": len(s.forget), "retain": len(s.retain)}
            if s.poisoned_ids is not None:
                assert s.attack is not None
                out[s.spec.name].update(poisoned=len(s.poisoned_ids), attack_set=len(s.attack), **info)
    return out


def targets(retrain: MethodRow, rows: Sequence[MethodRow]) -> dict[str, Any]:
    """The issue's targets for SISA, stated as measured facts (never pass/fail by fiat)."""
    sisa = next((r for r in rows if r.method == "sisa"), None)
    attack: dict[str, Any] = {}
    if retrain.attack_success is not None:
        unpoisoned = next(r for r in rows if r.method == "unpoisoned")
        attack = {
            "attack_success_retrain": retrain.attack_success,
            "attack_success_unpoisoned": unpoisoned.attack_success,
            "attack_success": {r.method: r.attack_success for r in rows},
        }
    if sisa is None:
        return attack
    lo, hi = retrain.extra["mia_auc_spread"]
    floor_f, floor_t = retrain.extra["kl_floor_forget"], retrain.extra["kl_floor_test"]
    gap = sisa.extra.get("family_gap_kl_test")
    return {
        "sisa_mia_auc": sisa.mia_auc,
        "retrain_mia_auc_spread": [lo, hi],
        "sisa_mia_within_retrain_spread": bool(lo <= sisa.mia_auc <= hi),
        "sisa_mia_distance_to_retrain_mean": abs(sisa.mia_auc - retrain.mia_auc),
        "sisa_kl_test_over_floor": sisa.kl_test / floor_t if floor_t > 0 else None,
        "sisa_kl_forget_over_floor": sisa.kl_forget / floor_f if floor_f > 0 else None,
        "sisa_test_accuracy_gap": retrain.test_accuracy - sisa.test_accuracy,
        "sisa_family_gap_kl_test": gap,
        "sisa_kl_test_over_family_gap": sisa.kl_test / gap if gap else None,
        **attack,
        **{k: sisa.extra[k] for k in ("attack_success_before", "verified_equal_to_retrain") if k in sisa.extra},
    }
