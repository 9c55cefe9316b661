"""The evaluation's targets and tables on hand-made rows with known answers (no training)."""

import pytest

from sisa.cli.evaluate import format_rows, format_targets
from sisa.evaluate.report import targets
from sisa.evaluate.scoring import MethodRow


def row(method: str, **fields: object) -> MethodRow:
    """A ``MethodRow`` of the forget set ``class:1`` with zeros except ``fields``."""
    values: dict[str, object] = dict(
        forget_accuracy=0.0,
        retain_accuracy=0.0,
        test_accuracy=0.0,
        mia_accuracy=0.0,
        mia_auc=0.0,
        kl_forget=0.0,
        kl_test=0.0,
        seconds=0.0,
        extra={},
    )
    values.update(fields)
    return MethodRow(forget="class:1", method=method, **values)  # type: ignore[arg-type]


def retrain_row(floor_forget: float, floor_test: float) -> MethodRow:
    return row(
        "retrain",
        mia_auc=0.52,
        test_accuracy=0.90,
        extra={"mia_auc_spread": [0.50, 0.56], "kl_floor_forget": floor_forget, "kl_floor_test": floor_test},
    )


def test_targets_on_known_values() -> None:
    sisa = row(
        "sisa", mia_auc=0.55, test_accuracy=0.88, kl_forget=0.05, kl_test=0.03, extra={"family_gap_kl_test": 0.06}
    )
    t = targets(retrain_row(0.02, 0.01), [retrain_row(0.02, 0.01), sisa])
    assert t["sisa_mia_within_retrain_spread"] is True
    assert t["sisa_mia_distance_to_retrain_mean"] == pytest.approx(0.03)
    assert t["sisa_kl_test_over_floor"] == pytest.approx(3.0)
    assert t["sisa_kl_forget_over_floor"] == pytest.approx(2.5)
    assert t["sisa_test_accuracy_gap"] == pytest.approx(0.02)
    assert t["sisa_kl_test_over_family_gap"] == pytest.approx(0.5)
    outside = row("sisa", mia_auc=0.60, kl_test=0.03)
    assert targets(retrain_row(0.02, 0.01), [outside])["sisa_mia_within_retrain_spread"] is False
    assert targets(retrain_row(0.02, 0.01), [retrain_row(0.02, 0.01)]) == {}  # no sisa row, no targets
    [line] = format_targets({"class:1": t, "random:0.1": {}})
    assert line == (
        "class:1: sisa MIA AUC 0.5500 vs retrain seed spread [0.5000, 0.5600] (inside); "
        "KL(test) 3.00x the retrain floor, 0.50x the ensemble-vs-monolith gap; test accuracy gap +2.00 pp"
    )


def test_targets_with_a_zero_floor_print_as_not_available() -> None:
    """A retrain floor of exactly 0 (retrains that agree) or no family gap gives ``None``: printed ``n/a``.

    Regression: ``sisa evaluate`` formatted these with ``:.2f`` and died with a ``TypeError`` after a
    long run, once ``evaluation.json`` was written.
    """
    sisa = row("sisa", mia_auc=0.55, kl_forget=0.05, kl_test=0.03, extra={"family_gap_kl_test": None})
    t = targets(retrain_row(0.0, 0.0), [sisa])
    assert t["sisa_kl_test_over_floor"] is None and t["sisa_kl_forget_over_floor"] is None
    assert t["sisa_kl_test_over_family_gap"] is None
    [line] = format_targets({"class:1": t})
    assert "KL(test) n/a times the retrain floor, n/a times the ensemble-vs-monolith gap" in line
    table = format_rows([{**row("sisa", seconds=None).__dict__, "forget_accuracy": None}])
    assert table.splitlines()[-1].split()[2] == "n/a"
