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
import time
from pathlib import Path

import numpy as np
import pandas as pd

import eenet
from eenet.cache import read_cache
from eenet.sweep import run_sweep

MODELS = {
    "fashion_mnist_cnn4": "eenet.examples.models:fashion_mnist_cnn4",
    "fashion_mnist_cnn6": "eenet.examples.models:fashion_mnist_cnn6",
}
PUBLISHED = ["maxprob", "entropy", "patience", "static"]
SEARCHED = ["maxprob:search", "entropy:search", "patience:search"]
METHODS = ["eenet", "eenet-paper", "eenet:assignment", *PUBLISHED, *SEARCHED, "oracle"]


def ensure_cache(name: str, split: str, cache_dir: Path, data_dir: Path | None, like=None):
    """Cache one split; with ``like``, reuse that cache's measured per-exit latencies
    (the network's costs do not depend on the split; re-timing only adds noise)."""
    from eenet.ingest.model import cache_model

    path = cache_dir / f"{name}_{split}.h5"
    if not path.exists():
        print(f"caching {name} {split} -> {path}", flush=True)
        costs = "measured" if like is None else [float(c) for c in like.costs]
        cache_model(MODELS[name], f"fashion-mnist:{split}", path, data_dir=data_dir,
                    costs=costs, verbose=False, device="cpu", min_run_time=1.0)
    return read_cache(path)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--n-budgets", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/policy_quality.csv"))
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tables, sections = [], []
    for name in args.models.split(","):
        val = ensure_cache(name, "val", args.cache_dir, args.data_dir)
        test = ensure_cache(name, "test", args.cache_dir, args.data_dir, like=val)
        start = time.perf_counter()
        t = run_sweep(val, test, n_budgets=args.n_budgets, methods=METHODS,
                      seeds=list(range(args.seed, args.seed + args.seeds)), jobs=args.jobs,
                      verbose=True)
        print(f"{name}: sweep took {time.perf_counter() - start:.0f} s", flush=True)
        sections.append(report(t, name, val.cost_unit))
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
