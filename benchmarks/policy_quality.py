"""Policy quality: every method at every budget on real multi-exit caches, several seeds.

For each bundled Fashion-MNIST model (4 and 6 exits) this caches the
validation and test splits (reusing caches under ``--cache-dir``), fits every
method on validation at each budget, evaluates on test, and writes

* a tidy CSV, one row per (dataset, model, method, budget, seed);
* a Markdown report: test accuracy and realized cost / budget per method and
  budget, EENet's gain over the best published baseline and over the best
  baseline with searched thresholds, and the share of the
  best-baseline-to-oracle gap EENet closes.

Usage:
    python benchmarks/policy_quality.py --seeds 3 --out benchmarks/results/policy_quality.csv
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import eenet
from eenet import ExitPolicy, run_sweep
from eenet.report import format_summary
from eenet.sweep import default_budgets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import MODELS, add_cache_options, bundled_caches  # noqa: E402

PUBLISHED = ["maxprob", "entropy", "patience", "static"]
SEARCHED = ["maxprob:search", "entropy:search", "patience:search"]
METHODS = ["eenet", "eenet:search", "eenet-paper", *PUBLISHED, *SEARCHED, "oracle"]


def ceiling(test, budgets, seeds) -> pd.DataFrame:
    """EENet's scorer fitted *and* calibrated on the test split itself: what a learned score
    could reach with perfect knowledge of the split it is judged on (not a policy)."""
    rows = []
    for b in budgets:
        for s in seeds:
            r = ExitPolicy("eenet", seed=s).fit(test, float(b)).evaluate(test)
            rows.append({"method": "eenet fitted on test", "budget": float(b),
                         "accuracy": r.accuracy, "avg_cost": r.avg_cost, "seed": s})
    return pd.DataFrame(rows)


def report(table: pd.DataFrame, model: str, cost_unit: str) -> str:
    pol = table[~table["method"].str.match(r"^exit\d+$")]
    acc = pol.groupby(["budget", "method"])["accuracy"].mean().unstack()
    sd = pol.groupby(["budget", "method"])["accuracy"].std().unstack()
    ratio = (pol.assign(r=pol["avg_cost"] / pol["budget"])
             .groupby(["budget", "method"])["r"].max().unstack())
    cols = [m for m in METHODS if m in acc.columns]
    n_seeds = pol["seed"].nunique()
    lines = [f"### {model}", "",
             f"Test accuracy (%), mean over {n_seeds} seed(s) (± sd for EENet); budgets in "
             f"{cost_unit}.", "",
             "| budget | " + " | ".join(cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for b in acc.index:
        cells = []
        for m in cols:
            v = 100 * acc.loc[b, m]
            s = f"{v:.2f}"
            if m == "eenet" and n_seeds > 1:
                s += f" ± {100 * sd.loc[b, m]:.2f}"
            cells.append(s)
        lines.append(f"| {b:.4g} | " + " | ".join(cells) + " |")
    lines += ["", "Realized test cost / budget (max over seeds):", "",
              "| budget | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for b in ratio.index:
        lines.append(f"| {b:.4g} | " + " | ".join(f"{ratio.loc[b, m]:.3f}" for m in cols)
                     + " |")
    best_pub = acc[PUBLISHED].max(axis=1)
    best_pub_name = acc[PUBLISHED].idxmax(axis=1)
    best_search = acc[[m for m in SEARCHED if m in acc]].max(axis=1)
    gap = acc["oracle"] - best_pub
    closed = (acc["eenet"] - best_pub) / gap.where(gap > 1e-9)
    lines += ["", "EENet (default) against the baselines (accuracy points; gap = share of the "
              "best-published-baseline-to-oracle gap closed):", "",
              "| budget | EENet | best published | gain | best searched | gain vs searched | "
              "EENet paper recipe | oracle | gap closed |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b in acc.index:
        lines.append(
            f"| {b:.4g} | {100 * acc.loc[b, 'eenet']:.2f} | {best_pub_name[b]} "
            f"{100 * best_pub[b]:.2f} | {100 * (acc.loc[b, 'eenet'] - best_pub[b]):+.2f} | "
            f"{100 * best_search[b]:.2f} | {100 * (acc.loc[b, 'eenet'] - best_search[b]):+.2f}"
            f" | {100 * acc.loc[b, 'eenet-paper']:.2f} | "
            f"{100 * acc.loc[b, 'oracle']:.2f} | "
            f"{'-' if np.isnan(closed[b]) else f'{100 * closed[b]:.0f}%'} |")
    over = (ratio > 1.01).sum()
    lines += ["", "Cells over budget by more than 1%: " + (", ".join(
        f"{m}: {int(v)}" for m, v in over.items() if v) or "none") + ".", ""]
    return "\n".join(lines)


def ceiling_report(table: pd.DataFrame, top: pd.DataFrame) -> str:
    """How far a scorer fitted on the test split itself gets beyond max-probability."""
    pol = table[table["budget"].isin(top["budget"].unique())]
    mp = pol[pol["method"] == "maxprob"].groupby("budget")["accuracy"].mean()
    ee = pol[pol["method"] == "eenet"].groupby("budget")["accuracy"].mean()
    ce = top.groupby("budget")["accuracy"].mean()
    lines = ["Ceiling at the four tightest budgets: EENet's scorer fitted and calibrated on "
             "the test split itself (accuracy %, mean over seeds):", "",
             "| budget | maxprob | eenet | eenet fitted on test | ceiling - maxprob |",
             "|---:|---:|---:|---:|---:|"]
    for b in ce.index:
        lines.append(f"| {b:.4g} | {100 * mp[b]:.2f} | {100 * ee[b]:.2f} | {100 * ce[b]:.2f} | "
                     f"{100 * (ce[b] - mp[b]):+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--n-budgets", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS))
    add_cache_options(ap)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/policy_quality.csv"))
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tables, sections = [], []
    for name in args.models.split(","):
        val, test = bundled_caches(name, args.cache_dir, args.data_dir)
        seeds = list(range(args.seed, args.seed + args.seeds))
        start = time.perf_counter()
        t = run_sweep(val, test, n_budgets=args.n_budgets, methods=METHODS, seeds=seeds,
                      jobs=args.jobs, verbose=True)
        print(f"{name}: sweep took {time.perf_counter() - start:.0f} s", flush=True)
        print(format_summary(t, cost_unit=val.cost_unit), flush=True)
        top = ceiling(test, default_budgets(val, args.n_budgets)[:4], seeds)
        sections.append(report(t, name, val.cost_unit) + "\n" + ceiling_report(t, top))
        t.insert(0, "model", name)
        t.insert(0, "dataset", "fashion-mnist")
        t["eenet_version"] = eenet.__version__
        tables.append(t)
    pd.concat(tables).to_csv(args.out, index=False)
    md = args.out.with_suffix(".md")
    md.write_text("\n".join(sections))
    print("\n".join(sections))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
