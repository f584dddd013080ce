"""Budgets x methods: fit on validation, evaluate on test, one tidy row per cell.

One row per (method, budget, seed) in the column order of :data:`COLUMNS`;
the single exits are added as rows ``exit0`` .. ``exit{K-1}`` at their own
cost so a plot can show them as points. Tables and plots are in
:mod:`eenet.report`.

A fixed scorer (max probability, entropy, patience, static) is scored and
calibrated once per seed and then answers every budget; only learned scorers
are trained per budget, in worker processes.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from eenet._validation import EenetError, check_budget, check_choice
from eenet.cache import ExitCache
from eenet.evaluate import EvalResult, evaluate_exits, evaluate_oracle
from eenet.policy import ExitPolicy, network_reference
from eenet.rules.certified import Guarantee
from eenet.scores import METHODS, get_method, score_cache

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "DEFAULT_METHODS", "MethodSpec", "default_budgets", "parse_method_spec",
           "run_sweep"]

COLUMNS = ["method", "budget", "accuracy", "avg_cost", "val_accuracy", "val_avg_cost",
           "exit_fractions", "n_samples", "seed", "risk_consistency", "risk_gap", "risk_brier",
           "epsilon"]
#: The method name that picks, per budget, the candidate most accurate out of fold.
AUTO = "auto"
DEFAULT_METHODS = ["eenet", "maxprob", "entropy", "patience", "static", "oracle"]


def default_budgets(cache: ExitCache, n_budgets: int = 12) -> np.ndarray:
    """``n_budgets`` budgets between the first and the last exit's cost.

    The points are spaced evenly in arc length along the single-exit
    accuracy-vs-cost curve, with both axes scaled to [0, 1], so they crowd
    where accuracy still climbs quickly and thin out on the plateau. The
    first exit's cost itself is left out (every policy degenerates there).

    Returns:
        float64 [n_budgets] (fewer when points coincide), increasing.
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
    return np.unique(np.round(np.interp(targets, arc, costs), 12))


@dataclass(frozen=True)
class MethodSpec:
    """One column of a sweep: a method, a calibration (``None``: its default), a row label."""

    name: str
    calibration: str | None
    label: str


def parse_method_spec(spec: str, calibration: str | None = None) -> MethodSpec:
    """``"name"`` or ``"name:calibration"`` (aliases allowed) -> :class:`MethodSpec`.

    A sweep-wide ``calibration`` applies where the method accepts it.

    Example:
        >>> parse_method_spec("msdnet:search")
        MethodSpec(name='maxprob', calibration='search', label='maxprob:search')
    """
    name, _, calib = spec.strip().partition(":")
    if name.strip().lower() == AUTO:
        if calib.strip():
            raise EenetError("auto uses each candidate's default calibration; write it as "
                             "'auto'")
        return MethodSpec(AUTO, None, AUTO)
    method = get_method(name)
    calib = calib.strip() or None
    if calib is not None:
        if not method.calibrations:
            raise EenetError(f"{method.name} has no calibration; write it as {method.name!r}")
        check_choice(f"calibration for {method.name}", calib, method.calibrations)
        return MethodSpec(method.name, calib, f"{method.name}:{calib}")
    if calibration is not None and calibration in method.calibrations:
        return MethodSpec(method.name, calibration, method.name)
    return MethodSpec(method.name, None, method.name)


def _row(label: str, budget: float, seed: int, test: EvalResult, val_accuracy: float,
         val_cost: float) -> dict[str, Any]:
    return {**test.to_row(), "method": label, "budget": float(budget),
            "val_accuracy": float(val_accuracy), "val_avg_cost": float(val_cost),
            "seed": int(seed)}


def _unservable(label: str, budget: float, seed: int, test: ExitCache) -> dict[str, Any]:
    """A row for a budget below the policy's cheapest exit (its own cost included)."""
    return {**{c: math.nan for c in COLUMNS}, "method": label, "budget": float(budget),
            "exit_fractions": "", "n_samples": test.n_samples, "seed": int(seed)}


