"""Shared fixtures: small synthetic exit caches with known structure; no downloads, CPU only."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from eenet.cache import ExitCache
from eenet.synthetic import synthetic_cache  # noqa: F401  (re-exported for tests)

FASHION_MNIST_DIR = Path(os.environ.get("EENET_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))
HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


# Test modules whose results come out of float arithmetic that PyTorch dispatches by the
# processor's capability (training, calibration on learned scores, served vs simulated exits).
# CI runs them a second time under ATEN_CPU_CAPABILITY=default (`make test-numerics`), so a test
# that holds only for one machine's float trajectory fails wherever CI runs.
NUMERICS_MODULES = {
    "test_auto", "test_eenet_scorer", "test_eenet_losses", "test_eenet_stream", "test_policy",
    "test_rules", "test_certified", "test_certify", "test_sweep", "test_scores", "test_features",
    "test_runtime", "test_wordnet",
}


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
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rpartition(".")[2] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)
        if "dataset" in item.keywords and not HAVE_FASHION_MNIST:
            item.add_marker(skip_data)
        if "gpu" in item.keywords and not have_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def small_cache() -> ExitCache:
    return synthetic_cache(n_samples=600, seed=1)


@pytest.fixture
def val_test_caches() -> tuple[ExitCache, ExitCache]:
    return (synthetic_cache(n_samples=3000, seed=11, split="val"),
            synthetic_cache(n_samples=3000, seed=12, split="test"))
