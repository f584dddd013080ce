"""Accuracy, cost and exit histograms of an exit assignment (pure functions).

Exits are numbered from 0. An *assignment* ``exits`` is an int array
[n_samples] holding the exit each sample leaves at; ``correct`` is a bool
array [n_samples, n_exits] saying whether each exit's arg-max is right.
"""
from __future__ import annotations

import numpy as np

from eenet._validation import EenetError


def _check_exits(exits: np.ndarray, n_exits: int) -> np.ndarray:
    exits = np.asarray(exits)
    if exits.ndim != 1 or not np.issubdtype(exits.dtype, np.integer):
        raise EenetError(f"exits must be a 1-D integer array, got shape {exits.shape} "
                         f"dtype {exits.dtype}")
    if exits.size and (exits.min() < 0 or exits.max() >= n_exits):
        raise EenetError(f"exits must lie in [0, {n_exits}), got [{exits.min()}, {exits.max()}]")
    return exits


def assigned_correct(correct: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """Correctness of each sample at its assigned exit, bool [n_samples]."""
    exits = _check_exits(exits, correct.shape[1])
    return correct[np.arange(exits.size), exits]


def accuracy(correct: np.ndarray, exits: np.ndarray) -> float:
    """Mean correctness of the chosen exits.

    Example:
        >>> import numpy as np
        >>> accuracy(np.array([[True, False], [False, True]]), np.array([0, 0]))
        0.5
    """
    return float(assigned_correct(correct, exits).mean())


def average_cost(exits: np.ndarray, costs: np.ndarray) -> float:
    """Mean cumulative cost of the chosen exits."""
    costs = np.asarray(costs, dtype=np.float64)
    exits = _check_exits(exits, costs.size)
    return float(costs[exits].mean())


def exit_counts(exits: np.ndarray, n_exits: int) -> np.ndarray:
    """Number of samples leaving at each exit, int64 [n_exits]; sums to n_samples."""
    exits = _check_exits(exits, n_exits)
    return np.bincount(exits, minlength=n_exits).astype(np.int64)


def exit_fractions(exits: np.ndarray, n_exits: int) -> np.ndarray:
    """Share of samples leaving at each exit, float64 [n_exits]; sums to 1."""
    counts = exit_counts(exits, n_exits)
    return counts / max(1, counts.sum())


def exit_accuracy(correct: np.ndarray, exits: np.ndarray | None = None) -> np.ndarray:
    """Per-exit accuracy, float64 [n_exits].

    Without ``exits``: each exit's accuracy on every sample. With ``exits``:
    the accuracy among the samples that left at that exit (NaN where none did).
    """
    correct = np.asarray(correct, dtype=bool)
    if exits is None:
        return correct.mean(axis=0).astype(np.float64)
    exits = _check_exits(exits, correct.shape[1])
    counts = np.bincount(exits, minlength=correct.shape[1]).astype(np.float64)
    hits = np.bincount(exits, weights=assigned_correct(correct, exits).astype(np.float64),
                       minlength=correct.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def oracle_accuracy(correct: np.ndarray) -> float:
    """Share of samples that some exit gets right (the unconstrained oracle)."""
    return float(np.asarray(correct, dtype=bool).any(axis=1).mean())
