"""Does the choice of calibration depend on the network's cost profile?

The same exit outputs (each bundled network's validation and test caches)
under several per-exit cost vectors: the latencies measured on this machine,
an earlier timing of the same networks on this machine (one forward per exit
then, which charged the first exits more), equal stage costs (exit k costs
k + 1), and the FLOPs counted by ``torch.utils.flop_counter``. For each
profile, EENet's scores and max-probability are calibrated with the geometric
rule (MSDNet's, the default), with eenet's search, and with ``select`` (the
better of the two on held-out halves of validation), fitted on validation at
the 10 default budgets of that profile with several seeds and evaluated on
test; the network's costs alone are charged. Last, the time one EENet fit
takes with each calibration.

Usage:
    python benchmarks/calibration_profiles.py --seeds 3 --out benchmarks/results/calibration_profiles.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import eenet
from eenet.examples.models import fashion_mnist_cnn4, fashion_mnist_cnn6
from eenet.ingest.costs import measure_costs
from eenet.sweep import run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import add_cache_options, bundled_caches  # noqa: E402

METHODS = ["eenet", "eenet:search", "eenet:select", "maxprob", "maxprob:search", "maxprob:select"]
# The per-exit latencies (ms) this machine measured for the bundled networks with
# eenet 0.1.0, which timed every exit by its own forward pass (the static rows of
# that version's results/policy_quality.csv).
EARLIER_TIMING = {"fashion_mnist_cnn4": [0.167629, 0.22657, 0.409161, 0.629607],
                  "fashion_mnist_cnn6": [0.084496, 0.186665, 0.39556, 0.606087, 0.809791,
                                         1.103645]}
FACTORIES = {"fashion_mnist_cnn4": fashion_mnist_cnn4, "fashion_mnist_cnn6": fashion_mnist_cnn6}


def profiles(name: str, measured: np.ndarray) -> dict[str, np.ndarray]:
    """The cost vectors compared for network ``name``, each cumulative and increasing."""
    flops = measure_costs(FACTORIES[name]().eval(), torch.zeros(1, 1, 28, 28), device="cpu",
                          batch_size=1, timing=False).flops
    k = len(measured)
    return {"measured latency": measured,
            "earlier timing": np.asarray(EARLIER_TIMING[name], dtype=float),
            "equal stages": np.arange(1.0, k + 1),
            "FLOPs (millions)": np.asarray(flops, dtype=float) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    add_cache_options(ap)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_profiles.csv"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    seeds = list(range(args.seed, args.seed + args.seeds))
    tables = []
    for name in FACTORIES:
        val, test = bundled_caches(name, args.cache_dir, args.data_dir)
        for profile, costs in profiles(name, val.costs).items():
            v = dataclasses.replace(val, costs=costs, cost_source="given")
            t = dataclasses.replace(test, costs=costs, cost_source="given")
            table = run_sweep(v, t, n_budgets=10, methods=METHODS, seeds=seeds, verbose=False)
            table = table[table["method"].isin(METHODS)].assign(
                model=name, profile=profile,
                costs=";".join(f"{c:.4g}" for c in costs / costs[-1]),
                eenet_version=eenet.__version__)
            tables.append(table)
            print(f"{name} {profile} done", flush=True)
    rows = pd.concat(tables, ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out, index=False)
    md = args.out.with_suffix(".md")
    md.write_text(summarise(rows) + fit_times(*bundled_caches("fashion_mnist_cnn4", args.cache_dir,
                                                             args.data_dir)))
    print(md.read_text())
    print(f"wrote {args.out} and {md}")


def fit_times(val, test, repeats: int = 5) -> str:
    """Seconds of one ``ExitPolicy("eenet", calibration=...).fit`` per calibration (in
    process, median of ``repeats`` interleaved runs) at the middle default budget."""
    from eenet import ExitPolicy
    from eenet.sweep import default_budgets

    budget = float(default_budgets(val, 10)[5])
    modes = ["geometric", "search", "select"]
    times = {mode: [] for mode in modes}
    ExitPolicy("maxprob").fit(val, budget)  # warm imports and caches
    for _ in range(repeats):
        for mode in modes:
            started = time.perf_counter()
            ExitPolicy("eenet", calibration=mode).fit(val, budget)
            times[mode].append(time.perf_counter() - started)
    cells = ", ".join(f"{mode} {np.median(t):.2f} s" for mode, t in times.items())
    return (f"\nOne EENet fit on the cnn4 validation cache at {budget:.4g} ms (training and "
            f"calibration, median of {repeats} interleaved runs): {cells}.\n")


def summarise(rows: pd.DataFrame) -> str:
    """Test accuracy (%) over the five tightest and five loosest budgets, mean ± sd over seeds."""
    rows = rows.copy()
    rank = rows.groupby(["model", "profile"])["budget"].rank(method="dense")
    rows["half"] = np.where(rank <= 5, "tight", "loose")
    per_seed = rows.groupby(["model", "profile", "costs", "half", "method", "seed"],
                            sort=False)["accuracy"].mean()
    stats = per_seed.groupby(["model", "profile", "costs", "half", "method"],
                             sort=False).agg(["mean", "std"]).reset_index()
    worst = rows.assign(over=rows["avg_cost"] / rows["budget"]).groupby(
        ["model", "profile"], sort=False)["over"].max()
    lines = ["Test accuracy (%), mean over the five tightest or five loosest of the 10 default",
             "budgets, then mean ± sd over seeds; costs are relative to the last exit.", "",
             "| network | profile | costs / last | budgets | " + " | ".join(METHODS)
             + " | max cost/B |", "|---|---|---|---|" + "---:|" * (len(METHODS) + 1)]
    for (model, profile, costs, half), g in stats.groupby(
            ["model", "profile", "costs", "half"], sort=False):
        cells = {r["method"]: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
                 for _, r in g.iterrows()}
        lines.append(f"| {model} | {profile} | {costs.replace(';', ' / ')} | {half} | "
                     + " | ".join(cells[m] for m in METHODS)
                     + f" | {worst[model, profile]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
