"""Shared fixtures: small synthetic exit caches with known structure; no downloads, CPU only."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from eenet.cache import ExitCache

FASHION_MNIST_DIR = Path(os.environ.get("EENET_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))
HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


def pytest_collection_modifyitems(config, items):
    skip_data = pytest.mark.skip(reason="needs dataset-fashion-mnist "
                                        "(apt-get install dataset-fashion-mnist)")
    try:
        import torch

        have_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        have_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "dataset" in item.keywords and not HAVE_FASHION_MNIST:
            item.add_marker(skip_data)
        if "gpu" in item.keywords and not have_cuda:
            item.add_marker(skip_gpu)


def synthetic_cache(n_samples: int = 2000, n_exits: int = 4, n_classes: int = 10,
                    seed: int = 0, costs=None, base_acc=(0.55, 0.7, 0.8, 0.85),
                    **kwargs) -> ExitCache:
    """A cache whose exits get better with depth and whose confidence tracks correctness.

    Each sample has a latent difficulty; exit k is right when the difficulty is
    below its skill, and its logits are sharper the easier the sample, so
    confidence-based scores carry real signal (as in trained networks).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    acc = np.interp(np.linspace(0, 1, n_exits), np.linspace(0, 1, len(base_acc)), base_acc)
    difficulty = rng.random(n_samples)
    logits = rng.normal(0, 1.0, (n_samples, n_exits, n_classes)).astype(np.float32)
    for k in range(n_exits):
        noise = rng.normal(0, 0.08, n_samples)
        right = difficulty + noise < acc[k]
        wrong_class = (labels + rng.integers(1, n_classes, n_samples)) % n_classes
        target = np.where(right, labels, wrong_class)
        margin = 1.0 + 4.0 * np.abs(acc[k] - difficulty)
        logits[np.arange(n_samples), k, target] += margin.astype(np.float32)
    if costs is None:
        costs = np.cumsum(np.linspace(1.0, 2.0, n_exits))
    return ExitCache(logits=logits, labels=labels, costs=np.asarray(costs, float),
                     model="synthetic", dataset="synthetic", **kwargs)


@pytest.fixture
def small_cache() -> ExitCache:
    return synthetic_cache(n_samples=600, seed=1)


@pytest.fixture
def val_test_caches() -> tuple[ExitCache, ExitCache]:
    return (synthetic_cache(n_samples=3000, seed=11, split="val"),
            synthetic_cache(n_samples=3000, seed=12, split="test"))