def _fixed_rows(val: ExitCache, test: ExitCache, spec: MethodSpec, budgets: np.ndarray,
                seed: int, overhead: np.ndarray | None) -> list[dict[str, Any]]:
    """A scorer that learns nothing: score both caches once, calibrate once, every budget."""
    policy = ExitPolicy(spec.name, calibration=spec.calibration, seed=seed)
    policy.fit(val, float(budgets[-1]), overhead=overhead)
    calibrator = policy.calibrator(val)  # kept from the fit
    cheapest, test_costs = float(policy.costs_for(val)[0]), policy.costs_for(test)
    test_scores = score_cache(policy.scorer, test)
    ids = np.arange(test.n_samples) if test.sample_ids is None else test.sample_ids
    rows = []
    for b in budgets:
        if b < cheapest:
            rows.append(_unservable(spec.label, b, seed, test))
            continue
        rule = calibrator.rule(float(b))
        result = evaluate_exits(rule.exits(test_scores, ids), test, method=spec.label,
                                budget=float(b), costs=test_costs)
        rows.append(_row(spec.label, b, seed, result, rule.val_accuracy, rule.val_cost))
    return rows


def _learned_row(val: ExitCache, test: ExitCache, spec: MethodSpec, budget: float, seed: int,
                 hparams: dict[str, Any], overhead: np.ndarray | None) -> dict[str, Any]:
    if overhead is not None and budget < val.costs[0] + overhead[0]:
        return _unservable(spec.label, budget, seed, test)
    policy = ExitPolicy(spec.name, calibration=spec.calibration, seed=seed, **hparams)
    policy.fit(val, budget, overhead=overhead)
    result = evaluate_exits(policy.exits(test), test, method=spec.label, budget=budget,
                            costs=policy.costs_for(test))
    return _row(spec.label, budget, seed, result, policy.val_accuracy, policy.val_cost)


def _auto_row(val: ExitCache, test: ExitCache, budget: float, seed: int,
              hparams: dict[str, Any], own: dict[str, np.ndarray | None] | None
              ) -> dict[str, Any]:
    """``auto`` at one budget: the candidate most accurate on folds of ``val``, on ``test``."""
    from eenet.auto import fit_auto

    measured = None if own is None else (lambda policy, cache: own[policy.method.name])
    device = hparams.pop("device", "cpu")
    try:
        policy = fit_auto(val, budget, overhead=measured, seed=seed, device=device, **hparams)
    except EenetError:  # no candidate serves the budget once its own cost is counted
        return _unservable(AUTO, budget, seed, test)
    result = evaluate_exits(policy.exits(test), test, method=AUTO, budget=budget,
                            costs=policy.costs_for(test))
    return _row(AUTO, budget, seed, result, policy.val_accuracy, policy.val_cost)


def _oracle_rows(val: ExitCache, test: ExitCache, budgets: np.ndarray, seed: int
                 ) -> list[dict[str, Any]]:
    rows = []
    for b in budgets:
        on_val = evaluate_oracle(val, float(b))
        rows.append(_row("oracle", b, seed, evaluate_oracle(test, float(b)), on_val.accuracy,
                         on_val.avg_cost))
    return rows


def _risk_row(val: ExitCache, test: ExitCache, spec: MethodSpec, guarantee: Guarantee,
              seed: int, hparams: dict[str, Any], overhead: np.ndarray | None
              ) -> dict[str, Any]:
    """A risk-controlled policy (no budget): fitted and certified on ``val``, run on ``test``."""
    policy = ExitPolicy(spec.name, calibration=spec.calibration, seed=seed, **hparams)
    policy.fit(val, None, overhead=overhead, guarantee=guarantee)
    result = evaluate_exits(policy.exits(test), test, method=spec.label, budget=None,
                            costs=policy.costs_for(test))
    row = _row(spec.label, math.nan, seed, result, policy.val_accuracy, policy.val_cost)
    row["epsilon"] = float(guarantee.epsilon)  # type: ignore[arg-type]
    return row


def _task(val: ExitCache, test: ExitCache, task: tuple) -> list[dict[str, Any]]:
    kind, spec, budgets, seed, hparams, overhead = task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table reports every cell's outcome
        if kind == "risk":
            return [_risk_row(val, test, spec, budgets, seed, hparams or {}, overhead)]
        if kind == "oracle":
            return _oracle_rows(val, test, budgets, seed)
        if kind == "fixed":
            return _fixed_rows(val, test, spec, budgets, seed, overhead)
        if kind == AUTO:
            return [_auto_row(val, test, float(budgets[0]), seed, dict(hparams), overhead)]
        return [_learned_row(val, test, spec, float(budgets[0]), seed, hparams, overhead)]


