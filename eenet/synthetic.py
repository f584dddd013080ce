"""Synthetic exit caches with realistic structure, for examples, tests and benchmarks.

Everything here is synthetic: the caches are drawn from a stated generative
model, not produced by a network. The knobs cover what decides which exit
policy and which calibration wins on a real network: how strong each exit is
(``base_acc``), how well its confidence tracks its correctness (``signal``,
``noise``), how many classes there are (``n_classes``) and what each exit
costs relative to the others (``costs``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from eenet._validation import EenetError
from eenet.cache import ExitCache


def _per_exit(name: str, value: float | Sequence[float], n_exits: int) -> np.ndarray:
    """A scalar, or a profile across depth interpolated to ``n_exits`` values."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise EenetError(f"{name} must be a finite number or a sequence of them, got {value!r}")
    if arr.size == 1:
        return np.full(n_exits, float(arr[0]))
    return np.interp(np.linspace(0, 1, n_exits), np.linspace(0, 1, arr.size), arr)


def synthetic_cache(n_samples: int = 2000, n_exits: int = 4, n_classes: int = 10, seed: int = 0,
                    costs: Sequence[float] | None = None,
                    base_acc: Sequence[float] = (0.55, 0.7, 0.8, 0.85),
                    signal: float | Sequence[float] = 4.0,
                    noise: float | Sequence[float] = 0.08,
                    **kwargs: Any) -> ExitCache:
    """A cache whose exits get better with depth and whose confidence tracks correctness.

    Each sample has a latent difficulty d in [0, 1); exit k answers right when
    d plus Gaussian noise (sd ``noise[k]``) is below the exit's skill
    ``base_acc[k]``, and the logit of its answer is raised by
    ``1 + signal[k] * |base_acc[k] - d|``, so the answer is surer the farther
    the sample is from the exit's skill: confidence-based scores carry real
    but imperfect signal, as in trained networks. A difficulty shared by all
    exits makes a sample that is easy early easy later too.

    Args:
        n_samples, n_exits, n_classes: the cache's shape.
        seed: seed of the generator.
        costs: cumulative costs (default: increments 1 to 2, summing to 6 for 4 exits).
        base_acc: exit strength, the accuracy profile across depth, interpolated
            to ``n_exits`` (weak early exits: low first values).
        signal: how sharply confidence follows the distance to the exit's skill,
            one value or a profile across depth (0: confidence says nothing).
        noise: sd of the noise that decouples correctness from difficulty at each
            exit, one value or a profile across depth (larger: less predictable
            exits, rougher scores).
        **kwargs: other :class:`ExitCache` fields (``split``, ``sample_ids``, ...).

    Example:
        >>> c = synthetic_cache(100, n_exits=3, seed=0)
        >>> c.logits.shape
        (100, 3, 10)
    """
    if n_classes < 2 or n_exits < 1 or n_samples < 1:
        raise EenetError(f"synthetic_cache needs n_samples >= 1, n_exits >= 1 and n_classes "
                         f">= 2, got {n_samples}, {n_exits}, {n_classes}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    acc = _per_exit("base_acc", base_acc, n_exits)
    sharp, jitter = _per_exit("signal", signal, n_exits), _per_exit("noise", noise, n_exits)
    difficulty = rng.random(n_samples)
    logits = rng.normal(0, 1.0, (n_samples, n_exits, n_classes)).astype(np.float32)
    rows = np.arange(n_samples)
    for k in range(n_exits):
        right = difficulty + rng.normal(0, 1.0, n_samples) * jitter[k] < acc[k]
        wrong_class = (labels + rng.integers(1, n_classes, n_samples)) % n_classes
        target = np.where(right, labels, wrong_class)
        margin = 1.0 + sharp[k] * np.abs(acc[k] - difficulty)
        logits[rows, k, target] += margin.astype(np.float32)
    if costs is None:
        costs = np.cumsum(np.linspace(1.0, 2.0, n_exits))
    kwargs.setdefault("model", "synthetic")
    kwargs.setdefault("dataset", "synthetic")
    return ExitCache(logits=logits, labels=labels, costs=np.asarray(costs, float), **kwargs)


def synthetic_example(n_samples: int = 4000, n_exits: int = 4, n_classes: int = 10,
                      seed: int = 0, **knobs: Any) -> tuple[ExitCache, ExitCache]:
    """A (validation, test) pair of synthetic caches drawn from one distribution.

    ``knobs`` are :func:`synthetic_cache`'s (``costs``, ``base_acc``, ``signal``,
    ``noise``, ``model``), shared by both splits.
    """
    return (synthetic_cache(n_samples, n_exits, n_classes, seed=2 * seed, split="val", **knobs),
            synthetic_cache(n_samples, n_exits, n_classes, seed=2 * seed + 1, split="test",
                            **knobs))
