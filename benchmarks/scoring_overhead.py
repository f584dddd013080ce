"""Each policy's own cost per exit, at batch 1 and per sample at batch 256, with a profile.

On the bundled 4-exit network (CPU, one thread), for every deployable method,
the policy's own cost ``O_k`` (what serving adds to the network for a sample
leaving at exit k) is measured by :func:`eenet.runtime.overhead.policy_overhead`
around a stand-in network and inside the real network at batch 1, and around
the stand-in at batch 256 (per sample, every sample leaving at the same exit:
inside the network the policy's share of a 256-sample batch is below the
timing noise of a shared machine). The machine is shared, so the timing is
``statistic="paired"``: inside the network the median difference of short
blocks timed back to back, around the stand-in the fastest block. The
per-exit step is ``(O_{K-2} - O_0) / (K - 2)``, the mean cost of scoring one
more exit. EENet is measured three ways in the same run: as served (the C
kernel where it builds), with its pure-torch kernel, and with the scoring
code of revision ``--before`` (the
per-field history before the packed state; read with ``git show``, run in
today's runtime), so before and after are side by side on the same load.
Every policy is timed once per round, ``--rounds`` rounds in turn; figures
are medians over the rounds, and ``*_over_maxprob`` ratios the medians of each
round's ratio to max-probability's figure of the same batch and place. Then
``torch.profiler`` lists the operators of one EENet decision at exits 0 and 1
for each of the three.

Usage:
    python benchmarks/scoring_overhead.py --out benchmarks/results/scoring_overhead.csv
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import eenet
from eenet import ExitPolicy
from eenet.runtime.overhead import choose_overhead, policy_overhead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import add_cache_options, bundled_caches  # noqa: E402

METHODS = ["eenet", "eenet-paper", "maxprob", "entropy", "patience", "static"]
BEFORE = "72ec207"  # the last revision with the per-field EENet history


def eenet_variants(policy: ExitPolicy, before: str) -> dict[str, ExitPolicy]:
    """The EENet policy as served, with its torch kernel, and with ``before``'s scoring code."""
    src = subprocess.run(["git", "show", f"{before}:eenet/scores/eenet_stream.py"],
                         capture_output=True, text=True, check=True).stdout
    old = types.ModuleType("eenet_stream_before")
    exec(compile(src, f"{before}:eenet/scores/eenet_stream.py", "exec"), old.__dict__)
    variants = {}
    for name in ("served", "torch kernel", f"before ({before})"):
        v = copy.copy(policy)
        v.scorer = copy.copy(policy.scorer)
        lean = v.scorer.stream
        if name == "torch kernel":
            v.scorer._stream = copy.copy(lean)
            v.scorer._stream.kernel = "torch"
        elif name != "served":  # the same folded heads, the old state and code
            v.scorer._stream = old.EENetStream(lean.heads, n_exits=lean.n_exits,
                                               n_classes=lean.n_classes, top_m=lean.top_m,
                                               agreement=lean.agreement)
        variants[name] = v
    return variants


def profile_decision(policy: ExitPolicy, n_classes: int) -> str:
    """The operators of one decision at exits 0 and 1 (batch 1), by self CPU time."""
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
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def measure(policies: dict[str, ExitPolicy], val, batches: list[int], min_run_time: float,
            rounds: int) -> pd.DataFrame:
    """One row per (method, variant, batch, place): O_0, the per-exit step, O_k.

    Every policy is timed once per round, the rounds one after the other, so a
    stretch of load lands on every method; each figure is the median over the
    rounds, and each ratio the median of the rounds' ratios to max-probability.
    """
    inside = choose_overhead("model", val)
    timing = {"min_run_time": min_run_time, "statistic": "paired"}
    seen: dict[tuple[str, int, str], list[np.ndarray]] = {}
    for r in range(rounds):
        for batch in batches:
            for name, policy in policies.items():
                seen.setdefault((name, batch, "stand-in"), []).append(
                    policy_overhead(policy, val, batch=batch, **timing))
                if batch == 1:
                    seen.setdefault((name, batch, "in the network"), []).append(
                        inside(policy, val, **timing))
        print(f"round {r + 1} of {rounds} done", flush=True)
    rows = []
    for (name, batch, where), owns in seen.items():
        method, _, variant = name.partition(" / ")
        own = np.median(owns, axis=0)
        base = seen["maxprob", batch, where]
        row = {"method": method, "variant": variant or "served", "batch": batch,
               "measured": where, "rounds": rounds, "first_exit_ms": float(val.costs[0]),
               "own_cost_exit0_us": 1e3 * float(own[0]),
               "per_exit_step_us": 1e3 * float(np.median([_mean_step(o) for o in owns])),
               "own_cost_by_exit_us": ";".join(f"{1e3 * o:.2f}" for o in own),
               "own_cost_exit0_over_maxprob": _median_ratio([o[0] for o in owns],
                                                             [m[0] for m in base]),
               "per_exit_step_over_maxprob": _median_ratio([_mean_step(o) for o in owns],
                                                           [_mean_step(m) for m in base]),
               "eenet_version": eenet.__version__}
        rows.append(row)
        print(f"batch {batch:3d} {name:28s} {where:15s} O_0 {row['own_cost_exit0_us']:7.2f} us "
              f"({row['own_cost_exit0_over_maxprob']:.2f}x maxprob), per exit "
              f"{row['per_exit_step_us']:7.2f} us ({row['per_exit_step_over_maxprob']:.2f}x)")
    return pd.DataFrame(rows)


def _median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num / den``, skipping rounds where the timing noise left
    ``den`` at 0 (a difference of two timings, clipped at 0)."""
    ratios = [a / b for a, b in zip(num, den) if b > 0]
    return float(np.median(ratios)) if ratios else float("nan")


def _mean_step(own) -> float:
    """The mean cost of scoring one more exit: ``(O_{K-2} - O_0) / (K - 2)`` (the last exit
    takes everyone unscored, so its step is the runtime's alone)."""
    return float(own[-2] - own[0]) / max(len(own) - 2, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_options(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--before", default=BEFORE, help="git revision of the old EENet scoring")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
    ap.add_argument("--rounds", type=int, default=5, help="timings of every policy, in turn")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scoring_overhead.csv"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    val, _ = bundled_caches("fashion_mnist_cnn4", args.cache_dir, args.data_dir)
    policies: dict[str, ExitPolicy] = {}
    for method in METHODS:
        policy = ExitPolicy(method, seed=args.seed).fit(val, float(val.costs[-1]))
        if method == "eenet":
            for variant, v in eenet_variants(policy, args.before).items():
                policies[f"eenet / {variant}"] = v
        else:
            policies[method] = policy
    df = measure(policies, val, args.batch, args.min_run_time, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    text = ["One EENet decision at exits 0 and 1, batch 1, one thread, 200 times "
            "(torch.profiler), by the scoring code used:\n"]
    for name, policy in policies.items():
        if name.startswith("eenet /"):
            text += [f"== {name} ==", profile_decision(policy, val.n_classes)]
    profile = args.out.with_name("scoring_overhead_profile.txt")
    profile.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {args.out} and {profile}")


if __name__ == "__main__":
    main()
