"""Served latency against the budget: the policy's own cost counted or not, batch 1 and 256.

For each bundled Fashion-MNIST network (4 and 6 exits) and three budgets, the
script fits ``eenet`` and ``maxprob`` on the validation cache three times:
calibrated on the network's cached costs alone (as the published methods and
the paper account), with the policy's own cost measured around a stand-in
network (``--overhead on``), and with it measured inside the real network
(``--overhead model``); then it serves each policy on the test split with
:class:`eenet.runtime.EarlyExitModel` and :func:`eenet.runtime.bench.bench_policy`:

* realized mean latency per sample at batch 1 (one thread, as the cache's
  costs are measured) over the budget;
* speed-up over the full network at batch 1 and at batch 256;
* the runtime's accuracy next to the simulated accuracy on the same samples;
* EENet against max-probability, each paying its own cost.

Usage:
    python benchmarks/runtime_latency.py --out benchmarks/results/runtime_latency.csv
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import eenet
from eenet import ExitPolicy, read_cache
from eenet.ingest.data import load_dataset
from eenet.ingest.model import load_model
from eenet.runtime import EarlyExitModel
from eenet.runtime.bench import bench_policy
from eenet.runtime.overhead import choose_overhead, policy_overhead

MODELS = {"fashion_mnist_cnn4": "eenet.examples.models:fashion_mnist_cnn4",
          "fashion_mnist_cnn6": "eenet.examples.models:fashion_mnist_cnn6"}


def budgets_for(val, policies_overhead: list[np.ndarray]) -> np.ndarray:
    """Three budgets every policy can serve: a quarter, half and three quarters of the way
    from the dearest cheapest exit (own cost included) to the last exit."""
    low = max(float(val.costs[0] + o[0]) for o in policies_overhead)
    return low + (float(val.costs[-1]) - low) * np.array([0.15, 0.3, 0.5])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=2000, help="test samples served")
    ap.add_argument("--batch1", type=int, default=500, help="of them, timed one at a time")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_latency.csv"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for name in args.models.split(","):
        val = read_cache(args.cache_dir / f"{name}_val.h5")
        test = read_cache(args.cache_dir / f"{name}_test.h5")
        head = test.subset(np.arange(args.limit))
        net = load_model(MODELS[name], device="cpu")
        data = load_dataset("fashion-mnist:test")
        inside = choose_overhead("model", val)
        own = {}
        for m in ("eenet", "maxprob"):
            fitted = ExitPolicy(m, seed=args.seed).fit(val, float(val.costs[-1]))
            own[m] = {"ignored": None, "stand-in": policy_overhead(fitted, val),
                      "in the network": inside(fitted, val)}
        for budget in budgets_for(val, [o["in the network"] for o in own.values()]):
            for method in ("eenet", "maxprob"):
                for counted, overhead in own[method].items():
                    policy = ExitPolicy(method, seed=args.seed).fit(val, float(budget),
                                                                    overhead=overhead)
                    served = EarlyExitModel(net, policy)
                    b = bench_policy(served, data, batch_size=256, limit=args.limit,
                                     n_batch1=args.batch1)
                    simulated = policy.evaluate(head)
                    rows.append({
                        "model": name, "method": method, "budget": float(budget),
                        "own_cost_counted": counted, "seed": args.seed,
                        "latency_b1_ms": b.latency_ms_batch1,
                        "latency_b1_over_budget": b.latency_ms_batch1 / budget,
                        "simulated_cost_ms": b.simulated_cost,
                        "network_only_simulated_ms": float(np.mean(
                            head.costs[policy.exits(head)])),
                        "speedup_b1": b.full_ms_batch1 / b.latency_ms_batch1,
                        "latency_b256_ms": b.latency_ms_batchB,
                        "speedup_b256": b.full_ms_batchB / b.latency_ms_batchB,
                        "full_b1_ms": b.full_ms_batch1, "full_b256_ms": b.full_ms_batchB,
                        "runtime_accuracy": b.accuracy, "simulated_accuracy": simulated.accuracy,
                        "exit_fractions": ";".join(f"{f:.3f}" for f in b.exit_fractions),
                        "own_cost_first_exit_ms": np.nan if overhead is None
                        else float(overhead[0]),
                        "own_cost_last_exit_ms": np.nan if overhead is None
                        else float(overhead[-1]),
                        "eenet_version": eenet.__version__})
                    r = rows[-1]
                    print(f"{name} {method:8s} B={budget:.4f} own cost "
                          f"{counted}: batch-1 "
                          f"{r['latency_b1_ms']:.4f} ms = {r['latency_b1_over_budget']:.3f} B, "
                          f"speed-up b1 {r['speedup_b1']:.2f} b256 {r['speedup_b256']:.2f}, "
                          f"acc {r['runtime_accuracy']:.4f} (simulated "
                          f"{r['simulated_accuracy']:.4f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
