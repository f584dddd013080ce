"""Does the network still cost what its cache recorded? The drift of measured exit costs.

A policy is fitted to a budget on the cache's per-exit costs, measured when the
cache was made. The same machine an hour later (another load, another clock,
another thread placement) may run the network slower, and every policy fitted
on the old costs then overspends. :func:`measure_drift` re-times the exits
exactly as ``eenet cache`` timed them (:func:`eenet.ingest.costs.measure_costs`,
batch 1, one thread on CPU, medians) and compares them with the cached costs;
``eenet bench`` reports it and ``eenet fit --overhead model`` warns with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from torch import nn

__all__ = ["DRIFT_LIMIT", "CostDrift", "measure_drift"]

#: relative drift above which bench and fit say so
DRIFT_LIMIT = 0.05


@dataclass(frozen=True)
class CostDrift:
    """Re-timed exit costs against the cached ones (ms, cumulative, batch 1).

    Attributes:
        exits: the exits compared (always including the last: the full model).
        cached_ms: [len(exits)] the cache's costs of those exits.
        measured_ms: [len(exits)] the same exits re-timed now.
    """

    exits: tuple[int, ...]
    cached_ms: np.ndarray
    measured_ms: np.ndarray

    @property
    def relative(self) -> np.ndarray:
        """``measured / cached - 1`` per exit compared: +0.08 is 8% slower now."""
        return self.measured_ms / self.cached_ms - 1.0

    @property
    def full_model(self) -> float:
        """The full model's relative drift (the last exit's)."""
        return float(self.relative[-1])

    @property
    def worst(self) -> float:
        """The largest relative drift in either direction, signed."""
        rel = self.relative
        return float(rel[int(np.argmax(np.abs(rel)))])

    def exceeds(self, limit: float = DRIFT_LIMIT) -> bool:
        return abs(self.worst) > limit

    def describe(self) -> str:
        """One line: the full model's drift and each exit's."""
        per_exit = ", ".join(f"exit {k} {100 * r:+.1f}%" for k, r in
                             zip(self.exits, self.relative))
        return (f"full model {self.measured_ms[-1]:.4g} ms now vs {self.cached_ms[-1]:.4g} ms "
                f"cached ({100 * self.full_model:+.1f}%); {per_exit}")

    def advice(self, limit: float = DRIFT_LIMIT) -> str:
        """The warning when the drift exceeds ``limit``, else ``""``."""
        if not self.exceeds(limit):
            return ""
        return (f"the network's exit costs drifted from the cache's by up to "
                f"{100 * self.worst:+.1f}%, over {100 * limit:.0f}% ({self.describe()}): "
                f"a policy fitted on the cached "
                f"costs spends that much more (or less) than its budget; re-cache on this "
                f"machine under serving conditions (eenet cache) and fit again")


def measure_drift(model: nn.Module, example_input: Any, cached_ms: Sequence[float], *,
                  device: str = "cpu", exits: Sequence[int] | None = None,
                  min_run_time: float = 0.2) -> CostDrift:
    """Re-time ``model``'s exits as the cache did and compare with ``cached_ms``.

    Args:
        model: the multi-exit network the cache was made from.
        example_input: one input batch [1, ...] on ``device``.
        cached_ms: [n_exits] the cache's cumulative costs in ms (batch 1).
        device: where to time.
        exits: the exits to compare (default: all); the last is always added.
        min_run_time: seconds of timing (``measure_costs``).

    Returns:
        A :class:`CostDrift`.
    """
    from eenet.ingest.costs import measure_costs

    cached = np.asarray(cached_ms, dtype=np.float64)
    chosen = sorted(set(range(cached.size) if exits is None else exits) | {cached.size - 1})
    report = measure_costs(model, example_input, device=device, batch_size=1,
                           repeats=100, min_run_time=min_run_time)
    now = np.asarray(report.latency_ms_batch1, dtype=np.float64)
    return CostDrift(tuple(chosen), cached[chosen], now[chosen])
