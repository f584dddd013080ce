"""How an exit assignment did: accuracy, realized cost, exit distribution, risk; and the oracle.

Exits are numbered from 0. An *assignment* ``exits`` is an int array
[n_samples] holding the exit each sample leaves at; ``correct`` is a bool
array [n_samples, n_exits] saying whether each exit's arg-max is right.

Risks compare each sample's answer with the full model's (the last exit), as
in Jazbec et al., "Fast yet Safe: Early-Exiting with Risk Control" (NeurIPS
2024): ``consistency`` (the early answer differs from the last exit's),
``gap`` (early wrong minus last wrong; negative where the early exit saved a
sample) and ``brier`` (the Brier score's difference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eenet._validation import BUDGET_RTOL, EenetError, check_budget, check_costs
from eenet.cache import ExitCache

__all__ = ["RISKS", "EvalResult", "evaluate_exits", "evaluate_oracle", "exit_accuracy",
           "oracle_exits", "risk_table"]

#: The risks against the full model that evaluation reports and calibration can bound.
RISKS = ("consistency", "gap", "brier")


def _check_exits(exits: np.ndarray, n_exits: int) -> np.ndarray:
    exits = np.asarray(exits)
    if exits.ndim != 1 or not np.issubdtype(exits.dtype, np.integer):
        raise EenetError(f"exits must be a 1-D integer array, got shape {exits.shape} dtype "
                         f"{exits.dtype}")
    if exits.size and (exits.min() < 0 or exits.max() >= n_exits):
        raise EenetError(f"exits must lie in [0, {n_exits}), got [{exits.min()}, {exits.max()}]")
    return exits


def exit_accuracy(correct: np.ndarray, exits: np.ndarray | None = None) -> np.ndarray:
    """Per-exit accuracy, float64 [n_exits].

    Without ``exits``: each exit's accuracy on every sample. With ``exits``:
    the accuracy among the samples that left there (NaN where none did).

    Example:
        >>> ok = np.array([[True, False], [False, True], [True, True]])
        >>> exit_accuracy(ok).round(3).tolist(), exit_accuracy(ok, np.array([0, 0, 1])).tolist()
        ([0.667, 0.667], [0.5, 1.0])
    """
    correct = np.asarray(correct, dtype=bool)
    if exits is None:
        return correct.mean(axis=0).astype(np.float64)
    exits = _check_exits(exits, correct.shape[1])
    counts = np.bincount(exits, minlength=correct.shape[1]).astype(np.float64)
    hits = np.bincount(exits, weights=correct[np.arange(exits.size), exits].astype(float),
                       minlength=correct.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def risk_table(cache: ExitCache) -> dict[str, np.ndarray]:
    """Per-sample risk of leaving at each exit instead of the last, float64 [n_samples, n_exits].

    ``consistency`` in {0, 1}, ``gap`` in {-1, 0, 1}, ``brier`` in [-2, 2];
    every risk is 0 at the last exit.
    """
    pred, correct = cache.predictions(), cache.correct()
    n, k_exits, c = cache.logits.shape
    brier = np.empty((n, k_exits))
    rows = max(1, (32 << 20) // (k_exits * c * 4))
    for start in range(0, n, rows):
        block = cache.logits[start:start + rows].astype(np.float32)
        block -= block.max(axis=2, keepdims=True)
        np.exp(block, out=block)
        block /= block.sum(axis=2, keepdims=True)  # probabilities
        hit = np.take_along_axis(block, cache.labels[start:start + rows, None, None], axis=2)
        # ||p - onehot(y)||^2 = sum_c p_c^2 - 2 p_y + 1
        brier[start:start + rows] = (block ** 2).sum(axis=2) - 2 * hit[..., 0] + 1
    return {"consistency": (pred != pred[:, -1:]).astype(np.float64),
            "gap": correct[:, -1:].astype(np.float64) - correct,
            "brier": brier - brier[:, -1:]}


@dataclass(frozen=True)
class EvalResult:
    """How an exit policy did on one cache.

    Attributes:
        method: the policy's method name.
        budget: the budget it was calibrated for (``None`` for a fixed exit).
        accuracy: mean correctness of the chosen exits.
        avg_cost: mean cumulative cost of the chosen exits, in ``cost_unit``.
        cost_unit: unit of the costs.
        exit_fractions: share of samples leaving at each exit; sums to 1.
        exit_accuracy: accuracy among the samples leaving at each exit (NaN
            where none did).
        exit_counts: samples leaving at each exit; sums to ``n_samples``.
        n_samples: samples evaluated.
        risks: mean risk against the full model, by kind (:data:`RISKS`).
    """

    method: str
    budget: float | None
    accuracy: float
    avg_cost: float
    cost_unit: str
    exit_fractions: tuple[float, ...]
    exit_accuracy: tuple[float, ...]
    exit_counts: tuple[int, ...]
    n_samples: int
    risks: dict[str, float] = field(default_factory=dict)

    @property
    def cost_ratio(self) -> float:
        """Realized cost over the budget (NaN without a budget)."""
        return self.avg_cost / self.budget if self.budget else math.nan

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-safe dict (NaN per-exit accuracies become ``None``)."""
        return {**self.to_row(), "cost_unit": self.cost_unit,
                "exit_fractions": list(self.exit_fractions),
                "exit_accuracy": [None if math.isnan(a) else a for a in self.exit_accuracy],
                "exit_counts": list(self.exit_counts),
                "cost_over_budget": None if self.budget is None else self.cost_ratio}

    def to_row(self) -> dict[str, Any]:
        """One CSV row: exit fractions joined with ``;``, one column per risk."""
        return {"method": self.method, "budget": self.budget, "accuracy": self.accuracy,
                "avg_cost": self.avg_cost,
                "exit_fractions": ";".join(f"{f:.4f}" for f in self.exit_fractions),
                "n_samples": self.n_samples,
                **{f"risk_{kind}": self.risks.get(kind, math.nan) for kind in RISKS}}

    def format_table(self) -> str:
        """A small human-readable report."""
        budget = "-" if self.budget is None else f"{self.budget:.4g} {self.cost_unit}"
        ratio = "" if self.budget is None else f"   ({100 * self.cost_ratio:.1f}% of budget)"
        lines = [f"method    {self.method}", f"budget    {budget}",
                 f"accuracy  {self.accuracy:.4f}   ({self.n_samples} samples)",
                 f"avg cost  {self.avg_cost:.4g} {self.cost_unit}{ratio}"]
        if self.risks:
            lines.append("risk vs the last exit  " + "  ".join(
                f"{kind} {value:.4f}" for kind, value in self.risks.items()))
        lines.append(f"{'exit':<6}{'fraction':>10}{'count':>8}{'accuracy':>10}")
        for k, (f, n, a) in enumerate(zip(self.exit_fractions, self.exit_counts,
                                          self.exit_accuracy)):
            lines.append(f"{k:<6}{f:>10.4f}{n:>8d}{'-' if math.isnan(a) else f'{a:.4f}':>10}")
        return "\n".join(lines)


