"""The budget guard: calibrate to a cost a little below the budget, so unseen data fits it.

Thresholds fitted on one split spend a little more on another: their score
quantiles are noisy, and a rule chosen to stop just under the budget tends to
be one whose calibration cost happens to be low. The guard measures that
optimism with the bootstrap estimate of the optimism of an in-sample estimate
(Efron, "Estimating the Error Rate of a Prediction Rule", JASA 1983; Efron &
Tibshirani, "An Introduction to the Bootstrap", 1993, Ch. 17): a resample
plays the calibration split and the whole split plays the population, so
``cost(population) - cost(resample)`` of the rule chosen on the resample
estimates how much more the real rule spends on new data. The overshoot on
``n_eval`` unseen samples is bounded at the one-sided normal quantile
``level``::

    margin = mean(optimism) + z_level * sqrt(var(optimism) + var(cost) / n_eval)

where ``var(cost)`` is the per-sample cost variance under the rule. The guard
promises nothing exact (the confidence bounds of :mod:`eenet.rules.certify`
do); it keeps the realized cost near the budget for the cost of a percent or
two of it.

Two estimators share that formula:

- :func:`refit_margin` refits a rule on every resample (the published rules,
  which are fitted for one budget);
- :func:`selection_margins` re-chooses among a fixed family's candidates on
  every resample, for every cost of a ladder at once (the search family,
  whose margins must not depend on the budget so that a larger budget never
  buys a worse rule).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np

from eenet._validation import EenetError
from eenet.rules.thresholds import Thresholds

__all__ = ["check_guard_args", "refit_margin", "selection_margins"]

#: Above this many samples, selection margins are estimated on a subsample and scaled.
_SUBSAMPLE = 20_000


def check_guard_args(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 2:
        raise EenetError(f"n_boot must be an integer of at least 2, got {n_boot}")
    if not 0.5 <= level < 1:
        raise EenetError(f"level must lie in [0.5, 1), got {level}")


def _combine(optimism: np.ndarray, eval_var: np.ndarray, n_eval: int, level: float
             ) -> tuple[np.ndarray, dict[str, Any]]:
    """margin = mean + z * sqrt(var(optimism) + mean(eval var) / n_eval), per column."""
    import scipy.stats  # imported on use: it costs a third of a second at start-up

    z = float(scipy.stats.norm.ppf(level))
    sd_fit = optimism.std(axis=0, ddof=1) if optimism.shape[0] > 1 else np.zeros(
        optimism.shape[1:])
    sd_eval = np.sqrt(eval_var.mean(axis=0) / max(n_eval, 1))
    margin = np.maximum(0.0, optimism.mean(axis=0) + z * np.hypot(sd_fit, sd_eval))
    return margin, {"optimism_mean": optimism.mean(axis=0), "optimism_sd": sd_fit,
                    "eval_sd": sd_eval, "z": z, "n_eval": n_eval, "level": level}


def refit_margin(fit: Callable[[np.ndarray, np.ndarray, np.ndarray], Thresholds],
                 scores: np.ndarray, correct: np.ndarray, costs: np.ndarray,
                 sample_ids: np.ndarray, *, seed: int = 0, n_boot: int = 20,
                 level: float = 0.9, n_eval: int | None = None) -> tuple[float, dict[str, Any]]:
    """The guard's margin for a rule refitted on every resample.

    Args:
        fit: ``fit(scores, correct, sample_ids) -> Thresholds`` for the budget
            at hand, applied to a resample.
        scores: [n_samples, n_exits] calibration scores.
        correct: [n_samples, n_exits] bool.
        costs: [n_exits] cumulative exit costs.
        sample_ids: [n_samples] ids (they decide who uses a mixed rule's ``alt``).
        seed: seed of the resampling.
        n_boot: resamples (one refit each), through :func:`scipy.stats.bootstrap`.
        level: one-sided probability that the unseen cost stays within the budget
            under the normal approximation.
        n_eval: size of the unseen split the budget applies to (default: n_samples).

    Returns:
        ``(margin, diagnostics)``; the margin is in the unit of ``costs``.
    """
    check_guard_args(n_boot, level)
    n = scores.shape[0]
    if n < 2:
        warnings.warn(f"{n} calibration sample(s) are too few for the budget guard; "
                      f"calibrating against the budget itself", stacklevel=3)
        return 0.0, {"n_boot": 0, "level": level}
    eval_var: list[float] = []

    def optimism(idx: np.ndarray) -> float:
        idx = np.asarray(idx, dtype=np.int64)
        rule = fit(scores[idx], correct[idx], sample_ids[idx])
        full = costs[rule.exits(scores, sample_ids)]
        eval_var.append(float(full.var()))
        return float(full.mean() - costs[rule.exits(scores[idx], sample_ids[idx])].mean())

    import scipy.stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scipy.stats.bootstrap((np.arange(n),), optimism, n_resamples=n_boot,
                                    vectorized=False, method="percentile",
                                    rng=np.random.default_rng(seed))
    opt = np.asarray(res.bootstrap_distribution, dtype=np.float64)[:, None]
    margin, info = _combine(opt, np.asarray(eval_var[-n_boot:])[:, None],
                            n if n_eval is None else int(n_eval), level)
    info = {key: float(np.ravel(v)[0]) if isinstance(v, np.ndarray) else v
            for key, v in info.items()}
    info["n_boot"] = n_boot
    return float(margin[0]), info


def selection_margins(step_exits: np.ndarray, correct: np.ndarray, costs: np.ndarray,
                      taus: np.ndarray, *, seed: int = 0, n_boot: int = 20,
                      level: float = 0.9, n_eval: int | None = None
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """The guard's margins for a fixed family, at every cost of a ladder.

    In resample b each target cost ``tau`` selects the most accurate candidate
    whose resample cost fits ``tau``; its optimism is its whole-split cost
    minus its resample cost. Resamples are multinomial weights, so every
    candidate is scored on all of them with two matrix products. Above
    20,000 samples the estimate comes from a random subsample of that size,
    scaled by ``sqrt(20,000 / n_samples)`` (both the selection optimism and
    the sampling noise shrink like one over the square root of the size).

    Args:
        step_exits: [n_steps, n_samples] the exit each candidate sends each sample to.
        correct: [n_samples, n_exits] bool.
        costs: [n_exits] cumulative exit costs.
        taus: [n_taus] target costs.
        seed, n_boot, level, n_eval: as in :func:`refit_margin`.

    Returns:
        ``(margins [n_taus], diagnostics)``.
    """
    check_guard_args(n_boot, level)
    n_steps, n = step_exits.shape
    n_eval = n if n_eval is None else int(n_eval)
    rng = np.random.default_rng(seed)
    scale = 1.0
    if n > _SUBSAMPLE:
        keep = np.sort(rng.choice(n, _SUBSAMPLE, replace=False))
        step_exits, correct = step_exits[:, keep], correct[keep]
        scale, n_eval = math.sqrt(_SUBSAMPLE / n), _SUBSAMPLE
        n = _SUBSAMPLE
    rows = np.arange(n)
    cost = costs[step_exits].astype(np.float32)  # [n_steps, n]
    right = correct[rows, step_exits].astype(np.float32)  # [n_steps, n]
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                        for _ in range(n_boot)]).astype(np.float32)  # [n_boot, n]
    cost_b = (weights @ cost.T) / n  # [n_boot, n_steps]
    right_b = (weights @ right.T) / n
    cost_full = cost.mean(axis=1, dtype=np.float64)
    cost_var = cost.var(axis=1, dtype=np.float64)
    optimism = np.empty((n_boot, taus.size))
    eval_var = np.empty((n_boot, taus.size))
    for b in range(n_boot):
        for i, tau in enumerate(taus):
            fitting = np.flatnonzero(cost_b[b] <= tau * (1 + 1e-9))
            if fitting.size == 0:
                optimism[b, i], eval_var[b, i] = 0.0, 0.0
                continue
            best = fitting[np.lexsort((cost_b[b, fitting], -right_b[b, fitting]))[0]]
            optimism[b, i] = cost_full[best] - cost_b[b, best]
            eval_var[b, i] = cost_var[best]
    margins, info = _combine(optimism, eval_var, n_eval, level)
    info.update(n_boot=n_boot, subsample_scale=scale)
    return margins * scale, info
