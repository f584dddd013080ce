"""Tests of the bundled example: the multi-exit CNN, its checkpoints and the Fashion-MNIST loader.

Tests marked ``dataset`` need the Debian package dataset-fashion-mnist and are
skipped without it (see conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eenet._validation import EenetError
from eenet.cache import read_cache
from eenet.examples import fashion_mnist as fm
from eenet.examples.models import (CHECKPOINTS, PACKAGE_DIR, MultiExitCNN, fashion_mnist_cnn4,
                                   fashion_mnist_cnn6, load_checkpoint)
from eenet.examples.train import save_checkpoint
from eenet.ingest.costs import measure_costs
from eenet.ingest.model import cache_model


class TestMultiExitCNN:
    @pytest.mark.parametrize("n_exits", [4, 6, 3])
    def test_shapes(self, n_exits):
        model = MultiExitCNN(n_exits).eval()
        outs = model(torch.randn(5, 1, 28, 28))
        assert isinstance(outs, list) and len(outs) == n_exits
        assert all(o.shape == (5, 10) for o in outs)
        assert len(model.stages) == len(model.heads) == n_exits

    @pytest.mark.parametrize("n_exits", [4, 6])
    def test_staged_forward_matches(self, n_exits):
        model = MultiExitCNN(n_exits).eval()
        x = torch.randn(2, 1, 28, 28)
        h, outs = x, []
        for stage, head in zip(model.stages, model.heads):
            h = stage(h)
            outs.append(head(h))
        for a, b in zip(outs, model(x)):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("n_exits", [4, 6])
    def test_exit_costs_grow(self, n_exits):
        flops = measure_costs(MultiExitCNN(n_exits), torch.zeros(1, 1, 28, 28), device="cpu",
                              batch_size=2, timing=False).flops
        assert np.all(np.diff(flops) > 0)
        assert flops[-1] > 10 * flops[0]

    def test_bad_plan(self):
        with pytest.raises(EenetError, match="plan has 1 stages for 2 exits"):
            MultiExitCNN(2, plan=[(8, 1, True, 1)])


class TestCheckpoints:
    @pytest.mark.parametrize("n_exits, factory", [(4, fashion_mnist_cnn4),
                                                  (6, fashion_mnist_cnn6)])
    def test_committed_checkpoint_loads(self, n_exits, factory):
        path = PACKAGE_DIR / CHECKPOINTS[n_exits]
        assert path.stat().st_size < 2 * 2 ** 20
        model = factory()
        assert len(model.heads) == n_exits and not model.training
        state = torch.load(path, weights_only=True)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key].to(value.dtype))

    def test_half_precision_round_trip(self, tmp_path):
        model = MultiExitCNN(4)
        assert save_checkpoint(model, tmp_path / "m.pt", max_mb=0.01) == "float16"
        loaded = load_checkpoint(MultiExitCNN(4), tmp_path / "m.pt")
        for key, value in loaded.state_dict().items():
            assert value.dtype == model.state_dict()[key].dtype
            torch.testing.assert_close(value, model.state_dict()[key], rtol=1e-2, atol=1e-3)

    def test_missing_checkpoint(self, tmp_path):
        with pytest.raises(EenetError, match="not found; train it with `python -m "
                                             "eenet.examples.train"):
            load_checkpoint(MultiExitCNN(4), tmp_path / "absent.pt")


class TestFashionMnistLoader:
    def test_missing_directory(self, tmp_path, monkeypatch):
        monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
        with pytest.raises(EenetError, match=f"Fashion-MNIST not found in {tmp_path}: run "
                                             f"`sudo apt-get install dataset-fashion-mnist` "
                                             f"or set {fm.ENV_VAR}"):
            fm.load_fashion_mnist("val")

    def test_split_indices_are_fixed_and_disjoint(self):
        val, train = fm.split_indices("val"), fm.split_indices("train")
        assert len(val) == 10_000 and len(train) == 50_000
        assert np.intersect1d(val, train).size == 0
        np.testing.assert_array_equal(np.union1d(val, train), np.arange(60_000))
        np.testing.assert_array_equal(val, fm.split_indices("val"))

    @pytest.mark.dataset
    def test_splits(self):
        sizes = {}
        for split in fm.SPLITS:
            images, labels = fm.load_arrays(split)
            sizes[split] = len(labels)
            assert images.shape == (len(labels), 28, 28) and images.dtype == np.uint8
            assert labels.min() == 0 and labels.max() == 9
            assert np.all(np.bincount(labels, minlength=10) > 0.08 * len(labels))
        assert sizes == {"train": 50_000, "val": 10_000, "test": 10_000}

    @pytest.mark.dataset
    def test_train_and_val_disjoint(self):
        train, _ = fm.load_arrays("train")
        val, _ = fm.load_arrays("val")
        # Disjoint by content too, not only by index: no validation image is in train.
        train_hashes = {img.tobytes() for img in train}
        assert not any(img.tobytes() in train_hashes for img in val)

    @pytest.mark.dataset
    def test_normalised_dataset(self):
        ds = fm.load_fashion_mnist("test")
        x, y = ds[0]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.ndim == 0
        images = ds.tensors[0]
        assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1) < 0.05


@pytest.mark.dataset
def test_cache_committed_model_on_validation(tmp_path):
    out = cache_model("eenet.examples.models:fashion_mnist_cnn4", "fashion-mnist:val",
                      tmp_path / "val.h5", limit=512, device="cpu", batch_size=128,
                      costs="flops", verbose=False, min_run_time=0.01)
    cache = read_cache(out)
    assert (cache.n_samples, cache.n_exits, cache.n_classes) == (512, 4, 10)
    assert cache.split == "val" and cache.cost_source == "flops"
    acc = cache.correct().mean(axis=0)
    assert acc[-1] > 0.8
    assert acc[0] > 0.5 and acc[-1] >= acc[0]
