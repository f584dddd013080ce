"""Budgets x methods: fit on validation, evaluate on test, tabulate and plot.

One row per (method, budget, seed) in the column order of :data:`COLUMNS`;
the single exits are added as rows ``exit0`` .. ``exit{K-1}`` at their own
cost so a plot can show them as points.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from eenet._validation import EenetError, check_budget
from eenet.cache import ExitCache
from eenet.exit_policy import LEARNED, ExitPolicy, evaluate_oracle, resolve_method

log = logging.getLogger(__name__)

COLUMNS = ["method", "budget", "accuracy", "avg_cost", "val_accuracy", "val_avg_cost",
           "exit_fractions", "n_samples", "seed"]
DEFAULT_METHODS = ["eenet", "maxprob", "entropy", "patience", "static", "oracle"]


# ---------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------
def default_budgets(cache: ExitCache, n_budgets: int = 12) -> np.ndarray:
    """``n_budgets`` budgets between the first and the last exit's cost.

    The points are spaced evenly in arc length along the single-exit
    accuracy-vs-cost curve, with both axes scaled to [0, 1], so they crowd
    where accuracy still climbs quickly (the bend of the curve) and thin out
    on the plateau. The first exit's cost itself is left out (every policy
    degenerates to "everyone leaves first" there).

    Returns:
        float64 [n_budgets], increasing, in the cache's cost unit.
    """
    if n_budgets < 1:
        raise EenetError(f"n_budgets must be at least 1, got {n_budgets}")
    costs = cache.costs
    if costs[-1] <= costs[0]:
        raise EenetError("every exit costs the same; a budget sweep needs exits of "
                         "different cost")
    acc = np.maximum.accumulate(cache.correct().mean(axis=0))  # best accuracy affordable
    x = (costs - costs[0]) / (costs[-1] - costs[0])
    span = acc[-1] - acc[0]
    y = (acc - acc[0]) / span if span > 0 else np.zeros_like(acc)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    targets = arc[-1] * np.arange(1, n_budgets + 1) / n_budgets
    budgets = np.interp(targets, arc, costs)
    return np.unique(np.round(budgets, 12))


# ---------------------------------------------------------------------------
# one (method, budget, seed) cell
# ---------------------------------------------------------------------------
def _row(method: str, budget: float, seed: int, test_res, val_res) -> dict[str, Any]:
    return {
        "method": method,
        "budget": float(budget),
        "accuracy": test_res.accuracy,
        "avg_cost": test_res.avg_cost,
        "val_accuracy": val_res.accuracy,
        "val_avg_cost": val_res.avg_cost,
        "exit_fractions": ";".join(f"{f:.4f}" for f in test_res.exit_fractions),
        "n_samples": test_res.n_samples,
        "seed": int(seed),
    }


def parse_method_spec(spec: str) -> tuple[str, str | None, str]:
    """``"name"`` or ``"name:calibration"`` -> (canonical name, calibration, row label).

    Example:
        >>> parse_method_spec("msdnet:search")
        ('maxprob', 'search', 'maxprob:search')
    """
    name, _, calib = spec.strip().partition(":")
    try:
        name = "oracle" if name.strip().lower() == "oracle" else resolve_method(name)
    except EenetError as err:
        raise EenetError(f"{err}, or oracle (the label-aware upper bound)") from None
    calib = calib.strip() or None
    if calib is not None:
        from eenet.exit_policy import _MODES_FOR
        from eenet._validation import check_choice

        if name == "oracle":
            raise EenetError("the oracle has no calibration; write it as 'oracle'")
        check_choice(f"calibration for {name}", calib, _MODES_FOR[name])
    return name, calib, name if calib is None else f"{name}:{calib}"


def fit_cell(val: ExitCache, test: ExitCache, method: str, budget: float, seed: int,
             calibration: str | None = None, hparams: dict[str, Any] | None = None,
             label: str | None = None) -> dict[str, Any]:
    """Fit ``method`` on ``val`` at ``budget`` and score it on both splits; one CSV row."""
    if method == "oracle":
        return _row("oracle", budget, seed, evaluate_oracle(test, budget),
                    evaluate_oracle(val, budget))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sweep reports per-cell outcomes in the table
        policy = ExitPolicy(method, calibration=calibration, seed=seed,
                            **(hparams or {}) if method in LEARNED else {})
        policy.fit(val, budget)
        return _row(label or method, budget, seed, policy.evaluate(test),
                    policy.evaluate(val))


def _calibration_for(method: str, calibration: str | None) -> str | None:
    """A sweep-wide calibration applies where the method supports it."""
    if calibration is None or method == "oracle":
        return None
    from eenet.exit_policy import _MODES_FOR

    return calibration if calibration in _MODES_FOR[method] else None


_WORKER_CACHES: tuple[ExitCache, ExitCache] | None = None


def _init_worker(val: ExitCache, test: ExitCache) -> None:
    global _WORKER_CACHES
    import torch

    torch.set_num_threads(1)  # one process per core; nested threads only contend
    _WORKER_CACHES = (val, test)


def _worker(task: tuple) -> dict[str, Any]:
    assert _WORKER_CACHES is not None
    return fit_cell(*_WORKER_CACHES, *task)


def run_sweep(val: ExitCache, test: ExitCache, *, budgets: Sequence[float] | None = None,
              n_budgets: int = 12, methods: Sequence[str] | None = None,
              calibration: str | None = None, seeds: Sequence[int] = (0,),
              jobs: int | None = None, hparams: dict[str, Any] | None = None,
              verbose: bool = True) -> pd.DataFrame:
    """Fit every method at every budget on ``val`` and evaluate it on ``test``.

    Args:
        val: the cache policies are fitted and calibrated on.
        test: held-out samples of the same network.
        budgets: explicit budgets; default :func:`default_budgets` of ``val``.
        n_budgets: how many default budgets.
        methods: method names (aliases allowed), ``"oracle"``, or
            ``"name:calibration"`` for a method with a given calibration (for
            example ``"maxprob:search"``); rows are labelled as given.
        calibration: one calibration mode for every method that supports it
            (default: each method's own).
        seeds: seeds to repeat each cell with.
        jobs: worker processes for the fits (default: all cores; 1 = in-process).
        hparams: EENet hyperparameters.
        verbose: progress bar on stderr.

    Returns:
        A DataFrame with :data:`COLUMNS`, one row per (method, budget, seed),
        plus the single exits as rows ``exit0`` ...

    Example:
        >>> from eenet import synthetic_example
        >>> val, test = synthetic_example(seed=0)
        >>> table = run_sweep(val, test, budgets=[3.0, 5.0], methods=["maxprob", "oracle"],
        ...                   jobs=1, verbose=False)
        >>> sorted(set(table["method"]))[:2]
        ['exit0', 'exit1']
    """
    if val.n_exits != test.n_exits or val.cost_unit != test.cost_unit:
        raise EenetError(f"validation and test caches differ ({val.n_exits} vs {test.n_exits} "
                         f"exits, {val.cost_unit!r} vs {test.cost_unit!r}); use two splits of "
                         f"the same network")
    if val.n_exits < 2:
        raise EenetError("a budget sweep needs a network with at least two exits")
    specs: dict[str, tuple[str, str | None]] = {}
    for m in methods or DEFAULT_METHODS:
        name, calib, label = parse_method_spec(m)
        specs.setdefault(label, (name, calib or _calibration_for(name, calibration)))
    budgets = default_budgets(val, n_budgets) if budgets is None else np.asarray(
        [check_budget(b, val.costs, unit=val.cost_unit) for b in budgets], dtype=float)
    tasks = [(m, float(b), int(s), calib, hparams, label)
             for label, (m, calib) in specs.items() for b in budgets for s in seeds]
    # learned scores and searched thresholds are the slow cells: start them first so the
    # workers finish together
    tasks.sort(key=lambda t: (t[0] not in LEARNED, t[3] != "search"))
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    if jobs > 1 and len(tasks) >= 2 * jobs:
        # fork shares the caches without pickling and, unlike spawn, does not re-run the
        # caller's script; workers use one torch thread, which keeps fork safe with OpenMP
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                 initializer=_init_worker, initargs=(val, test)) as pool:
            rows = list(tqdm(pool.map(_worker, tasks), total=len(tasks), desc="sweep",
                             disable=not verbose, file=None))
    else:
        rows = [fit_cell(val, test, *t) for t in tqdm(tasks, desc="sweep",
                                                       disable=not verbose)]
    val_correct, test_correct = val.correct(), test.correct()
    for k in range(val.n_exits):
        fr = ";".join("1.0000" if j == k else "0.0000" for j in range(val.n_exits))
        rows.append({"method": f"exit{k}", "budget": float(test.costs[k]),
                     "accuracy": float(test_correct[:, k].mean()),
                     "avg_cost": float(test.costs[k]),
                     "val_accuracy": float(val_correct[:, k].mean()),
                     "val_avg_cost": float(val.costs[k]), "exit_fractions": fr,
                     "n_samples": test.n_samples, "seed": int(seeds[0])})
    return pd.DataFrame(rows, columns=COLUMNS)


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------
def _policies(table: pd.DataFrame) -> pd.DataFrame:
    return table[~table["method"].str.match(r"^exit\d+$")]


def format_summary(table: pd.DataFrame, *, cost_unit: str = "") -> str:
    """Test accuracy (%) per budget and method, mean over seeds; ``*`` marks the best policy
    (every one tied for best).

    The oracle is shown but never marked: it reads the labels.
    """
    pol = _policies(table)
    if pol.empty:
        return "(no policies in the table)"
    mean = pol.groupby(["budget", "method"], sort=True)["accuracy"].mean().unstack("method")
    order = [m for m in DEFAULT_METHODS if m in mean.columns] + \
        sorted(set(mean.columns) - set(DEFAULT_METHODS))
    mean = mean[order]
    ratio = pol.assign(r=pol["avg_cost"] / pol["budget"]).groupby("method")["r"].max()
    width = max(9, *(len(m) + 2 for m in order))
    unit = f" ({cost_unit})" if cost_unit else ""
    lines = [f"test accuracy (%) by budget{unit}; * = best policy at that budget (ties all marked)",
             f"{'budget':>10}" + "".join(f"{m:>{width}}" for m in order)]
    for budget, row in mean.iterrows():
        deployable = row.drop(labels=["oracle"], errors="ignore").dropna()
        top = deployable.max() if not deployable.empty else np.nan
        best = set(deployable.index[deployable >= top - 1e-12])  # every method tied at the top
        cells = []
        for m in order:
            v = row[m]
            text = "-" if pd.isna(v) else f"{100 * v:.2f}" + ("*" if m in best else " ")
            cells.append(f"{text:>{width}}")
        lines.append(f"{budget:>10.4g}" + "".join(cells))
    lines.append(f"{'max cost/B':>10}" + "".join(
        f"{(f'{ratio[m]:.3f} ' if m in ratio and np.isfinite(ratio[m]) else '- '):>{width}}"
        for m in order))
    return "\n".join(lines)


_STYLE = {
    "eenet": dict(color="#d62728", marker="o", lw=2.2, zorder=5),
    "eenet-paper": dict(color="#ff7f0e", marker="D", lw=1.2),
    "maxprob": dict(color="#1f77b4", marker="s"),
    "entropy": dict(color="#2ca02c", marker="^"),
    "patience": dict(color="#9467bd", marker="v"),
    "static": dict(color="#7f7f7f", marker="x", ls=":"),
    "oracle": dict(color="black", ls="--", marker=None, lw=1.2),
}
_LABELS = {"eenet": "EENet", "eenet-paper": "EENet, paper recipe", "maxprob": "MSDNet max-prob", "entropy": "BranchyNet entropy",
           "patience": "PABEE patience", "static": "static (one exit)",
           "oracle": "oracle (uses labels)"}


def plot_sweep(table: pd.DataFrame, path: str | os.PathLike, cache: ExitCache | None = None,
               *, title: str = "", cost_unit: str | None = None) -> Path:
    """Accuracy vs realized average cost on the test split, one line per method.

    The oracle is dashed and drawn at its budget (its realized cost is far
    lower); the single exits are labelled points. Written with
    matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = cost_unit or (cache.cost_unit if cache is not None else "")
    pol = _policies(table)
    mean = pol.groupby(["method", "budget"], sort=True)[["accuracy", "avg_cost"]].mean()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    methods = [m for m in DEFAULT_METHODS if m in mean.index.get_level_values(0)] + sorted(
        set(mean.index.get_level_values(0)) - set(DEFAULT_METHODS))
    for m in methods:
        d = mean.loc[m].reset_index()
        # the oracle spends far less than its budget (it knows the cheapest right exit), so
        # it is drawn at its budget: the best accuracy any policy could have there
        x = "budget" if m == "oracle" else "avg_cost"
        d = d.sort_values(x)
        style = dict(_STYLE.get(m, dict(marker="o")))
        style.setdefault("lw", 1.5)
        label = _LABELS.get(m, m) + (", at its budget" if m == "oracle" else "")
        ax.plot(d[x], 100 * d["accuracy"], label=label, ms=4, **style)
    singles = table[table["method"].str.match(r"^exit\d+$")]
    if not singles.empty:
        ax.scatter(singles["avg_cost"], 100 * singles["accuracy"], s=60, facecolor="white",
                   edgecolor="black", zorder=6, label="single exits")
        for _, r in singles.iterrows():
            ax.annotate(r["method"], (r["avg_cost"], 100 * r["accuracy"]),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel(f"average cost per sample ({unit})" if unit else "average cost per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------
# the bundled end-to-end example
# ---------------------------------------------------------------------------
QUICKSTART_MODEL = "eenet.examples.models:fashion_mnist_cnn4"


def _cached_split(split: str, cache_dir: Path, *, data_dir: Path | None, force: bool,
                  device: str, seed: int, verbose: bool, echo: Callable[[str], Any],
                  like: ExitCache | None = None) -> ExitCache:
    """Read or build the bundled model's cache of ``split``.

    With ``like``, the split reuses that cache's measured cost vectors:
    per-exit latency is a property of the network and the machine, not of
    the split, and timing it twice on a busy machine gives two different
    answers for the same network.
    """
    from eenet._validation import CacheError
    from eenet.cache import read_cache
    from eenet.ingest.model import cache_model

    path = cache_dir / f"fashion_mnist_cnn4_{split}.h5"
    if path.exists() and not force:
        try:
            cache = read_cache(path)
            if like is None or np.allclose(cache.costs, like.costs):
                echo(f"using {path} ({cache.n_samples} samples)")
                return cache
            echo(f"rebuilding {path}: its costs differ from the validation cache's")
        except CacheError as err:
            echo(f"rebuilding {path}: {err}")
    echo(f"caching the {split} split of the bundled model to {path} ...")
    if like is None:
        cache_model(QUICKSTART_MODEL, f"fashion-mnist:{split}", path, data_dir=data_dir,
                    device=device, costs="measured", verbose=verbose, seed=seed)
    else:
        cache_model(QUICKSTART_MODEL, f"fashion-mnist:{split}", path, data_dir=data_dir,
                    device=device, costs=[float(c) for c in like.costs],
                    cost_unit_given=like.cost_unit, verbose=verbose, seed=seed)
    return read_cache(path)


def run_quickstart(*, cache_dir: Path = Path("cache"), results_dir: Path = Path("results"),
                   data_dir: Path | None = None, n_budgets: int = 10,
                   methods: Sequence[str] | None = None, force: bool = False, seed: int = 0,
                   device: str = "auto", verbose: bool = True,
                   echo: Callable[[str], Any] = print) -> str:
    """Cache the bundled Fashion-MNIST model's val/test splits, sweep, write CSV and PNG.

    Returns:
        The summary table (also written next to the CSV as ``quickstart.txt``).
    """
    cache_dir, results_dir = Path(cache_dir), Path(results_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(data_dir=data_dir, force=force, device=device, seed=seed, verbose=verbose,
              echo=echo)
    val = _cached_split("val", cache_dir, **kw)
    test = _cached_split("test", cache_dir, like=val, **kw)
    echo(f"sweeping {n_budgets} budgets x {len(methods or DEFAULT_METHODS)} methods "
         f"(fit on val, evaluate on test) ...")
    table = run_sweep(val, test, n_budgets=n_budgets, methods=methods, seeds=[seed],
                      verbose=verbose)
    csv = results_dir / "quickstart.csv"
    table.to_csv(csv, index=False)
    png = plot_sweep(table, results_dir / "quickstart.png", val,
                     title="Fashion-MNIST, 4-exit CNN: accuracy vs latency")
    summary = format_summary(table, cost_unit=val.cost_unit)
    (results_dir / "quickstart.txt").write_text(summary + "\n")
    echo(f"wrote {csv} and {png}")
    return summary


def budget_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per budget: EENet's accuracy minus the best baseline's, and the share of the
    best-baseline-to-oracle gap EENet closes (means over seeds)."""
    pol = _policies(table)
    mean = pol.groupby(["budget", "method"])["accuracy"].mean().unstack("method")
    if "eenet" not in mean or "oracle" not in mean:
        raise EenetError("budget_gaps needs eenet and oracle rows")
    baselines = [m for m in ("maxprob", "entropy", "patience", "static") if m in mean]
    best = mean[baselines].max(axis=1)
    gap = mean["oracle"] - best
    out = pd.DataFrame({
        "budget": mean.index,
        "eenet": mean["eenet"].values,
        "best_baseline": best.values,
        "best_baseline_name": mean[baselines].idxmax(axis=1).values,
        "oracle": mean["oracle"].values,
        "gain": (mean["eenet"] - best).values,
        "gap_closed": np.where(gap > 1e-12, (mean["eenet"] - best) / gap.where(gap > 1e-12),
                               math.nan),
    })
    return out.reset_index(drop=True)
