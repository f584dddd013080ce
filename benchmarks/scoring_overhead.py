"""Each policy's own cost per exit at batch 1, against the first exit's cost, with a profile.

On the bundled 4-exit network (CPU, one thread), for every deployable method,
the policy's own cost ``O_k`` (what serving adds to the network for a sample
leaving at exit k) is measured twice by :func:`eenet.runtime.overhead.policy_overhead`:
around a stand-in network, and inside the real network. The per-exit step is
``O_1 - O_0`` (deciding one more exit). Then ``torch.profiler`` lists the
operators one EENet decision runs, which is where the time goes.

Usage:
    python benchmarks/scoring_overhead.py --out benchmarks/results/scoring_overhead.csv
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch

import eenet
from eenet import ExitPolicy
from eenet.runtime.overhead import choose_overhead, policy_overhead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import bundled_caches  # noqa: E402

METHODS = ["eenet", "eenet-paper", "maxprob", "entropy", "patience", "static"]


def profile_eenet_step(policy: ExitPolicy, n_classes: int) -> str:
    """The operators of one EENet decision at exit 1 (batch 1), by self CPU time."""
    scorer = policy.scorer
    logits = torch.randn(1, n_classes)
    torch.set_num_threads(1)
    with torch.inference_mode():
        for _ in range(50):  # warm-up
            state = scorer.start(1, n_classes)
            scorer.score_exit(0, logits, state)
            scorer.score_exit(1, logits, state)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(200):
                state = scorer.start(1, n_classes)
                scorer.score_exit(0, logits, state)
                scorer.score_exit(1, logits, state)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scoring_overhead.csv"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    val, _ = bundled_caches("fashion_mnist_cnn4", args.cache_dir)
    inside = choose_overhead("model", val)
    first_exit = float(val.costs[0])
    rows = []
    for method in METHODS:
        policy = ExitPolicy(method, seed=args.seed).fit(val, float(val.costs[-1]))
        for where, own in (("stand-in", policy_overhead(policy, val, min_run_time=0.3)),
                           ("in the network", inside(policy, val))):
            step = float(own[1] - own[0])
            rows.append({"method": method, "measured": where, "first_exit_ms": first_exit,
                         "own_cost_exit0_us": 1e3 * float(own[0]),
                         "per_exit_step_us": 1e3 * step,
                         "step_over_first_exit": step / first_exit,
                         "own_cost_by_exit_us": ";".join(f"{1e3 * o:.1f}" for o in own),
                         "eenet_version": eenet.__version__})
            r = rows[-1]
            print(f"{method:12s} {where:15s} O_0 {r['own_cost_exit0_us']:6.1f} us, per exit "
                  f"{r['per_exit_step_us']:6.1f} us = {100 * r['step_over_first_exit']:5.1f}% "
                  f"of exit 0 ({1e3 * first_exit:.0f} us)", flush=True)
        if method == "eenet":
            table = profile_eenet_step(policy, val.n_classes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    profile = args.out.with_name("scoring_overhead_profile.txt")
    profile.write_text("One EENet decision at exits 0 and 1, batch 1, one thread, 200 times "
                       "(torch.profiler):\n\n" + table + "\n")
    print(table)
    print(f"wrote {args.out} and {profile}")


if __name__ == "__main__":
    main()
