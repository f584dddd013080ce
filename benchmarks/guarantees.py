"""Guarantees on the bundled networks: the budget guard vs a certified budget, and risk control.

For each bundled Fashion-MNIST model (4 and 6 exits), fitted on the validation
cache (10,000 samples) and evaluated on the test cache (10,000 others):

1. **Budget.** At the default budgets (``default_budgets(val, 10)``), for
   ``eenet`` and ``maxprob``: the bootstrap guard (the default,
   ``ExitPolicy(...).fit(val, B)``) against the budget certified with
   confidence 0.9 and 0.95 (``fit(val, B, guarantee=Guarantee(confidence=c))``,
   the WSR bound, half the cache certifying). Reported: realized test cost /
   budget and test accuracy.
2. **Risk control.** Consistency with the full model (the early answer differs
   from the last exit's) at epsilon 0.01, 0.02, 0.05 and delta 0.1, with
   conformal risk control (``crc``, in expectation) and the
   Waudby-Smith-Ramdas bound (``ucb-wsr``, with probability 0.9), for EENet's
   learned scores, max-probability and entropy (``run_sweep(...,
   risk=Guarantee(...), epsilons=...)``). Reported: the test cost saved
   relative to the full model, the realized test risk and accuracy.

Every cell is repeated over ``--seeds`` seeds. Costs are the network's alone
(``overhead=None``), so the numbers isolate the calibration.

Writes a tidy CSV, one row per (part, model, method, setting, budget or
epsilon, seed), and prints Markdown tables (``--tables-from CSV`` prints them
again without refitting).

Usage:
    python benchmarks/guarantees.py --seeds 3 --out benchmarks/results/guarantees.csv
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import eenet
from eenet import ExitPolicy, run_sweep
from eenet.rules.certified import Guarantee
from eenet.sweep import default_budgets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import MODELS, add_cache_options, bundled_caches  # noqa: E402

COLUMNS = ["part", "dataset", "model", "method", "setting", "budget", "confidence", "risk",
           "bound", "epsilon", "delta", "seed", "accuracy", "avg_cost", "cost_ratio",
           "full_cost", "cost_saved", "risk_consistency", "risk_gap", "risk_brier",
           "val_accuracy", "val_avg_cost", "certified_index", "fallback", "fit_seconds",
           "eenet_version"]
BUDGET_METHODS = ["eenet", "maxprob"]
#: setting -> (guard, confidence, calibration): how the policy is fitted; "guard" is
#: eenet's default, "no guard" calibrates against B itself, and the last setting
#: certifies the search staircase instead of the methods' default geometric ladder
BUDGET_SETTINGS: dict[str, tuple[bool, float | None, str | None]] = {
    "no guard": (False, None, None),
    "guard": (True, None, None),
    "confidence 0.9": (True, 0.9, None),
    "confidence 0.95": (True, 0.95, None),
    "confidence 0.9, search": (True, 0.9, "search"),
}
RISK_METHODS = ["eenet", "maxprob", "entropy"]
RISK_BOUNDS = ["crc", "ucb-wsr"]
EPSILONS = [0.01, 0.02, 0.05]
DELTA = 0.1

_CACHES: dict[str, tuple[Any, Any]] = {}


# ---------------------------------------------------------------------------
# part 1: the budget
# ---------------------------------------------------------------------------
def _budget_cell(task: tuple) -> dict[str, Any]:
    name, method, setting, budget, seed = task
    val, test = _CACHES[name]
    guard, confidence, calibration = BUDGET_SETTINGS[setting]
    guarantee = None if confidence is None else Guarantee(confidence=confidence)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = ExitPolicy(method, calibration=calibration, guard=guard, seed=seed).fit(
            val, budget, overhead=None, guarantee=guarantee)
    seconds = time.perf_counter() - start
    result = policy.evaluate(test)
    record = policy.rule.diagnostics.get("certified", {})
    fallback = bool(record.get("fallback")) or any("no thresholds of the family are certified"
                                                   in str(w.message) for w in caught)
    return {**_result_columns(result, test), "part": "budget", "model": name,
            "method": method, "setting": setting, "budget": budget, "confidence": confidence,
            "seed": seed, "cost_ratio": result.avg_cost / budget,
            "val_accuracy": policy.val_accuracy, "val_avg_cost": policy.val_cost,
            "certified_index": record.get("candidate"), "fallback": fallback,
            "fit_seconds": seconds}


def _result_columns(result, test) -> dict[str, Any]:
    full = float(test.costs[-1])
    return {"accuracy": result.accuracy, "avg_cost": result.avg_cost, "full_cost": full,
            "cost_saved": 1.0 - result.avg_cost / full,
            **{f"risk_{k}": v for k, v in result.risks.items()}}


def _init_worker(caches: dict[str, tuple[Any, Any]]) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core
    _CACHES.update(caches)


def budget_rows(caches: dict[str, tuple[Any, Any]], seeds: list[int], n_budgets: int,
                jobs: int) -> list[dict[str, Any]]:
    tasks = [(name, method, setting, float(b), seed)
             for name, (val, _) in caches.items()
             for b in default_budgets(val, n_budgets)
             for method in BUDGET_METHODS for setting in BUDGET_SETTINGS for seed in seeds]
    tasks.sort(key=lambda t: t[1] != "eenet")  # slow cells first
    if jobs <= 1:
        _init_worker(caches)
        return [_budget_cell(t) for t in tasks]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    rows = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method),
                             initializer=_init_worker, initargs=(caches,)) as pool:
        for i, row in enumerate(pool.map(_budget_cell, tasks, chunksize=1)):
            rows.append(row)
            if (i + 1) % 20 == 0 or i + 1 == len(tasks):
                print(f"  budget cells {i + 1}/{len(tasks)}", flush=True)
    return rows


# ---------------------------------------------------------------------------
# part 2: risk control
# ---------------------------------------------------------------------------
def risk_rows(caches: dict[str, tuple[Any, Any]], seeds: list[int], jobs: int
              ) -> list[dict[str, Any]]:
    rows = []
    for name, (val, test) in caches.items():
        for bound in RISK_BOUNDS:
            start = time.perf_counter()
            table = run_sweep(val, test, methods=RISK_METHODS, seeds=seeds, jobs=jobs,
                              overhead=None, epsilons=EPSILONS,
                              risk=Guarantee(risk="consistency", epsilon=0.0, delta=DELTA,
                                             risk_bound=bound), verbose=False)
            print(f"  {name} {bound}: {time.perf_counter() - start:.0f} s", flush=True)
            table = table[table["epsilon"].notna()]
            full = float(test.costs[-1])
            for r in table.to_dict("records"):
                rows.append({**r, "part": "risk", "model": name, "setting": bound,
                             "budget": math.nan, "risk": "consistency", "bound": bound,
                             "delta": None if bound == "crc" else DELTA, "full_cost": full,
                             "cost_saved": 1.0 - r["avg_cost"] / full,
                             "val_avg_cost": r["val_avg_cost"]})
    return rows


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
def _pm(mean: float, sd: float, scale: float = 100.0, digits: int = 2) -> str:
    sd_text = "" if not np.isfinite(sd) else f" ± {scale * sd:.{digits}f}"
    return f"{scale * mean:.{digits}f}{sd_text}"


def budget_tables(table: pd.DataFrame) -> str:
    part = table[table["part"] == "budget"]
    lines = []
    settings = [s for s in BUDGET_SETTINGS if s in set(part["setting"])]
    for model, by_model in part.groupby("model", sort=False):
        unit = "ms"
        n_seeds = by_model["seed"].nunique()
        for method, d in by_model.groupby("method", sort=False):
            lines += [f"#### {model}, {method}", "",
                      f"Test accuracy (%, mean ± sd over {n_seeds} seeds) / realized test cost "
                      f"÷ budget (mean, and max over seeds); budgets in {unit}; F: a fallback "
                      f"to the full model in some seed.", "",
                      "| budget | " + " | ".join(settings) + " |",
                      "|---:|" + "---:|" * len(settings)]
            for budget, cell in d.groupby("budget"):
                parts = []
                for s in settings:
                    c = cell[cell["setting"] == s]
                    parts.append(f"{_pm(c['accuracy'].mean(), c['accuracy'].std())} / "
                                 f"{c['cost_ratio'].mean():.3f} ({c['cost_ratio'].max():.3f})"
                                 + (" F" if c["fallback"].any() else ""))
                lines.append(f"| {budget:.4g} | " + " | ".join(parts) + " |")
            lines.append("")
    lines += ["Summary over every budget and seed (accuracy change against the guard in "
              "points, paired by budget and seed):", "",
              "| model | method | setting | mean accuracy change | min | cells over B | "
              "max cost/B | mean cost/B | fallbacks |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = ["model", "method", "budget", "seed"]
    guard = part[part["setting"] == "guard"].set_index(keys)["accuracy"]
    for (model, method), d in part.groupby(["model", "method"], sort=False):
        for s in settings:
            c = d[d["setting"] == s]
            change = 100 * (c.set_index(keys)["accuracy"] - guard.reindex(
                c.set_index(keys).index))
            over = int((c["cost_ratio"] > 1 + 1e-9).sum())  # not the float error at B = c_K
            lines.append(f"| {model} | {method} | {s} | {change.mean():+.2f} | "
                         f"{change.min():+.2f} | {over}/{len(c)} | "
                         f"{c['cost_ratio'].max():.3f} | {c['cost_ratio'].mean():.3f} | "
                         f"{int(c['fallback'].sum())} |")
    return "\n".join(lines) + "\n"


def risk_tables(table: pd.DataFrame) -> str:
    part = table[table["part"] == "risk"]
    lines = []
    for model, by_model in part.groupby("model", sort=False):
        n_seeds = by_model["seed"].nunique()
        lines += [f"#### {model}", "",
                  f"Test cost saved against the full model (%, mean ± sd over {n_seeds} "
                  f"seeds), realized test consistency risk (%, mean and max over seeds) and "
                  f"test accuracy (%, mean).", "",
                  "| epsilon | bound | scores | cost saved | risk (mean) | risk (max) | "
                  "accuracy |", "|---:|---|---|---:|---:|---:|---:|"]
        for (eps, bound, method), c in by_model.groupby(["epsilon", "setting", "method"],
                                                        sort=True):
            lines.append(f"| {eps:g} | {bound} | {method} | "
                         f"{_pm(c['cost_saved'].mean(), c['cost_saved'].std(), digits=1)} | "
                         f"{100 * c['risk_consistency'].mean():.2f} | "
                         f"{100 * c['risk_consistency'].max():.2f} | "
                         f"{100 * c['accuracy'].mean():.2f} |")
        lines.append("")
    return "\n".join(lines)


def tables(table: pd.DataFrame) -> str:
    return ("### 1. The budget: guard vs certified\n\n" + budget_tables(table)
            + "\n### 2. Risk control: cost saved at a consistency level\n\n"
            + risk_tables(table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--n-budgets", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--parts", default="budget,risk")
    add_cache_options(ap)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/guarantees.csv"))
    ap.add_argument("--tables-from", type=Path, default=None,
                    help="print the tables of an earlier run's CSV and exit")
    args = ap.parse_args()
    if args.tables_from is not None:
        print(tables(pd.read_csv(args.tables_from)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    caches = {name: bundled_caches(name, args.cache_dir, args.data_dir)
              for name in args.models.split(",")}
    parts = args.parts.split(",")
    rows = []
    start = time.perf_counter()
    if "budget" in parts:
        rows += budget_rows(caches, seeds, args.n_budgets, args.jobs)
        print(f"budget part: {time.perf_counter() - start:.0f} s", flush=True)
    if "risk" in parts:
        rows += risk_rows(caches, seeds, args.jobs)
        print(f"both parts: {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table["dataset"] = "fashion-mnist"
    table["eenet_version"] = eenet.__version__
    table = table.reindex(columns=COLUMNS)
    table.to_csv(args.out, index=False)
    print(tables(table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
