"""PABEE's patience rule, landed on a budget by mixing two patience values by sample.

Zhou et al., "BERT Loses Patience: Fast and Robust Inference with Early Exit",
NeurIPS 2020: a sample leaves at the first exit whose answer has stayed the
same for ``t + 1`` consecutive exits; one patience ``t`` serves every exit.
On the patience score (``run_k / n_exits``, :class:`~eenet.scores.confidence.PatienceScorer`)
patience t is the uniform threshold ``(t + 0.5) / n_exits``.

The cost of patience t never decreases with t, so the rule takes the largest
t whose cost fits the target and, when the target lies between the costs of
t and t + 1, sends a share ``mix`` of the samples to patience t + 1 so the
expected cost equals the target (:class:`~eenet.rules.thresholds.Thresholds`
with ``alt``; which samples is a fixed function of their ids).
"""
from __future__ import annotations

import numpy as np

from eenet._validation import BUDGET_RTOL
from eenet.rules.thresholds import Thresholds, apply_thresholds, mix_draws

__all__ = ["patience_rule"]


def patience_rule(scores: np.ndarray, costs: np.ndarray, target: float, *,
                  seed: int = 0, sample_ids: np.ndarray | None = None) -> Thresholds:
    """The patience rule whose cost on ``scores`` is ``target`` (or the nearest below).

    The share of samples sent to patience t + 1 is the largest whose realized
    cost on these samples, with the samples chosen by id
    (:func:`~eenet.rules.thresholds.mix_draws`), still fits the target: on
    the calibration data the cost lands within one sample's difference of it.

    Args:
        scores: [n_samples, n_exits] patience scores (run length / n_exits).
        costs: [n_exits] cumulative exit costs.
        target: average cost to spend.
        seed: seed of the per-sample mixing draws.
        sample_ids: [n_samples] ids (default ``0..n-1``).

    Returns:
        :class:`Thresholds`; ``diagnostics`` holds ``patience``, ``mix`` and
        ``cost_by_patience`` (one per t = 0..n_exits-1).

    Example:
        >>> runs = np.array([[1, 2, 3], [1, 1, 2], [1, 1, 1], [1, 2, 3]]) / 3
        >>> rule = patience_rule(runs, np.array([1.0, 2.0, 3.0]), 2.0)
        >>> costs = np.array([1.0, 2.0, 3.0])
        >>> rule.diagnostics["patience"], float(costs[rule.exits(runs)].mean()) <= 2.0
        (0, True)
    """
    n, k_exits = scores.shape
    uniform = [np.full(k_exits, (t + 0.5) / k_exits) for t in range(k_exits)]
    per_sample = [costs[apply_thresholds(scores, th)] for th in uniform]  # [n] each
    by_t = [float(c.mean()) for c in per_sample]
    fitting = [t for t in range(k_exits) if by_t[t] <= target * (1 + BUDGET_RTOL)]
    t = max(fitting) if fitting else 0
    mix = 0.0
    if t < k_exits - 1 and by_t[t + 1] > by_t[t]:
        ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        draws = mix_draws(ids, seed)
        order = np.argsort(draws, kind="stable")
        # patience t + 1 never leaves earlier than t, so the cost grows with every sample moved
        spent = per_sample[t].sum() + np.cumsum((per_sample[t + 1] - per_sample[t])[order])
        moved = int(np.searchsorted(spent, target * n * (1 + BUDGET_RTOL), side="right"))
        mix = 1.0 if moved >= n else float(draws[order[moved]])
    return Thresholds(uniform[t], alt=uniform[min(t + 1, k_exits - 1)], mix=mix,
                      mix_seed=seed, diagnostics={"patience": t, "mix": mix,
                                                  "cost_by_patience": by_t})

