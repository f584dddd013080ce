"""The benchmark suite: every default judged on several networks and cost profiles, by its worst.

Networks (each an entry of :data:`NETWORKS`; a network whose caches are absent
is skipped with a note):

* ``cnn4``, ``cnn6``: the bundled Fashion-MNIST CNNs (caches built on first use
  by ``_caches.py``), under their measured batch-1 latency and their FLOPs;
* ``wordnet``: the WordNet-supersense text transformer, read from
  ``cache/wordnet_val.h5`` and ``cache/wordnet_test.h5`` (``eenet cache
  eenet.examples.models:wordnet_transformer wordnet:val|test``), under the
  costs it was cached with and its FLOPs when recorded;
* ``syn-weak-flops``, ``syn-many-classes``, ``syn-strong-early``: SYNTHETIC
  caches from :func:`eenet.synthetic_example` (not networks): five exits whose
  first two are weak, with FLOP-like costs where the first exit is cheap;
  100 classes with weak early confidence; and strong early exits with smooth
  scores (the case the geometric rule was chosen on).

Per (network, cost profile): every method at 10 budgets x ``--seeds`` seeds,
fitted on validation and evaluated on test; EENet and max-probability also
under each single calibration (the same trained scorer recalibrated), the
oracle, and the in-sample ceiling (EENet fitted *and* calibrated on test).
Writes a tidy CSV and a Markdown report (``--out`` with ``.md``): the
defaults' worst network, budget adherence per cell, and the headline
checks.

Usage:
    python benchmarks/suite.py --seeds 3 --out benchmarks/results/suite.csv
    python benchmarks/suite.py --networks syn-weak-flops --n-budgets 4 --seeds 1  # a subset
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

import eenet
from eenet import ExitCache, ExitPolicy, read_cache, run_sweep
from eenet.evaluate import evaluate_exits
from eenet.sweep import default_budgets
from eenet.synthetic import synthetic_example

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import add_cache_options, bundled_caches  # noqa: E402

FIXED = ["maxprob", "maxprob:geometric", "maxprob:search", "entropy", "patience", "static",
         "oracle"]
#: learned method -> the single calibrations it is also recalibrated with
LEARNED = {"eenet": ("geometric", "search"), "eenet-paper": ("assignment",)}
BASELINES = ["maxprob", "entropy", "patience", "static"]
CANDIDATES = ("select", "geometric", "search")  # the calibration defaults compared
SYNTHETIC = {
    "syn-weak-flops": dict(n_exits=5, n_classes=10, base_acc=(0.3, 0.55, 0.85, 0.94, 0.96),
                           noise=(0.25, 0.15, 0.08, 0.05, 0.05),
                           costs=(12.0, 30.0, 55.0, 80.0, 110.0)),
    "syn-many-classes": dict(n_exits=4, n_classes=100, base_acc=(0.45, 0.6, 0.75, 0.85),
                             signal=(2.0, 3.0, 4.0, 4.0), costs=(1.0, 1.9, 2.9, 4.0)),
    "syn-strong-early": dict(n_exits=4, n_classes=10, base_acc=(0.8, 0.88, 0.92, 0.94),
                             signal=6.0, noise=0.05, costs=(1.0, 2.0, 3.0, 4.0)),
}


@dataclasses.dataclass(frozen=True)
class Network:
    """One network of the suite: how to get its (validation, test) caches, or None."""

    name: str
    load: Callable[[argparse.Namespace], tuple[ExitCache, ExitCache] | None]
    note: str


def _bundled(name: str) -> Callable[[argparse.Namespace], tuple[ExitCache, ExitCache]]:
    return lambda args: bundled_caches(name, args.cache_dir, args.data_dir)


def _wordnet(args: argparse.Namespace) -> tuple[ExitCache, ExitCache] | None:
    paths = [args.cache_dir / f"wordnet_{split}.h5" for split in ("val", "test")]
    if not all(p.exists() for p in paths):
        return None
    return read_cache(paths[0]), read_cache(paths[1])


def _synthetic(name: str) -> Callable[[argparse.Namespace], tuple[ExitCache, ExitCache]]:
    return lambda args: synthetic_example(args.n_synthetic, seed=0, model=name,
                                          **SYNTHETIC[name])


NETWORKS = {n.name: n for n in (
    Network("cnn4", _bundled("fashion_mnist_cnn4"), "Fashion-MNIST CNN, 4 exits (bundled)"),
    Network("cnn6", _bundled("fashion_mnist_cnn6"), "Fashion-MNIST CNN, 6 exits (bundled)"),
    Network("wordnet", _wordnet, "WordNet-supersense transformer, 45 classes; needs "
            "cache/wordnet_val.h5 and cache/wordnet_test.h5"),
    *(Network(name, _synthetic(name), "SYNTHETIC: " + ", ".join(
        f"{k}={v}" for k, v in knobs.items())) for name, knobs in SYNTHETIC.items()),
)}


def profiles(val: ExitCache, test: ExitCache) -> dict[str, tuple[ExitCache, ExitCache]]:
    """The cost profiles of a network: the costs it was cached with, and its FLOPs if
    recorded (and different)."""
    out = {val.cost_unit: (val, test)}
    flops = val.extra_costs.get("flops")
    if flops is not None and val.cost_unit != "flops":
        def as_flops(c: ExitCache) -> ExitCache:
            return dataclasses.replace(c, costs=np.asarray(flops, float) / 1e6,
                                       cost_unit="MFLOPs", cost_source="given")
        out["MFLOPs"] = (as_flops(val), as_flops(test))
    return out


# ---- the learned methods: one training per (budget, seed), every calibration ----------
def _learned_task(val: ExitCache, test: ExitCache, task: tuple) -> list[dict[str, Any]]:
    method, budget, seed = task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "ceiling":  # fitted and calibrated on the test split itself
            policy = ExitPolicy("eenet", seed=seed).fit(test, budget)
            return [_row("ceiling", policy, test, budget, seed)]
        policy = ExitPolicy(method, seed=seed).fit(val, budget)
        rows = [_row(method, policy, test, budget, seed)]
        for mode in LEARNED[method]:
            policy.calibrate(val, budget, mode=mode)
            rows.append(_row(f"{method}:{mode}", policy, test, budget, seed))
    return rows


def _row(label: str, policy: ExitPolicy, test: ExitCache, budget: float, seed: int
         ) -> dict[str, Any]:
    result = evaluate_exits(policy.exits(test), test, method=label, budget=budget)
    held_out = policy.rule.diagnostics.get("held_out_accuracy") or {}
    return {"method": label, "budget": budget, "seed": seed, "accuracy": result.accuracy,
            "avg_cost": result.avg_cost, "val_accuracy": policy.val_accuracy,
            "selected": policy.rule.diagnostics.get("selected", ""),
            "held_out": ";".join(f"{m}={a:.4f}" for m, a in held_out.items())}


_CACHES: tuple[ExitCache, ExitCache] | None = None


def _init(val: ExitCache, test: ExitCache) -> None:
    global _CACHES
    import torch

    torch.set_num_threads(1)
    _CACHES = (val, test)


def _work(task: tuple) -> list[dict[str, Any]]:
    assert _CACHES is not None
    return _learned_task(*_CACHES, task)


def run_learned(val: ExitCache, test: ExitCache, budgets: np.ndarray, seeds: list[int],
                args: argparse.Namespace) -> pd.DataFrame:
    """EENet at every (budget, seed); the paper recipe and the ceiling at their seeds."""
    n_seeds = {"eenet": len(seeds), "eenet-paper": args.paper_seeds,
               "ceiling": args.ceiling_seeds}
    tasks = [(m, float(b), s) for m in (*LEARNED, "ceiling") for b in budgets
             for s in seeds[:n_seeds[m]]]
    jobs = args.jobs
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init,
                                 initargs=(val, test)) as pool:
            done = list(pool.map(_work, tasks))
    else:
        done = [_learned_task(val, test, t) for t in tasks]
    return pd.DataFrame([row for rows in done for row in rows])


def run_network(name: str, args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    """Every (profile, method, budget, seed) row of one network, or a note if skipped."""
    caches = NETWORKS[name].load(args)
    if caches is None:
        return pd.DataFrame(), f"{name}: skipped, {NETWORKS[name].note}"
    seeds = list(range(args.seed, args.seed + args.seeds))
    tables = []
    for profile, (val, test) in profiles(*caches).items():
        started = time.perf_counter()
        budgets = default_budgets(val, args.n_budgets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fixed = run_sweep(val, test, budgets=budgets, methods=FIXED, seeds=seeds,
                              jobs=args.jobs, verbose=False)
        fixed = fixed[~fixed["method"].str.match(r"^exit\d+$")]
        learned = run_learned(val, test, budgets, seeds, args)
        table = pd.concat([fixed, learned], ignore_index=True).assign(
            network=name, profile=profile, n_exits=val.n_exits, n_classes=val.n_classes,
            costs=";".join(f"{c:.4g}" for c in val.costs), eenet_version=eenet.__version__)
        tables.append(table)
        print(f"{name} ({profile}): {time.perf_counter() - started:.0f} s", flush=True)
    return pd.concat(tables, ignore_index=True), ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default=",".join(NETWORKS),
                    help=f"comma-separated subset of {', '.join(NETWORKS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--ceiling-seeds", type=int, default=3,
                    help="seeds of the in-sample ceiling (EENet fitted on test)")
    ap.add_argument("--paper-seeds", type=int, default=3, help="seeds of eenet-paper")
    ap.add_argument("--n-budgets", type=int, default=10)
    ap.add_argument("--n-synthetic", type=int, default=10_000,
                    help="samples per split of the synthetic networks")
    ap.add_argument("--jobs", type=int, default=2)
    add_cache_options(ap)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/suite.csv"))
    args = ap.parse_args()
    started = time.perf_counter()
    tables, notes = [], []
    for name in args.networks.split(","):
        if name not in NETWORKS:
            ap.error(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
        table, note = run_network(name, args)
        tables.append(table)
        notes += [note] if note else []
    rows = pd.concat(tables, ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out, index=False)
    text = report(rows, notes, time.perf_counter() - started, args)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


# ---- the report ---------------------------------------------------------------------
def _cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of every (network, profile, method, budget)."""
    keys = ["network", "profile", "method", "budget"]
    return rows.groupby(keys, sort=False)["accuracy"].agg(["mean", "std"]).reset_index()


