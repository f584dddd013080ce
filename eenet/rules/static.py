"""The static rule: everyone leaves at one exit, the most accurate single exit that fits."""
from __future__ import annotations

import numpy as np

from eenet._validation import BUDGET_RTOL
from eenet.rules.thresholds import Thresholds

__all__ = ["static_rule"]


def static_rule(correct: np.ndarray, costs: np.ndarray, target: float) -> Thresholds:
    """Everyone at the most accurate exit (on the calibration data) whose cost fits ``target``.

    Ties go to the cheaper exit. Unlike "the deepest exit that fits", this
    never gets worse as the budget grows, also on networks whose later exits
    are less accurate than earlier ones ("overthinking").

    Args:
        correct: [n_samples, n_exits] bool.
        costs: [n_exits] cumulative exit costs.
        target: average cost to spend.

    Returns:
        :class:`Thresholds`: ``+inf`` before the exit, ``-inf`` from it on.

    Example:
        >>> ok = np.array([[True, True, False], [False, True, True]])
        >>> static_rule(ok, np.array([1.0, 1.0, 3.0]), 1.0).values.tolist()
        [inf, -inf, -inf]
    """
    accuracy = np.asarray(correct).mean(axis=0)
    fitting = np.flatnonzero(costs <= target * (1 + BUDGET_RTOL))
    fitting = fitting if fitting.size else np.array([0])
    k = int(fitting[np.argmax(accuracy[fitting])])  # argmax takes the first (cheaper) of ties
    values = np.full(costs.size, np.inf)
    values[k:] = -np.inf
    return Thresholds(values, diagnostics={"exit": k})