def _measure_overhead(val: ExitCache, spec: MethodSpec, budget: float,
                      measure: Callable[[ExitPolicy, ExitCache], Any]) -> np.ndarray | None:
    """The policy's own cost for ``spec``, measured once for the whole sweep.

    It depends on the scorer's architecture, not on its weights, so a learned
    scorer is trained for one epoch just to have weights to time.
    """
    quick = {"epochs": 1} if METHODS[spec.name].learned else {}
    policy = ExitPolicy(spec.name, calibration=spec.calibration, **quick)
    policy.scorer.fit(val, val.costs, budget)
    policy.reference = network_reference(val)  # what a runtime reads of a fitted policy
    measured = measure(policy, val)
    return None if measured is None else np.asarray(measured, dtype=np.float64)


def _auto_tasks(val: ExitCache, budgets: np.ndarray, seeds: Sequence[int],
                hparams: dict[str, Any] | None, device: str,
                overhead: Callable[[str], np.ndarray | None] | None, risk_sweep: bool
                ) -> list[tuple]:
    """One ``auto`` task per (budget, seed); ``overhead(name)`` is a candidate's own cost,
    measured once for the sweep."""
    from eenet.auto import AUTO_METHODS

    if risk_sweep:
        raise EenetError("auto compares accuracies at a budget and cannot certify a risk; "
                         "leave it out of a risk sweep (--epsilons)")
    own = None
    if overhead is not None:
        own = {m: overhead(m) for m in AUTO_METHODS}
    hp = {**(hparams or {}), "device": device}
    return [(AUTO, MethodSpec(AUTO, None, AUTO), np.array([b]), int(seed), hp, own)
            for seed in seeds for b in budgets]


_WORKER_CACHES: tuple[ExitCache, ExitCache] | None = None


def _init_worker(val: ExitCache, test: ExitCache) -> None:
    global _WORKER_CACHES
    import torch

    torch.set_num_threads(1)  # one process per core; nested threads only contend
    _WORKER_CACHES = (val, test)


def _worker(task: tuple) -> list[dict[str, Any]]:
    assert _WORKER_CACHES is not None
    return _task(*_WORKER_CACHES, task)


def _run(val: ExitCache, test: ExitCache, tasks: list[tuple], jobs: int | None,
         verbose: bool) -> list[dict[str, Any]]:
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    if jobs > 1 and len(tasks) >= 2 * jobs:
        # fork shares the caches without pickling and, unlike spawn, does not re-run the
        # caller's script; workers use one torch thread, which keeps fork safe with OpenMP
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(
                method), initializer=_init_worker, initargs=(val, test)) as pool:
            done = list(tqdm(pool.map(_worker, tasks), total=len(tasks), desc="sweep",
                             disable=not verbose))
    else:
        done = [_task(val, test, t) for t in tqdm(tasks, desc="sweep", disable=not verbose)]
    return [row for rows in done for row in rows]