def defaults_table(rows: pd.DataFrame) -> str:
    """Each calibration as the default: points behind the best of the candidates, per
    network (mean over budgets), and its worst network."""
    cells = _cells(rows)
    lines = ["| method | calibration | mean over networks | worst network | "
             "worst (points) |", "|---|---|---:|---|---:|"]
    for method in ("eenet", "maxprob"):
        labels = {c: method if c == "select" else f"{method}:{c}" for c in CANDIDATES}
        wide = cells[cells["method"].isin(labels.values())].pivot_table(
            index=["network", "profile", "budget"], columns="method", values="mean")
        behind = wide.sub(wide.max(axis=1), axis=0).groupby(["network", "profile"]).mean()
        for cand, label in labels.items():
            col = 100 * behind[label]
            worst = col.idxmin()
            lines.append(f"| {method} | {cand}{' (default)' if cand == 'select' else ''} | "
                         f"{col.mean():+.2f} | {worst[0]} ({worst[1]}) | {col.min():+.2f} |")
    return "\n".join(lines) + "\n"


def headline_table(rows: pd.DataFrame) -> str:
    """The issue's checks per (network, profile)."""
    cells = _cells(rows)
    lines = ["| network | profile | cells eenet < best baseline - max(sd, 0.1) | worst "
             "margin (points) | ceiling - maxprob, tight half | eenet - maxprob, tight half "
             "| eenet chose search | check |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for (net, prof), g in cells.groupby(["network", "profile"], sort=False):
        wide = g.pivot_table(index="budget", columns="method", values="mean")
        sd = g[g["method"] == "eenet"].set_index("budget")["std"].fillna(0.0)
        best = wide[BASELINES].max(axis=1)
        margin = wide["eenet"] - (best - np.maximum(sd, 0.001))
        tight = wide.index[: len(wide) // 2]
        head = 100 * (wide.loc[tight, "ceiling"] - wide.loc[tight, "maxprob"]).mean()
        lead = 100 * (wide.loc[tight, "eenet"] - wide.loc[tight, "maxprob"]).mean()
        r = rows[(rows["network"] == net) & (rows["profile"] == prof)
                 & (rows["method"] == "eenet")]
        chose = (r["selected"] == "search").mean()
        ok = (margin >= -1e-9).all() and (head < 1 or lead >= 1)
        lines.append(f"| {net} | {prof} | {int((margin < -1e-9).sum())} of {len(wide)} | "
                     f"{100 * (wide['eenet'] - best).min():+.2f} | {head:+.2f} | {lead:+.2f} "
                     f"| {100 * chose:.0f}% | {'holds' if ok else 'FAILS'} |")
    return "\n".join(lines) + "\n"


def adherence_table(rows: pd.DataFrame) -> str:
    """Realized test cost / budget: the worst cell per (network, profile)."""
    pol = rows[~rows["method"].isin(["oracle", "ceiling"])].assign(
        ratio=lambda d: d["avg_cost"] / d["budget"])
    lines = ["| network | profile | worst cost / B (method) | worst eenet | cells over 1.01 B "
             "|", "|---|---|---|---:|---|"]
    for (net, prof), g in pol.groupby(["network", "profile"], sort=False):
        worst = g.loc[g["ratio"].idxmax()]
        over = g[g["ratio"] > 1.01]
        listed = ", ".join(f"{m} {n}" for m, n in over["method"].value_counts().items())
        lines.append(f"| {net} | {prof} | {worst['ratio']:.3f} ({worst['method']}) | "
                     f"{g[g['method'] == 'eenet']['ratio'].max():.3f} | {listed or 'none'} |")
    return "\n".join(lines) + "\n"


def network_tables(rows: pd.DataFrame) -> str:
    """Test accuracy (%) per budget and method, mean over seeds, per (network, profile)."""
    cells = _cells(rows)
    order = ["eenet", "eenet:geometric", "eenet:search", "eenet-paper",
             "eenet-paper:assignment", *FIXED[:-1], "ceiling", "oracle"]
    out = []
    for (net, prof), g in cells.groupby(["network", "profile"], sort=False):
        wide = 100 * g.pivot_table(index="budget", columns="method", values="mean")
        cols = [m for m in order if m in wide.columns]
        out += [f"#### {net}, costs in {prof}", "", "| budget | " + " | ".join(cols) + " |",
                "|---:|" + "---:|" * len(cols)]
        out += [f"| {b:.4g} | " + " | ".join(f"{wide.loc[b, m]:.2f}" for m in cols) + " |"
                for b in wide.index]
        out.append("")
    return "\n".join(out)


def report(rows: pd.DataFrame, notes: list[str], seconds: float,
           args: argparse.Namespace) -> str:
    nets = rows[["network", "profile", "n_exits", "n_classes", "costs"]].drop_duplicates()
    lines = [f"Suite run: {args.seeds} seed(s), {args.n_budgets} budgets, {args.jobs} "
             f"worker(s), {seconds / 60:.1f} min; eenet {eenet.__version__}.", ""]
    lines += [f"* {note}" for note in notes] + [""] if notes else []
    lines += ["| network | profile | exits | classes | costs |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.network} | {r.profile} | {r.n_exits} | {r.n_classes} | "
              f"{r.costs.replace(';', ' / ')} |" for r in nets.itertuples()]
    lines += ["", "### Calibration defaults by their worst network", "",
              "Test accuracy points behind the best of the three calibrations at each budget, "
              "mean over budgets and seeds:", "", defaults_table(rows),
              "### Headline checks", "", headline_table(rows),
              "### Budget adherence (every method, budget and seed)", "",
              adherence_table(rows), "### Test accuracy (%) per network", "",
              network_tables(rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
