"""Where EENet starts to pay: EENet against max-probability as the network's stages get heavier.

On the bundled 4-exit CNN or the 6-exit WordNet transformer (CPU, batch 1, one
thread), every stage is made
``factor`` times as costly by a calibrated stand-in workload run inside it
after the stage's own layers: a chain of 128x128 matrix-vector products and
tanh whose length is set so that it takes ``(factor - 1)`` times the stage's
measured batch-1 time. The workload changes no output, so the exit logits are
the cached ones; only the costs grow. It is a stand-in for a heavier network,
not one: real heavier stages would also change what the exits know.

For each factor (1x, 4x, 16x), the exits are re-timed on the heavier network
(``measure_costs``, as ``eenet cache`` times them), the validation and test
caches take those costs, and EENet and max-probability are fitted at three
budgets, each charged its own cost measured inside the heavier network
(``policy_overhead`` with the model, as ``--overhead model`` does, timed paired:
back-to-back blocks, steadier on a machine whose speed drifts). Test
accuracy and cost come from the simulation, which equals what the runtime
serves (tests/test_runtime.py); the served batch-1 latency of each policy on
``--limit`` test images (``bench_policy``) checks that the budget holds, both as
timed and at the speed the costs were timed at (the served latency over the full
network's, timed in alternating passes, times the full network's re-timed cost: the
machine's speed drifts between the two timings). The
script prints the smallest factor at which EENet's accuracy is ahead of
max-probability's at every budget, or that none is.

Usage:
    python benchmarks/where_eenet_pays.py --out benchmarks/results/where_eenet_pays.csv
    python benchmarks/where_eenet_pays.py --network wordnet \
        --out benchmarks/results/where_eenet_pays_wordnet.csv
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import eenet
from eenet import EenetError, ExitPolicy
from eenet import read_cache
from eenet._validation import network_fingerprint
from eenet.examples.models import fashion_mnist_cnn4, wordnet_transformer
from eenet.ingest.costs import measure_costs
from eenet.ingest.data import load_dataset
from eenet.runtime.bench import bench_policy
from eenet.runtime.model import EarlyExitModel
from eenet.runtime.overhead import policy_overhead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import add_cache_options, bundled_caches  # noqa: E402

FACTORS = (1, 4, 16)
BUDGET_SHARES = (0.35, 0.5, 0.65)  # of the heavier network's last-exit cost
METHODS = ("eenet", "maxprob")
TIE_POINTS = 0.1  # a smaller gap is a tie whatever the seed spread (10 of 10,000 images)


class _Workload(nn.Module):
    """A stage followed by ``reps`` matrix-vector products and tanh that change nothing."""

    def __init__(self, stage: nn.Module, reps: int) -> None:
        super().__init__()
        self.stage, self.reps = stage, reps
        self.register_buffer("w", torch.randn(128, 128, generator=torch.Generator()
                                              .manual_seed(0)) / 12)

    def forward(self, h):
        out = self.stage(h)
        v = self.w[0]
        for _ in range(self.reps):
            v = torch.tanh(self.w @ v)
        return out


def _unit_ms(reps: int = 200) -> float:
    """ms of one workload step at batch 1, one thread: the median of 25 blocks, as the
    stages' costs are medians (a fastest block against median stage times would make
    the stand-in too long on a loaded machine)."""
    w, v = torch.randn(128, 128) / 12, torch.randn(128)
    blocks = []
    with torch.inference_mode():
        for _ in range(25):
            started = time.perf_counter()
            for _ in range(reps):
                v = torch.tanh(w @ v)
            blocks.append((time.perf_counter() - started) / reps)
    return float(np.median(blocks)) * 1e3


def heavier(net: nn.Module, stage_ms: np.ndarray, factor: int, unit_ms: float) -> nn.Module:
    """A copy of the staged ``net`` whose stage k costs about ``factor * stage_ms[k]``."""
    out = copy.deepcopy(net)
    reps = np.rint((factor - 1) * stage_ms / unit_ms).astype(int)
    out.stages = nn.ModuleList([_Workload(s, int(r)) for s, r in zip(out.stages, reps)])
    return out.eval()


def run_factor(net, x1, val, test, dataset, factor: int, stage_ms, unit_ms, args) -> list[dict]:
    """Fit, evaluate and serve both methods at three budgets on the ``factor``x network."""
    model = heavier(net, stage_ms, factor, unit_ms)
    costs = measure_costs(model, x1, device="cpu", batch_size=1,
                          min_run_time=0.5).latency_ms_batch1
    # the heavier network is another network (its parameters include the workload's):
    # the caches take its costs and its fingerprint, so policies fitted on them serve it
    attrs = {"network_sha256": network_fingerprint(model)}
    val_f, test_f = (dataclasses.replace(c, costs=np.asarray(costs),
                                         attrs={**c.attrs, **attrs}) for c in (val, test))

    def own_cost(policy, cache):  # paired, the default inside the network
        return policy_overhead(policy, cache, model=model, example_input=x1)

    rows = []
    for share in BUDGET_SHARES:
        budget = share * float(costs[-1])
        for method in METHODS:
            for seed in range(args.seeds):
                try:
                    policy = ExitPolicy(method, seed=seed).fit(val_f, budget,
                                                               overhead=own_cost)
                except EenetError as err:  # below the cheapest exit once its own cost counts
                    print(f"{factor:2d}x budget {budget:7.3f} ms {method}: {err}", flush=True)
                    continue
                result = policy.evaluate(test_f)
                served = bench_policy(EarlyExitModel(model, policy), dataset, batch_size=64,
                                      limit=args.limit, n_batch1=args.limit, repeats=1)
                rows.append({"factor": factor, "first_exit_ms": float(costs[0]),
                             "full_ms": float(costs[-1]), "budget": budget, "method": method,
                             "seed": seed, "accuracy": result.accuracy,
                             "avg_cost": result.avg_cost,
                             "own_cost_exit0_ms": float(policy.overhead[0]),
                             "served_ms_batch1": served.latency_ms_batch1,
                             "served_over_budget": served.latency_ms_batch1 / budget,
                             "full_now_over_cached": served.full_ms_batch1 / float(costs[-1]),
                             "served_over_budget_at_cached_speed":
                                 served.latency_ms_batch1 / served.full_ms_batch1
                                 * float(costs[-1]) / budget,
                             "eenet_version": eenet.__version__})
                r = rows[-1]
                print(f"{factor:2d}x budget {budget:7.3f} ms {method:8s} seed {seed}: accuracy "
                      f"{100 * r['accuracy']:.2f}%  served {r['served_over_budget']:.3f} x B "
                      f"({r['served_over_budget_at_cached_speed']:.3f} x B at the cached "
                      f"speed)",
                      flush=True)
    return rows


def summary(df: pd.DataFrame) -> str:
    """EENet against max-probability per factor and budget (mean ± sd over seeds), the served
    latency over the budget, and the smallest factor where EENet is ahead at every budget by
    more than the seed spread (at least ``TIE_POINTS``)."""
    g = df.groupby(["factor", "budget", "method"])
    acc = (100 * g.accuracy.agg(["mean", "std"])).unstack("method")
    served = g[["served_over_budget", "served_over_budget_at_cached_speed"]].mean().unstack(
        "method")
    lines = ["| factor | budget (ms) | eenet (%) | maxprob (%) | eenet - maxprob | verdict | "
             "served / B, eenet / maxprob | at the cached speed |",
             "|---:|---:|---:|---:|---:|---|---:|---:|"]
    ahead = {}
    for (factor, budget), r in acc.iterrows():
        gap = r[("mean", "eenet")] - r[("mean", "maxprob")]
        sd = np.nanmax([r[("std", "eenet")], r[("std", "maxprob")], TIE_POINTS])
        verdict = "ahead" if gap > sd else "behind" if gap < -sd else "tie"
        ahead.setdefault(factor, []).append(verdict == "ahead")
        s = served.loc[(factor, budget)]
        lines.append(
            f"| {factor}x | {budget:.4g} | {r[('mean', 'eenet')]:.2f} ± {r[('std', 'eenet')]:.2f}"
            f" | {r[('mean', 'maxprob')]:.2f} ± {r[('std', 'maxprob')]:.2f} | {gap:+.2f} | "
            f"{verdict} | {s[('served_over_budget', 'eenet')]:.2f} / "
            f"{s[('served_over_budget', 'maxprob')]:.2f} | "
            f"{s[('served_over_budget_at_cached_speed', 'eenet')]:.2f} / "
            f"{s[('served_over_budget_at_cached_speed', 'maxprob')]:.2f} |")
    first = [f for f in sorted(ahead) if all(ahead[f])]
    lines += ["", f"verdict: the gap against the larger seed sd of the two methods, at least "
                  f"{TIE_POINTS} point.",
              f"EENet is ahead at every budget from {first[0]}x the real stage cost"
              if first else "EENet is not ahead at every budget at any factor tried"]
    return "\n".join(lines)


def network(name: str, args: argparse.Namespace):
    """(net, validation cache, test cache, served test dataset) of ``--network``."""
    if name == "cnn4":
        val, test = bundled_caches("fashion_mnist_cnn4", args.cache_dir, args.data_dir)
        return (fashion_mnist_cnn4().eval(), val, test,
                load_dataset("fashion-mnist:test", args.data_dir))
    paths = [args.cache_dir / f"wordnet_{split}.h5" for split in ("val", "test")]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{missing[0]} is missing: eenet cache --model "
                         f"eenet.examples.models:wordnet_transformer --data wordnet:val --out "
                         f"{paths[0]} (and wordnet:test with --costs-from {paths[0]})")
    return (wordnet_transformer().eval(), read_cache(paths[0]), read_cache(paths[1]),
            load_dataset("wordnet:test"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_options(ap)
    ap.add_argument("--network", choices=("cnn4", "wordnet"), default="cnn4",
                    help="the bundled CNN or the WordNet transformer (its caches under "
                         "--cache-dir)")
    ap.add_argument("--seeds", type=int, default=1, help="fits per method and budget")
    ap.add_argument("--limit", type=int, default=200, help="test images served at batch 1")
    ap.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/where_eenet_pays.csv"))
    ap.add_argument("--report", type=Path, help="only print the report of this CSV")
    args = ap.parse_args()
    if args.report is not None:
        print(summary(pd.read_csv(args.report)))
        return
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    net, val, test, dataset = network(args.network, args)
    x1 = dataset[0][0][None]
    base = measure_costs(net, x1, device="cpu", batch_size=1, min_run_time=0.5)
    stage_ms = np.diff(np.r_[0.0, base.latency_ms_batch1])
    unit_ms = _unit_ms()
    rows = []
    for factor in args.factors:
        rows += run_factor(net, x1, val, test, dataset, factor, stage_ms, unit_ms, args)
    df = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    text = summary(df)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
