"""EENet's training settings: the defaults against the previous ones, on held-out data.

The previous defaults (mini-batch 512, learning rate 1e-2, early-stopping
patience 10) against the current ones (a mini-batch of an eighth of the
training part within [256, 1024], 2e-2, 5), the same with a fixed batch
of 1024, and the automatic batch with the other learning rate and patience, on the bundled
Fashion-MNIST networks at the five tightest default budgets, several seeds:
held-out accuracy inside the validation split (fit on one stratified half,
score on the other, both ways; what the choice was made on), test accuracy
(fit on validation, evaluate on test), and the scorer's training time.

Usage:
    python benchmarks/fit_settings.py --seeds 3 --out benchmarks/results/fit_settings.csv
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

import eenet
from eenet import ExitPolicy
from eenet.sweep import default_budgets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import MODELS, add_cache_options, bundled_caches  # noqa: E402

SETTINGS = {"previous (512, 1e-2, patience 10)": dict(batch_size=512, lr=1e-2, patience=10),
            "fixed batch (1024, 2e-2, patience 5)": dict(batch_size=1024),
            "default (auto batch, 2e-2, patience 5)": {},
            "auto batch, 1e-2, patience 5": dict(lr=1e-2),
            "auto batch, 2e-2, patience 10": dict(patience=10),
            "auto batch, 1e-2, patience 10": dict(lr=1e-2, patience=10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    add_cache_options(ap)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fit_settings.csv"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for name in MODELS:
        val, test = bundled_caches(name, args.cache_dir, args.data_dir)
        halves = val.holdout_split(0.5, seed=args.seed)
        for label, hparams in SETTINGS.items():
            for seed in range(args.seed, args.seed + args.seeds):
                for budget in default_budgets(val, 10)[:5]:
                    policy = ExitPolicy("eenet", seed=seed, **hparams).fit(val, float(budget))
                    inside = [ExitPolicy("eenet", seed=seed, **hparams).fit(
                        fit_on, float(budget)).evaluate(score_on).accuracy
                        for fit_on, score_on in (halves, halves[::-1])]
                    rows.append({"model": name, "settings": label, "seed": seed,
                                 "budget": float(budget),
                                 "test_accuracy": policy.evaluate(test).accuracy,
                                 "validation_heldout_accuracy": sum(inside) / 2,
                                 "train_seconds": policy.scorer.diagnostics["fit_seconds"],
                                 "epochs": policy.scorer.diagnostics["epochs_run"],
                                 "eenet_version": eenet.__version__})
            print(f"{name} {label} done", flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    per_seed = table.groupby(["model", "settings", "seed"])[
        ["validation_heldout_accuracy", "test_accuracy", "train_seconds", "epochs"]].mean()
    summary = per_seed.groupby(["model", "settings"]).agg(["mean", "std"])
    print(summary.round(4).to_string())
    md = args.out.with_suffix(".md")
    lines = ["| model | settings | held-out in validation (%) | test (%) | train s | epochs |",
             "|---|---|---:|---:|---:|---:|"]
    for (model, label), r in summary.iterrows():
        lines.append(f"| {model} | {label} | "
                     f"{100 * r[('validation_heldout_accuracy', 'mean')]:.2f} ± "
                     f"{100 * r[('validation_heldout_accuracy', 'std')]:.2f} | "
                     f"{100 * r[('test_accuracy', 'mean')]:.2f} ± "
                     f"{100 * r[('test_accuracy', 'std')]:.2f} | "
                     f"{r[('train_seconds', 'mean')]:.2f} | {r[('epochs', 'mean')]:.0f} |")
    md.write_text("Mean over the five tightest default budgets, then mean ± sd over seeds.\n\n"
                  + "\n".join(lines) + "\n")
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
