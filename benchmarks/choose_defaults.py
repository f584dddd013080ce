"""Choose eenet's defaults without looking at the test split.

Each bundled model's *validation* cache is split in two stratified, seeded
halves; every candidate is fitted on one half and scored on the other, at
the default budgets, and the halves swap roles. The candidates are the
choices a default has to make: the calibration of the learned scores
(the geometric rule, the search, the paper's assignment quotas), the scoring
target and features (``eenet`` vs ``eenet-paper``), and the baselines they
have to beat.

Usage:
    python benchmarks/choose_defaults.py --out benchmarks/results/choose_defaults.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

import eenet
from eenet.sweep import run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import add_cache_options, bundled_caches  # noqa: E402

CANDIDATES = ["eenet", "eenet:search", "eenet:assignment", "eenet-paper", "eenet-paper:search",
              "maxprob", "maxprob:search", "entropy:search", "oracle"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fashion_mnist_cnn4,fashion_mnist_cnn6")
    add_cache_options(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-budgets", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/choose_defaults.csv"))
    args = ap.parse_args()
    tables = []
    for name in args.models.split(","):
        val, _ = bundled_caches(name, args.cache_dir, args.data_dir)
        half_a, half_b = val.holdout_split(0.5, seed=args.seed)
        for fold, (fit_on, score_on) in enumerate(((half_a, half_b), (half_b, half_a))):
            t = run_sweep(fit_on, score_on, n_budgets=args.n_budgets, methods=CANDIDATES,
                          seeds=[args.seed], verbose=False)
            t.insert(0, "fold", fold)
            t.insert(0, "model", name)
            tables.append(t)
            print(f"{name} fold {fold} done", flush=True)
    table = pd.concat(tables)
    table["eenet_version"] = eenet.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    pol = table[table["method"].isin(CANDIDATES)].copy()
    # budgets differ per fold: rank them within (model, fold) as tight (first half) / loose
    pol["rank"] = pol.groupby(["model", "fold"])["budget"].rank(method="dense")
    n = pol.groupby(["model", "fold"])["rank"].transform("max")
    pol["range"] = (pol["rank"] <= n / 2).map({True: "tight half", False: "loose half"})
    summary = (pol.groupby(["model", "range", "method"])["accuracy"].mean().mul(100)
               .unstack("method")[CANDIDATES].round(2))
    cols = list(summary.columns)
    lines = ["| model | budgets | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for (model, rng), row in summary.iterrows():
        best = row.drop(labels=["oracle"]).idxmax()
        lines.append(f"| {model} | {rng} | " + " | ".join(
            f"**{row[c]:.2f}**" if c == best else f"{row[c]:.2f}" for c in cols) + " |")
    text = "\n".join(lines)
    md = args.out.with_suffix(".md")
    md.write_text("Held-out accuracy (%) inside the validation split (fit on one half, score "
                  "on the other, both ways), mean over the budgets in each half of the "
                  "range.\n\n" + text + "\n")
    print(text)
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
