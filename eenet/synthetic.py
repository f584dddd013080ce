"""Synthetic exit caches with realistic structure, for examples, tests and benchmarks."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from eenet.cache import ExitCache


def synthetic_cache(n_samples: int = 2000, n_exits: int = 4, n_classes: int = 10, seed: int = 0,
                    costs: Sequence[float] | None = None,
                    base_acc: Sequence[float] = (0.55, 0.7, 0.8, 0.85),
                    **kwargs: Any) -> ExitCache:
    """A cache whose exits get better with depth and whose confidence tracks correctness.

    Each sample has a latent difficulty d in [0, 1); exit k answers right when
    d (plus a little noise) is below the exit's skill, and its logits are
    sharper the farther d is from that skill, so confidence-based scores carry
    real but imperfect signal, as in trained networks.

    Args:
        n_samples, n_exits, n_classes: the cache's shape.
        seed: seed of the generator.
        costs: cumulative costs (default: increments 1 to 2, summing to 6 for 4 exits).
        base_acc: accuracy profile across depth, interpolated to ``n_exits``.
        **kwargs: other :class:`ExitCache` fields (``split``, ``sample_ids``, ...).

    Example:
        >>> c = synthetic_cache(100, n_exits=3, seed=0)
        >>> c.logits.shape
        (100, 3, 10)
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    acc = np.interp(np.linspace(0, 1, n_exits), np.linspace(0, 1, len(base_acc)), base_acc)
    difficulty = rng.random(n_samples)
    logits = rng.normal(0, 1.0, (n_samples, n_exits, n_classes)).astype(np.float32)
    rows = np.arange(n_samples)
    for k in range(n_exits):
        right = difficulty + rng.normal(0, 0.08, n_samples) < acc[k]
        wrong_class = (labels + rng.integers(1, n_classes, n_samples)) % n_classes
        target = np.where(right, labels, wrong_class)
        margin = 1.0 + 4.0 * np.abs(acc[k] - difficulty)
        logits[rows, k, target] += margin.astype(np.float32)
    if costs is None:
        costs = np.cumsum(np.linspace(1.0, 2.0, n_exits))
    kwargs.setdefault("model", "synthetic")
    kwargs.setdefault("dataset", "synthetic")
    return ExitCache(logits=logits, labels=labels, costs=np.asarray(costs, float), **kwargs)


def synthetic_example(n_samples: int = 4000, n_exits: int = 4, n_classes: int = 10,
                      seed: int = 0) -> tuple[ExitCache, ExitCache]:
    """A (validation, test) pair of synthetic caches drawn from one distribution."""
    return (synthetic_cache(n_samples, n_exits, n_classes, seed=2 * seed, split="val"),
            synthetic_cache(n_samples, n_exits, n_classes, seed=2 * seed + 1, split="test"))
