"""``auto`` against every single method on the networks of the suite, each paying its own cost.

For every network and cost profile of ``benchmarks/suite.py`` (the same caches, budgets and
seeds): ``eenet sweep`` with ``auto`` and the deployable methods it chooses from, each
method charged its own cost per exit the way ``--overhead auto`` charges it (timed inside
the network or around the stand-in when the costs are measured latencies; nothing when they
were given, as for the synthetic caches and the FLOP profiles here). The check of the
"auto" issue: at every (network, budget), ``auto`` >= the best single method - max(the
larger seed sd of the two, 0.15 point).

Usage:
    python benchmarks/auto_suite.py --seeds 3 --out benchmarks/results/auto_suite.csv
    python benchmarks/auto_suite.py --networks cnn4 --n-budgets 4 --seeds 1   # a subset
    python benchmarks/auto_suite.py --networks cnn6 --previous benchmarks/results/auto_suite.csv \
        --out benchmarks/results/auto_suite.csv   # run cnn6, keep the file's other networks
    python benchmarks/auto_suite.py --merge a.csv b.csv --out benchmarks/results/auto_suite.csv
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import eenet
from eenet import run_sweep
from eenet.auto import AUTO_METHODS
from eenet.runtime.overhead import choose_overhead
from eenet.sweep import default_budgets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import add_cache_options  # noqa: E402
from suite import NETWORKS, profiles  # noqa: E402

MARGIN = 0.0015  # 0.15 point


def run_network(name: str, args: argparse.Namespace) -> pd.DataFrame | None:
    caches = NETWORKS[name].load(args)
    if caches is None:
        print(f"{name}: skipped ({NETWORKS[name].note})", flush=True)
        return None
    tables = []
    for profile, (val, test) in profiles(*caches).items():
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = run_sweep(val, test, budgets=default_budgets(val, args.n_budgets),
                              methods=["auto", *AUTO_METHODS],
                              seeds=range(args.seed, args.seed + args.seeds), jobs=args.jobs,
                              overhead=choose_overhead("auto", val), verbose=False)
        table = table[~table["method"].str.match(r"^exit\d+$")]
        tables.append(table.assign(network=name, profile=profile,
                                   eenet_version=eenet.__version__))
        print(f"{name} ({profile}): {time.perf_counter() - started:.0f} s", flush=True)
    return pd.concat(tables, ignore_index=True)


def check_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (network, profile, budget): auto's mean, the best single method's, the margin."""
    cells = rows.groupby(["network", "profile", "budget", "method"])["accuracy"].agg(
        ["mean", "std"]).reset_index()
    out = []
    for (network, profile, budget), group in cells.groupby(["network", "profile", "budget"]):
        by = group.set_index("method")
        singles = by.drop(index="auto").dropna(subset=["mean"])
        if singles.empty:
            continue
        best = singles["mean"].idxmax()
        auto, sd = by.loc["auto", "mean"], np.nanmax([by.loc["auto", "std"],
                                                      singles.loc[best, "std"], 0.0])
        margin = max(sd, MARGIN)
        out.append({"network": network, "profile": profile, "budget": budget,
                    "auto": auto, "best": best, "best_accuracy": singles.loc[best, "mean"],
                    "gap_points": 100 * (auto - singles.loc[best, "mean"]),
                    "margin_points": 100 * margin,
                    "holds": bool(np.isnan(auto) or auto >= singles.loc[best, "mean"] - margin)})
    return pd.DataFrame(out)


def report(checks: pd.DataFrame, seconds: float, args: argparse.Namespace) -> str:
    title = (f"merged from {len(args.merge)} runs" if args.merge else
             f"{args.seeds} seeds, {args.n_budgets} budgets per profile, {seconds / 60:.0f} min")
    lines = [f"# auto against the best single method ({title})", "",
             "Command: `python benchmarks/auto_suite.py " + " ".join(sys.argv[1:]) + "`", "",
             "Each method pays its own cost (`--overhead auto`). gap = auto - best single "
             "method (points); margin = max(seed sd, 0.15 point); `-` where auto cannot "
             "serve the budget.", "",
             "| network | profile | budget | auto (%) | best single | best (%) | gap | "
             "margin | holds |", "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in checks.itertuples():
        auto = "-" if np.isnan(r.auto) else f"{100 * r.auto:.2f}"
        lines.append(f"| {r.network} | {r.profile} | {r.budget:.4g} | {auto} | {r.best} | "
                     f"{100 * r.best_accuracy:.2f} | {r.gap_points:+.2f} | "
                     f"{r.margin_points:.2f} | {'yes' if r.holds else 'NO'} |")
    worst = checks.loc[checks["gap_points"].idxmin()] if len(checks) else None
    lines += ["", f"Holds in {int(checks['holds'].sum())} of {len(checks)} cells."]
    if worst is not None:
        lines.append(f"Worst gap: {worst['gap_points']:+.2f} points ({worst['network']}, "
                     f"{worst['profile']}, budget {worst['budget']:.4g}, best "
                     f"{worst['best']}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-budgets", type=int, default=10)
    parser.add_argument("--n-synthetic", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/auto_suite.csv"))
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier run's CSV: its rows of the networks not run now are "
                             "kept in the output and the report")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="run nothing: merge these runs' CSVs (a network's rows from the "
                             "last file holding it) into --out and its report")
    add_cache_options(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        kept, seen = [], set()
        for path in reversed(args.merge):  # the last file holding a network wins
            run = pd.read_csv(path)
            kept.append(run[~run["network"].isin(seen)])
            seen |= set(run["network"])
        rows = pd.concat(kept[::-1], ignore_index=True)
        rows.to_csv(args.out, index=False)
        text = report(check_table(rows), 0.0, args)
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return
    names = [n.strip() for n in args.networks.split(",")]
    tables = []
    if args.previous is not None:
        kept = pd.read_csv(args.previous)
        kept = kept[~kept["network"].isin(names)]
        if len(kept):
            print(f"kept from {args.previous}: {', '.join(kept['network'].unique())}")
            tables.append(kept)
    for name in names:
        table = run_network(name, args)
        if table is None:
            continue
        tables.append(table)
        # written after every network, so a long run reports what it has finished
        rows = pd.concat(tables, ignore_index=True)
        rows.to_csv(args.out, index=False)
        text = report(check_table(rows), time.perf_counter() - started, args)
        args.out.with_suffix(".md").write_text(text)
    if not tables:
        print("no network available")
        return
    rows = pd.concat(tables, ignore_index=True)
    rows.to_csv(args.out, index=False)
    text = report(check_table(rows), time.perf_counter() - started, args)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
