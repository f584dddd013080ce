"""Score an exit assignment on a cache: accuracy, realized cost, exit distribution."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from eenet.metrics import (accuracy, average_cost, exit_accuracy, exit_counts,
                           exit_fractions)


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

    @property
    def cost_ratio(self) -> float:
        """Realized cost over the budget (NaN without a budget)."""
        return self.avg_cost / self.budget if self.budget else math.nan

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-safe dict (NaN per-exit accuracies become ``None``)."""
        return {
            "method": self.method,
            "budget": self.budget,
            "accuracy": self.accuracy,
            "avg_cost": self.avg_cost,
            "cost_unit": self.cost_unit,
            "exit_fractions": list(self.exit_fractions),
            "exit_accuracy": [None if math.isnan(a) else a for a in self.exit_accuracy],
            "exit_counts": list(self.exit_counts),
            "n_samples": self.n_samples,
            "cost_over_budget": None if self.budget is None else self.cost_ratio,
        }

    def to_row(self) -> dict[str, Any]:
        """One CSV row: exit fractions joined with ``;``."""
        return {
            "method": self.method,
            "budget": self.budget,
            "accuracy": self.accuracy,
            "avg_cost": self.avg_cost,
            "exit_fractions": ";".join(f"{f:.4f}" for f in self.exit_fractions),
            "n_samples": self.n_samples,
        }

    def format_table(self) -> str:
        """A small human-readable report."""
        budget = "-" if self.budget is None else f"{self.budget:.4g} {self.cost_unit}"
        lines = [
            f"method    {self.method}",
            f"budget    {budget}",
            f"accuracy  {self.accuracy:.4f}   ({self.n_samples} samples)",
            f"avg cost  {self.avg_cost:.4g} {self.cost_unit}"
            + ("" if self.budget is None else f"   ({100 * self.cost_ratio:.1f}% of budget)"),
            f"{'exit':<6}{'fraction':>10}{'count':>8}{'accuracy':>10}",
        ]
        for k, (f, n, a) in enumerate(zip(self.exit_fractions, self.exit_counts,
                                          self.exit_accuracy)):
            acc = "-" if math.isnan(a) else f"{a:.4f}"
            lines.append(f"{k:<6}{f:>10.4f}{n:>8d}{acc:>10}")
        return "\n".join(lines)


def evaluate_exits(exits: np.ndarray, correct: np.ndarray, costs: np.ndarray, *, method: str,
                   budget: float | None, cost_unit: str) -> EvalResult:
    """Summarise an assignment.

    Args:
        exits: [n_samples] int exit of each sample.
        correct: [n_samples, n_exits] bool correctness of every exit.
        costs: [n_exits] cumulative costs.
        method, budget, cost_unit: recorded in the result.

    Example:
        >>> import numpy as np
        >>> r = evaluate_exits(np.array([0, 1]), np.array([[True, True], [False, True]]),
        ...                    np.array([1.0, 3.0]), method="demo", budget=2.0, cost_unit="ms")
        >>> (r.accuracy, r.avg_cost, r.exit_counts)
        (1.0, 2.0, (1, 1))
    """
    n_exits = correct.shape[1]
    return EvalResult(
        method=method,
        budget=None if budget is None else float(budget),
        accuracy=accuracy(correct, exits),
        avg_cost=average_cost(exits, costs),
        cost_unit=cost_unit,
        exit_fractions=tuple(float(f) for f in exit_fractions(exits, n_exits)),
        exit_accuracy=tuple(float(a) for a in exit_accuracy(correct, exits)),
        exit_counts=tuple(int(c) for c in exit_counts(exits, n_exits)),
        n_samples=int(exits.size),
    )
