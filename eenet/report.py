"""Sweep tables as text, plots and headline gaps.

Reads the tidy rows of :func:`eenet.sweep.run_sweep`; labels come from the
method table (:data:`eenet.scores.METHODS`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eenet._validation import EenetError, atomic_output
from eenet.scores import METHODS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["budget_gaps", "format_risk_summary", "format_summary", "plot_risk_sweep",
           "plot_sweep", "tie_margin"]

#: The smallest difference in accuracy the summary does not call a tie (0.1 points).
MIN_TIE = 0.001

_STYLE = {
    "eenet": dict(color="#d62728", marker="o", lw=2.2, zorder=5),
    "eenet-paper": dict(color="#ff7f0e", marker="D", lw=1.2),
    "maxprob": dict(color="#1f77b4", marker="s"),
    "entropy": dict(color="#2ca02c", marker="^"),
    "patience": dict(color="#9467bd", marker="v"),
    "static": dict(color="#7f7f7f", marker="x", ls=":"),
    "oracle": dict(color="black", ls="--", marker=None, lw=1.2),
}


def _policies(table: pd.DataFrame) -> pd.DataFrame:
    """Budget rows of the policies (no single exits, no risk-control rows)."""
    keep = ~table["method"].str.match(r"^exit\d+$")
    if "epsilon" in table:
        keep &= table["epsilon"].isna()
    return table[keep]


def _risk_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["epsilon"].notna()] if "epsilon" in table else table.iloc[:0]


def _order(methods) -> list[str]:
    known = [m for m in METHODS if m in set(methods)]
    return known + sorted(set(methods) - set(known))


def tie_margin(table: pd.DataFrame) -> float:
    """The accuracy difference a summary treats as a tie: the larger of 0.1 points and
    the largest seed-to-seed standard deviation of any policy at any budget (0.1
    points with a single seed)."""
    pol = _policies(table)
    sd = pol.groupby(["budget", "method"])["accuracy"].std(ddof=1)
    sd = sd.drop(labels="oracle", level="method", errors="ignore").dropna()
    return max(MIN_TIE, float(sd.max()) if not sd.empty else 0.0)


def format_summary(table: pd.DataFrame, *, cost_unit: str = "") -> str:
    """Test accuracy (%) per budget and method, mean over seeds.

    ``*`` marks every policy within :func:`tie_margin` of the best at that
    budget; the header says what the margin is and how many seeds it rests
    on. The oracle is shown but never marked: it reads the labels.
    """
    import pandas as pd  # imported on use: half a second at start-up

    pol = _policies(table)
    if pol.empty:
        return "(no policies in the table)"
    mean = pol.groupby(["budget", "method"], sort=True)["accuracy"].mean().unstack("method")
    order = _order(mean.columns)
    mean = mean[order]
    ratio = pol.assign(r=pol["avg_cost"] / pol["budget"]).groupby("method")["r"].max()
    n_seeds = int(pol["seed"].nunique())
    tie = tie_margin(table)
    width = max(9, *(len(m) + 2 for m in order))
    unit = f" ({cost_unit})" if cost_unit else ""
    spread = (f"the largest seed-to-seed sd over {n_seeds} seeds" if n_seeds > 1
              else "one seed: run --seeds 3 for the spread")
    lines = [f"test accuracy (%) by budget{unit}, mean over {n_seeds} seed(s); * = within "
             f"{100 * tie:.2f} points of the best policy ({spread}; all ties marked)",
             f"{'budget':>10}" + "".join(f"{m:>{width}}" for m in order)]
    for budget, row in mean.iterrows():
        deployable = row.drop(labels=["oracle"], errors="ignore").dropna()
        top = deployable.max() if not deployable.empty else np.nan
        best = set(deployable.index[deployable >= top - tie - 1e-12])
        cells = ["-" if pd.isna(row[m]) else f"{100 * row[m]:.2f}" + ("*" if m in best else " ")
                 for m in order]
        lines.append(f"{budget:>10.4g}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append(f"{'max cost/B':>10}" + "".join(
        f"{(f'{ratio[m]:.3f} ' if m in ratio and np.isfinite(ratio[m]) else '- '):>{width}}"
        for m in order))
    return "\n".join(lines)


def plot_sweep(table: pd.DataFrame, path: str | os.PathLike, *, cost_unit: str = "",
               title: str = "") -> Path:
    """Accuracy vs realized average cost on the test split, one line per method.

    The oracle is dashed and drawn at its budget (its realized cost is far
    lower); the single exits are labelled points. Written atomically with
    matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = _policies(table)
    mean = pol.groupby(["method", "budget"], sort=True)[["accuracy", "avg_cost"]].mean()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for m in _order(mean.index.get_level_values(0).unique()):
        d = mean.loc[m].reset_index()
        # the oracle spends far less than its budget (it knows the cheapest right exit), so
        # it is drawn at its budget: the best accuracy any policy could have there
        x = "budget" if m == "oracle" else "avg_cost"
        d = d.sort_values(x)
        base = m.partition(":")[0]
        style = dict(_STYLE.get(m, dict(marker="o")))
        style.setdefault("lw", 1.5)
        label = (METHODS[base].label if base in METHODS else base) + m[len(base):]
        ax.plot(d[x], 100 * d["accuracy"], label=label + (", at its budget" if m == "oracle"
                                                           else ""), ms=4, **style)
    singles = table[table["method"].str.match(r"^exit\d+$")]
    if not singles.empty:
        ax.scatter(singles["avg_cost"], 100 * singles["accuracy"], s=60, facecolor="white",
                   edgecolor="black", zorder=6, label="single exits")
        for _, r in singles.iterrows():
            ax.annotate(r["method"], (r["avg_cost"], 100 * r["accuracy"]),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel(f"average cost per sample ({cost_unit})" if cost_unit
                  else "average cost per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    """Write a figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def budget_gaps(table: pd.DataFrame, *, learned: str = "eenet") -> pd.DataFrame:
    """Per budget: the learned method's accuracy minus the best baseline's, and the
    share of the best-baseline-to-oracle gap it closes (means over seeds)."""
    import pandas as pd  # imported on use: half a second at start-up

    pol = _policies(table)
    mean = pol.groupby(["budget", "method"])["accuracy"].mean().unstack("method")
    if learned not in mean or "oracle" not in mean:
        raise EenetError(f"budget_gaps needs {learned} and oracle rows")
    baselines = [m for m in ("maxprob", "entropy", "patience", "static") if m in mean]
    best = mean[baselines].max(axis=1)
    gap = mean["oracle"] - best
    out = pd.DataFrame({
        "budget": mean.index, learned: mean[learned].values, "best_baseline": best.values,
        "best_baseline_name": mean[baselines].fillna(-np.inf).idxmax(axis=1)
        .where(mean[baselines].notna().any(axis=1), "").values,
        "oracle": mean["oracle"].values, "gain": (mean[learned] - best).values,
        "gap_closed": np.where(gap > 1e-12, (mean[learned] - best) / gap.where(gap > 1e-12),
                               math.nan)})
    return out.reset_index(drop=True)


def format_risk_summary(table: pd.DataFrame, *, risk: str, cost_unit: str = "") -> str:
    """Per risk level and method: realized test risk, cost and accuracy (means over seeds)."""
    rows = _risk_rows(table)
    if rows.empty:
        return "(no risk-control rows in the table)"
    column = f"risk_{risk}"
    mean = rows.groupby(["epsilon", "method"], sort=True)[[column, "avg_cost", "accuracy"]] \
        .mean()
    unit = f" ({cost_unit})" if cost_unit else ""
    lines = [f"risk control ({risk} against the full model): realized test {risk} / cost"
             f"{unit} / accuracy (%), mean over {int(rows['seed'].nunique())} seed(s)",
             f"{'epsilon':>8}  {'method':<16}{risk:>12}{'cost':>10}{'accuracy':>10}"]
    for (eps, method), r in mean.iterrows():
        lines.append(f"{eps:>8.4g}  {method:<16}{r[column]:>12.4f}{r['avg_cost']:>10.4g}"
                     f"{100 * r['accuracy']:>10.2f}")
    return "\n".join(lines)


def plot_risk_sweep(table: pd.DataFrame, path: str | os.PathLike, *, risk: str,
                    cost_unit: str = "", title: str = "") -> Path:
    """Realized test risk and cost against the risk level asked for, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _risk_rows(table)
    column = f"risk_{risk}"
    mean = rows.groupby(["method", "epsilon"], sort=True)[[column, "avg_cost"]].mean()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for m in _order(mean.index.get_level_values(0).unique()):
        d = mean.loc[m].reset_index()
        style = dict(_STYLE.get(m.partition(":")[0], dict(marker="o")))
        style.setdefault("lw", 1.5)
        label = METHODS[m.partition(":")[0]].label + m[len(m.partition(":")[0]):] \
            if m.partition(":")[0] in METHODS else m
        left.plot(d["epsilon"], d[column], label=label, ms=4, **style)
        right.plot(d["epsilon"], d["avg_cost"], label=label, ms=4, **style)
    eps = np.unique(rows["epsilon"].to_numpy())
    left.plot(eps, eps, color="grey", ls=":", lw=1, label="risk = epsilon")
    left.set_xlabel("risk level asked for (epsilon)")
    left.set_ylabel(f"realized test {risk}")
    right.set_xlabel("risk level asked for (epsilon)")
    right.set_ylabel(f"average cost per sample ({cost_unit})" if cost_unit else "average cost")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title or f"risk control: {risk} against the full model")
    return _save(fig, path)
