"""The PNG of ``sisa evaluate``: per forget set, test accuracy against attack AUC, and unlearning time.

matplotlib is an optional dependency (``pip install 'sisa[plot]'``); the check runs before
any training so a missing plotting library never wastes an evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sisa.errors import ConfigError

__all__ = ["plot_evaluation", "require_matplotlib"]

_COLOURS = {
    "retrain": "#222222",
    "original": "#999999",
    "sisa": "#1f77b4",
    "gradient_ascent": "#d62728",
    "finetune": "#2ca02c",
    "prune": "#ff7f0e",
    "newton": "#9467bd",
}


def require_matplotlib() -> None:
    """Fail early, with the fix, when matplotlib is not installed.

    Raises:
        ConfigError: If ``import matplotlib`` fails.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the evaluation plot needs matplotlib: pip install 'sisa[plot]' (or pass --no-plot)"
        ) from None


def plot_evaluation(result: dict[str, Any], path: str | Path) -> Path:
    """Write the evaluation figure.

    Top row: test accuracy against the membership-inference AUC, one point per method,
    with the retrain seeds' AUC spread shaded (where a method should land). Bottom row:
    wall time of each unlearning step, log scale.

    Args:
        result: What :func:`sisa.evaluate.harness.evaluate` returned.
        path: PNG file to write.

    Returns:
        The path written.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    forgets = list(dict.fromkeys(r["forget"] for r in result["rows"]))  # run order (JSON may sort keys)
    fig, axes = plt.subplots(2, len(forgets), figsize=(5.2 * len(forgets), 8), squeeze=False)
    for col, name in enumerate(forgets):
        rows = [r for r in result["rows"] if r["forget"] == name]
        top, bottom = axes[0][col], axes[1][col]
        spread = next((r["extra"]["mia_auc_spread"] for r in rows if r["method"] == "retrain"), None)
        if spread:
            top.axvspan(spread[0], spread[1], color="#cccccc", alpha=0.6, label="retrain seed spread")
        top.axvline(0.5, color="#bbbbbb", lw=0.8, ls=":")
        for r in rows:
            colour = _COLOURS.get(r["method"], "#7f7f7f")
            top.scatter(r["mia_auc"], r["test_accuracy"], color=colour, s=50, zorder=3)
            asr = r.get("attack_success")
            text = r["method"] if asr is None else f"{r['method']} (ASR {asr:.2f})"
            top.annotate(
                text, (r["mia_auc"], r["test_accuracy"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        top.set_title(f"forget {name}")
        top.set_xlabel("membership-inference AUC (forget vs held-out)")
        top.set_ylabel("test accuracy")
        top.grid(alpha=0.3)
        top.margins(x=0.2, y=0.12)  # room for the labels of points at the edges
        if spread:
            top.legend(fontsize=8, loc="best")
        timed = [r for r in rows if r["seconds"] > 0]
        bottom.barh(
            [r["method"] for r in timed],
            [r["seconds"] for r in timed],
            color=[_COLOURS.get(r["method"], "#7f7f7f") for r in timed],
        )
        bottom.set_xscale("log")
        bottom.set_xlabel("unlearning wall time, s (retrain: training time)")
        bottom.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