def evaluate_exits(exits: np.ndarray, cache: ExitCache, *, method: str,
                   budget: float | None, costs: np.ndarray | None = None) -> EvalResult:
    """Summarise an assignment of the samples of ``cache`` to exits.

    Args:
        exits: [n_samples] int exit of each sample.
        cache: the cache the exits were chosen on.
        method, budget: recorded in the result.
        costs: [n_exits] costs to charge (default the cache's).

    Example:
        >>> from eenet.synthetic import synthetic_cache
        >>> c = synthetic_cache(10, n_exits=2)
        >>> r = evaluate_exits(np.zeros(10, dtype=int), c, method="demo", budget=None)
        >>> (r.avg_cost, r.exit_counts)
        (1.0, (10, 0))
    """
    correct = cache.correct()
    n_exits = correct.shape[1]
    exits = _check_exits(exits, n_exits)
    if exits.size != cache.n_samples:
        raise EenetError(f"exits has {exits.size} entries for {cache.n_samples} samples")
    costs = cache.costs if costs is None else np.asarray(costs, dtype=np.float64)
    rows = np.arange(exits.size)
    counts = np.bincount(exits, minlength=n_exits)
    risks = {kind: float(table[rows, exits].mean()) for kind, table in
             risk_table(cache).items()}
    return EvalResult(method=method, budget=None if budget is None else float(budget),
                      accuracy=float(correct[rows, exits].mean()),
                      avg_cost=float(costs[exits].mean()), cost_unit=cache.cost_unit,
                      exit_fractions=tuple(float(c) / exits.size for c in counts),
                      exit_accuracy=tuple(float(a) for a in exit_accuracy(correct, exits)),
                      exit_counts=tuple(int(c) for c in counts), n_samples=int(exits.size),
                      risks=risks)


def oracle_exits(correct: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Label-aware exits with the most correct answers at average cost <= budget.

    Samples no exit gets right leave at exit 0. Every other sample has a
    cheapest correct exit e_n; moving it there from exit 0 gains one correct
    answer for ``d_n = c_{e_n} - c_0`` extra cost. Samples are upgraded in
    order of increasing ``d_n`` while the total cost stays within
    ``n_samples * budget``. This is exact: any assignment's correct answers
    come from a set S of samples each at a correct exit, costing at least
    ``n c_0 + sum_S d_n``, and the largest S with ``sum_S d_n <= n (B - c_0)``
    is a prefix of the samples sorted by d_n (every item has the same value,
    the unit-value case of the knapsack problem).

    Args:
        correct: [n_samples, n_exits] bool, whether each exit is right.
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.

    Returns:
        int64 [n_samples], average cost at most the budget.

    Example:
        >>> ok = np.array([[False, True], [True, True], [False, False], [False, True]])
        >>> oracle_exits(ok, np.array([1.0, 3.0]), 1.5).tolist()
        [1, 0, 0, 0]
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[1] == 0:
        raise EenetError(f"correct must have shape [n_samples, n_exits], got {correct.shape}")
    n = correct.shape[0]
    costs = check_costs(costs, correct.shape[1])
    budget = check_budget(budget, costs)
    exits = np.zeros(n, dtype=np.int64)
    cheapest = np.argmax(correct, axis=1)  # first correct exit = the cheapest (costs ascend)
    extra = costs[cheapest] - costs[0]
    cand = np.flatnonzero(correct.any(axis=1))
    order = cand[np.argsort(extra[cand], kind="stable")]
    room = n * (budget - costs[0]) + n * budget * BUDGET_RTOL
    take = int(np.searchsorted(np.cumsum(extra[order]), room, side="right"))
    exits[order[:take]] = cheapest[order[:take]]
    return exits


def evaluate_oracle(cache: ExitCache, budget: float) -> EvalResult:
    """The label-aware upper bound at ``budget`` on ``cache`` (not a deployable policy)."""
    budget = check_budget(budget, cache.costs, unit=cache.cost_unit)
    return evaluate_exits(oracle_exits(cache.correct(), cache.costs, budget), cache,
                          method="oracle", budget=budget)