def run_sweep(val: ExitCache, test: ExitCache, *, budgets: Sequence[float] | None = None,
              n_budgets: int = 12, methods: Sequence[str] | None = None,
              calibration: str | None = None, seeds: Sequence[int] = (0,),
              jobs: int | None = None, hparams: dict[str, Any] | None = None,
              device: str = "cpu",
              overhead: Callable[[ExitPolicy, ExitCache], Any] | None = None,
              risk: Guarantee | None = None, epsilons: Sequence[float] = (),
              verbose: bool = True) -> pd.DataFrame:
    """Fit every method at every budget on ``val`` and evaluate it on ``test``.

    Args:
        val: the cache policies are fitted and calibrated on.
        test: held-out samples of the same network.
        budgets: explicit budgets (duplicates dropped); default
            :func:`default_budgets` of ``val``.
        n_budgets: how many default budgets.
        methods: names or aliases from :data:`eenet.scores.METHODS`
            (``"oracle"`` included), or ``"name:calibration"`` (for example
            ``"maxprob:search"``); rows are labelled as given.
        calibration: one calibration for every method that accepts it.
        seeds: seeds to repeat each cell with.
        jobs: worker processes (default: all cores; 1 = in-process).
        hparams: hyperparameters of the learned scorers.
        device: where learned scorers train (``"auto"``: CUDA when present).
        overhead: ``f(policy, cache)`` measuring a policy's own cost per exit
            (:func:`eenet.runtime.overhead.policy_overhead`): measured once per
            method before the fits, then charged to it at every budget.
            ``None`` charges the network's costs alone.
        risk, epsilons: with both, a risk-control sweep instead of a budget sweep:
            every method is fitted with ``risk`` (a :class:`~eenet.rules.certified.Guarantee`
            naming the risk, the bound and delta) at each level in ``epsilons``;
            rows carry ``epsilon`` and no budget.
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
    if val.n_exits != test.n_exits or val.cost_unit != test.cost_unit \
            or val.n_classes != test.n_classes:
        raise EenetError(f"validation and test caches differ ({val.n_exits} vs {test.n_exits} "
                         f"exits, {val.n_classes} vs {test.n_classes} classes, "
                         f"{val.cost_unit!r} vs {test.cost_unit!r}); use two splits of the "
                         f"same network")
    if val.n_exits < 2:
        raise EenetError("a budget sweep needs a network with at least two exits")
    _warn_if_costs_differ(val, test)
    specs = list({s.label: s for s in (parse_method_spec(m, calibration)
                                       for m in methods or DEFAULT_METHODS)}.values())
    budgets = default_budgets(val, n_budgets) if budgets is None else np.unique(np.asarray(
        [check_budget(b, val.costs, unit=val.cost_unit) for b in budgets], dtype=float))
    tasks: list[tuple] = []
    measured: dict[str, np.ndarray | None] = {}

    def own_cost(name: str) -> np.ndarray | None:
        """A method's own cost, timed once per sweep: auto's candidates pay what the
        method's own column pays."""
        if name not in measured:
            measured[name] = _measure_overhead(val, MethodSpec(name, None, name),
                                               float(budgets[0]), overhead)
        return measured[name]

    for spec in specs:
        if spec.name == AUTO:
            tasks += _auto_tasks(val, budgets, seeds, hparams, device,
                                 None if overhead is None else own_cost,
                                 risk is not None and bool(epsilons))
            continue
        own = None
        if overhead is not None and spec.name != "oracle":
            own = own_cost(spec.name)
        learned_hp = {**(hparams or {}), "device": device} if METHODS[spec.name].learned \
            else {}
        for seed in seeds:
            if risk is not None and epsilons:
                if spec.name != "oracle":
                    tasks += [("risk", spec, dataclasses.replace(risk, epsilon=float(e)),
                               int(seed), learned_hp, own) for e in epsilons]
                continue
            if spec.name == "oracle":
                tasks.append(("oracle", spec, budgets, int(seed), None, None))
            elif METHODS[spec.name].learned:
                tasks += [("learned", spec, np.array([b]), int(seed), learned_hp, own)
                          for b in budgets]
            else:
                tasks.append(("fixed", spec, budgets, int(seed), None, own))
    tasks.sort(key=lambda t: t[0] not in ("learned", "risk", AUTO))  # slow cells first
    rows = _run(val, test, tasks, jobs, verbose)
    val_correct = val.correct()
    for k in range(val.n_exits):
        single = evaluate_exits(np.full(test.n_samples, k), test, method=f"exit{k}",
                                budget=float(test.costs[k]))
        rows.append(_row(f"exit{k}", test.costs[k], seeds[0], single,
                         float(val_correct[:, k].mean()), float(val.costs[k])))
    import pandas as pd  # imported on use: half a second at start-up

    return pd.DataFrame(rows, columns=COLUMNS)


def _warn_if_costs_differ(val: ExitCache, test: ExitCache, rtol: float = 0.05) -> None:
    worst = float(np.max(np.abs(test.costs - val.costs) / np.maximum(val.costs, 1e-300)))
    if worst > rtol:
        warnings.warn(f"the test cache's costs differ from the validation cache's by up to "
                      f"{100 * worst:.0f}%, so realized costs are not comparable with the "
                      f"budgets; cache the test split with `--costs-from VAL.h5`", stacklevel=3)
