"""Tests of eenet.ingest: loading models (model.py) and data (data.py), streaming exits,
per-exit costs (costs.py) and cache_model."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import eenet.examples  # noqa: F401  (registers fashion-mnist)
from eenet._validation import CacheError, EenetError, resolve_device
from eenet.cache import read_cache
from eenet.ingest.costs import CostReport, measure_costs
from eenet.ingest.data import load_dataset
from eenet.ingest.forward import find_exit_modules
from eenet.ingest.model import cache_model, load_model, run_exits
from eenet.ingest.stream import PartialRun

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the factories below live in tests/_toy_models.py
    sys.path.insert(0, str(HERE))

import _toy_models as toy  # noqa: E402

FAST = {"min_run_time": 0.005, "repeats": 5}


def _npz(path: Path, n: int = 40, seed: int = 0, nan_from: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, toy.N_FEATURES)).astype(np.float32)
    x[:, 0] = np.clip(x[:, 0], -4.0, 4.0)
    if nan_from is not None:
        x[nan_from:, 0] = 9.0  # NaNAfter poisons samples whose first feature is >= 5
    y = rng.integers(0, toy.N_CLASSES, n)
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def data_npz(tmp_path: Path) -> Path:
    return _npz(tmp_path / "data.npz")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model.eval())


# ---------------------------------------------------------------------------
class TestLoadModel:
    def test_factory_is_frozen_and_in_eval_mode(self):
        model = load_model("_toy_models:staged")
        assert isinstance(model, toy.StagedMLP)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())

    @pytest.mark.parametrize("spec, match", [
        ("no_such_module_xyz:make", "no module named 'no_such_module_xyz'"),
        ("_toy_models:missing_fn", "has no attribute 'missing_fn'.*staged"),
        ("_toy_models:not_a_model", "not a torch.nn.Module"),
        ("_toy_models", "neither a TorchScript file"),
        ("_toy_models:N_CLASSES", "not a function"),
    ])
    def test_bad_specs(self, spec, match):
        with pytest.raises(EenetError, match=match):
            load_model(spec)

    @pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
    def test_weights_are_loaded(self, tmp_path, wrap):
        torch.manual_seed(5)
        trained = toy.StagedMLP()
        state = trained.state_dict()
        torch.save(state if wrap is None else {wrap: state, "epoch": 3}, tmp_path / "w.pt")
        model = load_model("_toy_models:staged", weights=tmp_path / "w.pt")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key])

    def test_data_parallel_prefix_is_stripped(self, tmp_path):
        state = {f"module.{k}": v for k, v in toy.StagedMLP().state_dict().items()}
        torch.save(state, tmp_path / "w.pt")
        load_model("_toy_models:staged", weights=tmp_path / "w.pt")

    def test_missing_checkpoint(self, tmp_path):
        with pytest.raises(EenetError, match="checkpoint .*nope.pt not found"):
            load_model("_toy_models:staged", weights=tmp_path / "nope.pt")

    def test_corrupt_checkpoint(self, tmp_path):
        (tmp_path / "bad.pt").write_bytes(np.random.default_rng(0).bytes(4096))
        with pytest.raises(EenetError, match="cannot be read.*corrupt"):
            load_model("_toy_models:staged", weights=tmp_path / "bad.pt")

    def test_mismatching_checkpoint(self, tmp_path):
        torch.save(toy.HookedMLP().state_dict(), tmp_path / "other.pt")
        with pytest.raises(EenetError, match="does not match the model: .*missing.*"
                                             "unexpected.*belongs to --model"):
            load_model("_toy_models:staged", weights=tmp_path / "other.pt")

    def test_shape_mismatch(self, tmp_path):
        torch.save(toy.StagedMLP(widths=(8, 64, 256)).state_dict(), tmp_path / "w.pt")
        with pytest.raises(EenetError, match="shape mismatches .*checkpoint \\[256"):
            load_model("_toy_models:staged", weights=tmp_path / "w.pt")

    def test_not_a_state_dict(self, tmp_path):
        torch.save([1, 2, 3], tmp_path / "w.pt")
        with pytest.raises(EenetError, match="not a state dict"):
            load_model("_toy_models:staged", weights=tmp_path / "w.pt")

    def test_torchscript_archive(self, tmp_path):
        scripted = _script(toy.staged())
        scripted.save(str(tmp_path / "m.pt"))
        model = load_model(str(tmp_path / "m.pt"))
        x = torch.randn(3, toy.N_FEATURES)
        for a, b in zip(model(x), scripted(x)):
            torch.testing.assert_close(a, b)

    def test_state_dict_given_as_model(self, tmp_path):
        torch.save(toy.StagedMLP().state_dict(), tmp_path / "w.pt")
        with pytest.raises(EenetError, match="torch.save checkpoint, not a TorchScript.*"
                                             "--weights"):
            load_model(str(tmp_path / "w.pt"))

    def test_missing_torchscript_file(self, tmp_path):
        with pytest.raises(EenetError, match="model file .*absent.pt not found"):
            load_model(str(tmp_path / "absent.pt"))


class TestResolveDevice:
    def test_names(self):
        assert resolve_device("cpu") == torch.device("cpu")
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert resolve_device("auto").type == expected

    def test_unknown(self):
        with pytest.raises(EenetError, match="choose one of: auto, cpu, cuda"):
            resolve_device("tpu")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
    def test_cuda_missing(self):
        with pytest.raises(EenetError, match="CUDA is not available"):
            resolve_device("cuda")


class TestLoadDataset:
    def test_npz(self, data_npz):
        ds = load_dataset(str(data_npz))
        x, y = ds[0]
        assert len(ds) == 40 and x.shape == (toy.N_FEATURES,) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.ndim == 0

    def test_npz_without_labels(self, tmp_path):
        np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)))
        with pytest.raises(EenetError, match="holds arrays \\['x'\\]; expected 'x'.*'y'"):
            load_dataset(str(tmp_path / "d.npz"))

    def test_factory(self):
        assert len(load_dataset("_toy_models:toy_data")) == 20

    @pytest.mark.parametrize("spec, match", [
        ("_toy_models:unlabelled", "yields a tuple of 1 .* expected \\(input, label\\) pairs"),
        ("_toy_models:float_labels", "label of item 0 is float 0.5; expected an int"),
        ("nothing-here", "not a registered name \\(.*fashion-mnist:SPLIT"),
        ("fashion-mnist:dev", "unknown split 'dev' of dataset 'fashion-mnist'.*train, val, "
                              "test"),
    ])
    def test_bad(self, spec, match):
        with pytest.raises(EenetError, match=match):
            load_dataset(spec)

    def test_fashion_mnist_missing_directory(self, tmp_path):
        with pytest.raises(EenetError, match="Fashion-MNIST not found in .*apt-get install "
                                             "dataset-fashion-mnist.*EENET_FASHION_MNIST_DIR"):
            load_dataset("fashion-mnist:val", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
class TestRunExits:
    def test_streams_batches(self):
        model, ds = toy.staged().eval(), toy.toy_data(20)
        batches = list(run_exits(model, ds, device="cpu", batch_size=8, verbose=False))
        assert [b[0].shape for b in batches] == [(8, 3, 3), (8, 3, 3), (4, 3, 3)]
        assert all(b[0].dtype == np.float32 and b[1].dtype == np.int64 for b in batches)
        logits = np.concatenate([b[0] for b in batches])
        with torch.no_grad():
            expected = torch.stack(model(ds.tensors[0]), dim=1).numpy()  # [n, K, C]
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]),
                                      ds.tensors[1].numpy())

    def test_grad_mode_does_not_leak_between_batches(self):
        for _ in run_exits(toy.staged(), toy.toy_data(8), device="cpu", batch_size=4,
                           verbose=False):
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    def test_limit(self):
        batches = list(run_exits(toy.staged(), toy.toy_data(20), device="cpu", batch_size=8,
                                 limit=11, verbose=False))
        assert [len(b[1]) for b in batches] == [8, 3]

    def test_iterable_dataset_with_limit(self):
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(toy.toy_data(20))

        batches = list(run_exits(toy.staged(), Stream(), device="cpu", batch_size=8,
                                 limit=10, verbose=False))
        assert [len(b[1]) for b in batches] == [8, 2]

    def test_autocast_returns_float32(self):
        model, ds = toy.staged(), toy.toy_data(8)
        (logits, _), = run_exits(model, ds, device="cpu", autocast=True, verbose=False)
        assert logits.dtype == np.float32
        with torch.no_grad():
            expected = torch.stack(model(ds.tensors[0]), dim=1).numpy()  # [n, K, C]
        np.testing.assert_allclose(logits, expected, rtol=0.05, atol=0.05)

    def test_arguments_checked_before_iteration(self):
        with pytest.raises(EenetError, match="batch_size must be an integer >= 1"):
            run_exits(toy.staged(), toy.toy_data(), device="cpu", batch_size=0)

    @pytest.mark.parametrize("model, match", [
        (toy.SingleTensor(), "returned a single tensor of shape \\[4, 3\\]; expected a list"),
        (toy.MixedClasses(), "different class counts \\[3, 5\\]"),
    ])
    def test_contract(self, model, match):
        with pytest.raises(EenetError, match=match):
            next(run_exits(model, toy.toy_data(), device="cpu", batch_size=4, verbose=False))

    def test_forward_failure_is_explained(self):
        ds = torch.utils.data.TensorDataset(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
        with pytest.raises(EenetError, match="forward failed on batch 0.*\\[4, 9\\]"):
            next(run_exits(toy.staged(), ds, device="cpu", verbose=False))


# ---------------------------------------------------------------------------
def _linear_flops(d_in: int, d_out: int) -> int:
    return 2 * d_in * d_out  # one multiply and one add per weight; bias adds not counted


class TestMeasureCosts:
    def test_staged_is_cumulative_and_increasing(self):
        model = toy.StagedMLP(widths=(4, 256, 2048))
        report = measure_costs(model, torch.randn(4, toy.N_FEATURES), device="cpu",
                               batch_size=16, min_run_time=0.02)
        assert report.timing == "stages"
        for vec in report.vectors().values():
            assert vec.shape == (3,) and np.all(np.diff(vec) >= 0)
        assert report.latency_ms_batch1[-1] > report.latency_ms_batch1[0]
        assert report.latency_ms_batchB[-1] > report.latency_ms_batchB[0]
        assert np.all(np.diff(report.flops) > 0)

    def test_flops_exact_for_linear_model(self):
        widths, c = (8, 64, 512), toy.N_CLASSES
        model = toy.StagedMLP(widths=widths)
        report = measure_costs(model, torch.randn(2, toy.N_FEATURES), device="cpu",
                               batch_size=4, timing=False)
        expected, total, d_in = [], 0, toy.N_FEATURES
        for w in widths:
            total += _linear_flops(d_in, w) + _linear_flops(w, c)
            expected.append(total)
            d_in = w
        np.testing.assert_array_equal(report.flops, expected)
        assert report.latency_ms_batch1 is None and "flops" in report.vectors()

    def test_hooks_find_exit_modules(self):
        model = toy.HookedMLP()
        report = measure_costs(model, torch.randn(3, toy.N_FEATURES), device="cpu",
                               batch_size=8, **FAST)
        assert report.timing == "hooks"
        assert report.exit_modules == ("exit_a", "exit_b", "exit_c")
        assert np.all(np.diff(report.latency_ms_batch1) >= 0)
        assert np.all(np.diff(report.latency_ms_batchB) >= 0)
        assert report.latency_ms_batchB[-1] > report.latency_ms_batchB[0]
        c = toy.N_CLASSES
        a = _linear_flops(6, 16) + _linear_flops(16, c)
        b = a + _linear_flops(16, 256) + _linear_flops(256, 256) + _linear_flops(256, c)
        d = b + _linear_flops(256, 1024) + _linear_flops(1024, 1024) + _linear_flops(1024, c)
        np.testing.assert_array_equal(report.flops, [a, b, d])

    def test_named_exit_modules(self):
        report = measure_costs(toy.HookedMLP(), torch.randn(1, toy.N_FEATURES), device="cpu",
                               batch_size=2, exit_modules=["exit_a", "exit_b.1", "exit_c"],
                               **FAST)
        assert report.exit_modules == ("exit_a", "exit_b.1", "exit_c")
        with pytest.raises(EenetError, match="not submodules of the model"):
            measure_costs(toy.HookedMLP(), torch.randn(1, toy.N_FEATURES), device="cpu",
                          batch_size=2, exit_modules=["exit_a", "nope", "exit_c"], **FAST)

    def test_flops_follow_dependencies_not_execution_order(self):
        report = measure_costs(toy.ReversedHeads(), torch.randn(1, toy.N_FEATURES),
                               device="cpu", batch_size=2, timing=False)
        first = _linear_flops(6, 10) + _linear_flops(10, 3)
        np.testing.assert_array_equal(report.flops, [
            first, first + _linear_flops(10, 40) + _linear_flops(40, 3)])

    def test_torchscript_staged_uses_truncated_forwards(self):
        report = measure_costs(_script(toy.staged()), torch.randn(1, toy.N_FEATURES),
                               device="cpu", batch_size=2, **FAST)
        assert report.timing == "stages" and np.all(np.diff(report.flops) > 0)

    def test_torchscript_without_stages_cannot_be_timed(self):
        scripted = _script(toy.hooked())
        with pytest.raises(EenetError, match="--costs flops or give explicit"):
            measure_costs(scripted, torch.randn(1, toy.N_FEATURES), device="cpu",
                          batch_size=2, **FAST)
        flops = measure_costs(scripted, torch.randn(1, toy.N_FEATURES), device="cpu",
                              batch_size=2, timing=False).flops
        np.testing.assert_array_equal(
            flops, measure_costs(toy.hooked(), torch.randn(1, toy.N_FEATURES), device="cpu",
                                 batch_size=2, timing=False).flops)

    def test_pick(self):
        report = CostReport(np.array([1.0, 2.0]), np.array([0.5, 1.0]), np.array([10.0, 30.0]))
        costs, unit, source = report.pick("measured")
        np.testing.assert_array_equal(costs, [1.0, 2.0])
        assert (unit, source) == ("ms", "measured")
        assert report.pick("flops")[1:] == ("flops", "flops")
        with pytest.raises(EenetError, match="choose one of: flops, measured"):
            report.pick("median")
        with pytest.raises(EenetError, match="--costs flops"):
            CostReport(None, None, np.array([1.0])).pick("measured")


# ---------------------------------------------------------------------------
class _AllHeads(torch.nn.Module):
    """A module returning every exit: it produces none of them alone."""

    def __init__(self) -> None:
        super().__init__()
        self.h1 = torch.nn.Linear(toy.N_FEATURES, toy.N_CLASSES)
        self.h2 = torch.nn.Linear(toy.N_FEATURES, toy.N_CLASSES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.h1(x), self.h2(x)]


class _Wrapped(torch.nn.Module):
    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.heads, self.view = _AllHeads(), view

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.heads(x)
        return [o.view(o.shape) for o in outs] if self.view else outs


class TestFindExitModules:
    @pytest.mark.parametrize("view", [False, True])
    def test_a_module_returning_every_exit_is_passed_over(self, view):
        model = _Wrapped(view)
        found = find_exit_modules(model, torch.randn(1, toy.N_FEATURES), 2)
        assert found == [("heads.h1", model.heads.h1), ("heads.h2", model.heads.h2)]

    def test_names_are_checked_without_a_forward(self):
        model = toy.HookedMLP()
        assert [m for _, m in find_exit_modules(model, None, 3, ["exit_a", "exit_b", "exit_c"])
                ] == [model.exit_a, model.exit_b, model.exit_c]
        for names, match in [(["exit_a"], "names 1 modules for 3 exits"),
                             (["exit_a", "exit_a", "exit_c"], "names a module twice"),
                             (["exit_a", "", "exit_c"], r"\[''\] are not submodules")]:
            with pytest.raises(EenetError, match=match):
                find_exit_modules(model, None, 3, names)

    def test_exit_count_and_torchscript_refused(self):
        with pytest.raises(EenetError, match="returns 3 exits, not the 2 expected"):
            find_exit_modules(toy.HookedMLP(), torch.randn(1, toy.N_FEATURES), 2)
        with pytest.raises(EenetError, match="TorchScript model takes no forward hooks"):
            find_exit_modules(_script(toy.hooked()), torch.randn(1, toy.N_FEATURES), 3)


class TestCacheModel:
    def test_limit_given_costs_float16(self, data_npz, out_dir):
        out = cache_model("_toy_models:staged", str(data_npz), out_dir / "val.h5", limit=25,
                          costs=[1.0, 2.0, 4.5], cost_unit_given="ms", dtype="float16",
                          batch_size=8, device="cpu", split="val", verbose=False, seed=3,
                          **FAST)
        cache = read_cache(out)
        assert (cache.n_samples, cache.n_exits, cache.n_classes) == (25, 3, 3)
        assert cache.logits.dtype == np.float16
        np.testing.assert_array_equal(cache.costs, [1.0, 2.0, 4.5])
        assert (cache.cost_unit, cache.cost_source) == ("ms", "given")
        assert cache.extra_costs == {}  # given costs: nothing is measured by default
        assert (cache.model, cache.dataset, cache.split) == ("_toy_models:staged",
                                                             str(data_npz), "val")
        assert cache.attrs["device"] == "cpu" and cache.attrs["seed"] == 3
        assert cache.attrs["batch_size"] == 8 and cache.attrs["num_threads"] >= 1
        np.testing.assert_array_equal(cache.sample_ids, np.arange(25))
        x, y = np.load(data_npz)["x"][:25], np.load(data_npz)["y"][:25]
        with torch.no_grad():
            expected = torch.stack(toy.staged()(torch.from_numpy(x)), dim=1).numpy()
        np.testing.assert_allclose(cache.logits.astype(np.float32), expected, rtol=2e-3,
                                   atol=2e-3)
        np.testing.assert_array_equal(cache.labels, y)
        assert sorted(p.name for p in out_dir.iterdir()) == ["val.h5"]

    @pytest.mark.parametrize("costs, unit, source", [("measured", "ms", "measured"),
                                                     ("flops", "flops", "flops"),
                                                     ("0.5,1,2", "ms", "given")])
    def test_cost_choices(self, data_npz, out_dir, costs, unit, source):
        cache = read_cache(cache_model("_toy_models:hooked", str(data_npz),
                                       out_dir / "c.h5", costs=costs, device="cpu",
                                       batch_size=16, verbose=False, **FAST))
        assert (cache.cost_unit, cache.cost_source) == (unit, source)
        assert np.all(np.diff(cache.costs) >= 0) and cache.costs[-1] > 0
        if costs == "flops":
            np.testing.assert_array_equal(cache.costs, cache.extra_costs["flops"])
        timed = costs == "measured"
        if costs != "0.5,1,2":
            assert cache.attrs["exit_modules"] == ('["exit_a", "exit_b", "exit_c"]' if timed
                                                   else "[]")
        assert ("latency_ms_batch1" in cache.extra_costs) == timed
        assert ("flops" in cache.extra_costs) == (costs != "0.5,1,2")

    def test_timing_on_request_stores_latencies_beside_given_costs(self, data_npz, out_dir):
        cache = read_cache(cache_model("_toy_models:staged", str(data_npz), out_dir / "c.h5",
                                       costs=[1.0, 2.0, 3.0], timing=True, device="cpu",
                                       verbose=False, **FAST))
        assert set(cache.extra_costs) == {"latency_ms_batch1", "latency_ms_batchB", "flops"}
        assert cache.attrs["timing"] == "stages" and cache.cost_source == "given"

    def test_iterable_dataset_with_limit(self, out_dir):
        stream = read_cache(cache_model("_toy_models:wide", "_toy_models:wide_stream",
                                        out_dir / "s.h5", costs=[1, 2, 3], limit=100,
                                        batch_size=16, device="cpu", verbose=False))
        mapped = read_cache(cache_model(*WIDE, out_dir / "m.h5", costs=[1, 2, 3], limit=100,
                                        batch_size=16, device="cpu", verbose=False))
        assert stream.n_samples == 100
        np.testing.assert_array_equal(stream.logits, mapped.logits)
        np.testing.assert_array_equal(stream.sample_ids, np.arange(100))

    def test_torchscript_without_stages_caches_flops(self, data_npz, out_dir, tmp_path):
        _script(toy.hooked()).save(str(tmp_path / "m.ts"))
        cache = read_cache(cache_model(str(tmp_path / "m.ts"), str(data_npz),
                                       out_dir / "c.h5", costs="flops", device="cpu",
                                       verbose=False, **FAST))
        assert cache.cost_source == "flops" and set(cache.extra_costs) == {"flops"}
        with pytest.raises(EenetError, match="cannot time each exit of a TorchScript"):
            cache_model(str(tmp_path / "m.ts"), str(data_npz), out_dir / "d.h5",
                        costs="flops", timing=True, device="cpu", verbose=False, **FAST)
        assert sorted(p.name for p in out_dir.iterdir()) == ["c.h5"]

    def _fails(self, out_dir: Path, match: str, model: str, data: str, **kwargs) -> None:
        with pytest.raises(EenetError, match=match):
            cache_model(model, data, out_dir / "x.h5", device="cpu", batch_size=8,
                        verbose=False, **FAST, **kwargs)
        assert list(out_dir.iterdir()) == []  # no cache, no temporary file

    @pytest.mark.parametrize("model, match", [
        ("no_such_module_xyz:net", "no module named"),
        ("_toy_models:single_tensor", "single tensor of shape \\[1, 3\\]"),
        ("_toy_models:mixed_classes", "different class counts"),
    ])
    def test_bad_models(self, data_npz, out_dir, model, match):
        self._fails(out_dir, match, model, str(data_npz))

    def test_bad_checkpoints(self, data_npz, out_dir, tmp_path):
        self._fails(out_dir, "not found", "_toy_models:staged", str(data_npz),
                    weights=tmp_path / "missing.pt")
        (tmp_path / "junk.pt").write_bytes(np.random.default_rng(1).bytes(1000))
        self._fails(out_dir, "cannot be read", "_toy_models:staged", str(data_npz),
                    weights=tmp_path / "junk.pt")

    def test_dataset_without_labels(self, out_dir):
        self._fails(out_dir, "expected \\(input, label\\) pairs", "_toy_models:staged",
                    "_toy_models:unlabelled")

    def test_wrong_number_of_costs(self, data_npz, out_dir):
        self._fails(out_dir, "costs has 2 values but the model has 3 exits",
                    "_toy_models:staged", str(data_npz), costs=[1.0, 2.0])

    def test_decreasing_costs(self, data_npz, out_dir):
        self._fails(out_dir, "cumulative", "_toy_models:staged", str(data_npz),
                    costs="3,2,1")

    def test_nan_logits_name_the_sample(self, tmp_path, out_dir):
        data = _npz(tmp_path / "nan.npz", n=30, nan_from=13)
        self._fails(out_dir, "logits of sample 13 exit 1 are not finite",
                    "_toy_models:nan_model", str(data), costs=[1.0, 2.0])

    def test_untimeable_model_with_measured_costs(self, data_npz, out_dir):
        self._fails(out_dir, "cannot tell which module produces exit 1",
                    "_toy_models:nan_model", str(data_npz))

    def test_missing_output_directory(self, data_npz, tmp_path):
        with pytest.raises(CacheError, match="does not exist; create it first"):
            cache_model("_toy_models:staged", str(data_npz), tmp_path / "no" / "x.h5",
                        verbose=False)

    def test_bad_dtype(self, data_npz, out_dir):
        self._fails(out_dir, "unknown dtype 'float64'", "_toy_models:staged", str(data_npz),
                    dtype="float64")


# ---------------------------------------------------------------------------
# costs shared between splits
# ---------------------------------------------------------------------------
class TestCostsFrom:
    def test_copies_every_cost_vector_and_records_the_source(self, data_npz, out_dir):
        val = read_cache(cache_model("_toy_models:staged", str(data_npz), out_dir / "val.h5",
                                     device="cpu", batch_size=8, verbose=False, **FAST))
        test = read_cache(cache_model("_toy_models:staged", str(data_npz), out_dir / "test.h5",
                                      costs_from=out_dir / "val.h5", device="cpu",
                                      batch_size=8, verbose=False))
        np.testing.assert_array_equal(test.costs, val.costs)
        assert (test.cost_unit, test.cost_source) == ("ms", "measured")
        assert set(test.extra_costs) == set(val.extra_costs)
        for name, vec in val.extra_costs.items():
            np.testing.assert_array_equal(test.extra_costs[name], vec)
        assert test.attrs["costs_from"] == str((out_dir / "val.h5").resolve())
        assert test.attrs["costs_device"] == "cpu"

    def test_refusals(self, data_npz, out_dir, tmp_path):
        other = cache_model("_toy_models:nan_model", str(data_npz), tmp_path / "two.h5",
                            costs=[1.0, 2.0], device="cpu", verbose=False)
        with pytest.raises(EenetError, match="costs for 2 exits but this network has 3"):
            cache_model("_toy_models:staged", str(data_npz), out_dir / "x.h5",
                        costs_from=other, device="cpu", verbose=False)
        with pytest.raises(EenetError, match="either --costs or --costs-from"):
            cache_model("_toy_models:staged", str(data_npz), out_dir / "x.h5",
                        costs=[1, 2, 3], costs_from=other, verbose=False)
        with pytest.raises(EenetError, match="drop --timing"):
            cache_model("_toy_models:staged", str(data_npz), out_dir / "x.h5",
                        costs_from=other, timing=True, verbose=False)
        with pytest.raises(CacheError, match="not an HDF5 file"):
            cache_model("_toy_models:staged", str(data_npz), out_dir / "x.h5",
                        costs_from=data_npz, device="cpu", verbose=False)
        assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------------
# full disks, signals, killed and resumed runs
# ---------------------------------------------------------------------------
WIDE = ("_toy_models:wide", "_toy_models:wide_data")
SLOW_ARGS = ["--model", "_toy_models:slow_wide", "--data", "_toy_models:wide_data",
             "--batch-size", "16"]


def _default_sigint() -> None:
    # A suite started in the background of a non-interactive shell (`nohup make test &`)
    # inherits SIGINT ignored, and Python keeps an inherited ignore; the child gets the
    # default back, so Ctrl-C reaches it as it would in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(*args: str) -> subprocess.Popen:
    """``python -m eenet -q ARGS`` run from tests/ (where _toy_models lives)."""
    return subprocess.Popen([sys.executable, "-m", "eenet", "-q", *map(str, args)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _same_cache(a, b) -> None:
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def _flaky(monkeypatch, tmp_path) -> Path:
    marker = tmp_path / "flaky-marker"
    marker.touch()
    monkeypatch.setenv(toy.FLAKY_ENV, str(marker))
    return marker


class TestFullDisk:
    def test_injected_enospc_while_streaming(self, out_dir, monkeypatch):
        real = os.pwrite

        def pwrite(fd, data, offset):  # the disk fills after 1.5 MB
            if offset + len(data) > 1_500_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        with pytest.raises(EenetError, match=r"w\.h5: no space left on device while writing"):
            cache_model(*WIDE, out_dir / "w.h5", costs=[1, 2, 3], batch_size=16,
                        device="cpu", verbose=False)
        assert list(out_dir.iterdir()) == []

    def test_real_small_disk(self, tmp_path, data_npz):
        with toy.mount_tmpfs(tmp_path / "small", "2m") as small:
            res = subprocess.run([sys.executable, "-m", "eenet", "-q", "cache", "--model",
                                  WIDE[0], "--data", WIDE[1], "--out", str(small / "w.h5"),
                                  "--costs", "1,2,3"],
                                 cwd=HERE, capture_output=True, text=True, timeout=120)
            assert res.returncode == 1
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"Error: {small / 'w.h5'}: ")
            assert re.search(r"the cache needs about [56] MiB but 2 MiB are free on that disk; "
                             r"free some space or write to another disk$", lines[0])
            assert list(small.iterdir()) == []


class TestInterrupts:
    @pytest.mark.parametrize("sig, code, line", [
        (signal.SIGTERM, 143, "terminated by signal 15; nothing was written"),
        (signal.SIGINT, 130, "interrupted; nothing was written")])
    def test_signal_leaves_nothing(self, out_dir, sig, code, line):
        proc = _spawn("cache", *SLOW_ARGS, "--out", out_dir / "w.h5", "--costs", "1,2,3")
        _wait_for(lambda: any(out_dir.glob(".w.h5.eenet-tmp.*")), proc)
        time.sleep(0.3)  # well inside the stream of batches
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code
        assert err.strip().splitlines() == [line]
        assert list(out_dir.iterdir()) == []

    def test_sigkill_leftover_is_removed_by_the_next_run(self, out_dir):
        proc = _spawn("cache", *SLOW_ARGS, "--out", out_dir / "w.h5", "--costs", "1,2,3")
        _wait_for(lambda: any(out_dir.glob(".w.h5.eenet-tmp.*")), proc)
        proc.kill()
        proc.communicate(timeout=60)
        assert len(list(out_dir.glob(".w.h5.eenet-tmp.*"))) == 1
        with pytest.warns(UserWarning, match=r"removed .*w\.h5\.eenet-tmp.* was killed"):
            cache_model(*WIDE, out_dir / "w.h5", costs=[1, 2, 3], batch_size=16,
                        device="cpu", verbose=False)
        assert sorted(p.name for p in out_dir.iterdir()) == ["w.h5"]


class TestResume:
    def test_after_sigkill_equals_an_uninterrupted_run(self, out_dir, tmp_path):
        partial = out_dir / ".w.h5.eenet-partial"
        proc = _spawn("cache", *SLOW_ARGS, "--out", out_dir / "w.h5", "--resume")
        _wait_for(lambda: len(list(partial.glob("chunk-*.npz"))) >= 2, proc)
        proc.kill()
        proc.communicate(timeout=60)
        done = sorted(p.name for p in partial.glob("chunk-*.npz"))
        assert 2 <= len(done) < 6 and not (out_dir / "w.h5").exists()
        saved = json.loads((partial / "costs.json").read_text())
        resumed = read_cache(cache_model("_toy_models:slow_wide", "_toy_models:wide_data",
                                         out_dir / "w.h5", batch_size=16, resume=True,
                                         device="cpu", verbose=False))
        whole = read_cache(cache_model(*WIDE, tmp_path / "whole.h5", costs=[1, 2, 3],
                                       batch_size=16, device="cpu", verbose=False))
        _same_cache(resumed, whole)
        assert resumed.n_samples == 480 and resumed.cost_source == "measured"
        np.testing.assert_array_equal(resumed.costs, saved["costs"])  # not measured again
        assert sorted(p.name for p in out_dir.iterdir()) == ["w.h5"]

    @pytest.mark.parametrize("data", ["_toy_models:flaky_wide", "_toy_models:flaky_stream"])
    def test_failed_run_continues_from_its_chunks(self, out_dir, tmp_path, monkeypatch, data):
        marker = _flaky(monkeypatch, tmp_path)
        args = dict(costs=[1, 2, 3], batch_size=16, device="cpu", verbose=False)
        with pytest.raises(EenetError, match="reading batch 15 .*read failed at item 250"):
            cache_model("_toy_models:wide", data, out_dir / "w.h5", resume=True, **args)
        partial = out_dir / ".w.h5.eenet-partial"
        # rows 0..239 were complete: chunks 0, 1, 2 of 80 rows
        assert sorted(p.name for p in partial.glob("chunk-*.npz")) == [
            f"chunk-{i:08d}.npz" for i in range(3)]
        with pytest.raises(EenetError, match="started with other arguments .*batch_size: 16 "
                                             "then, 8 now"):
            cache_model("_toy_models:wide", data, out_dir / "w.h5", resume=True,
                        **{**args, "batch_size": 8})
        marker.unlink()
        resumed = read_cache(cache_model("_toy_models:wide", data, out_dir / "w.h5",
                                         resume=True, **args))
        whole = read_cache(cache_model(*WIDE, tmp_path / "whole.h5", **args))
        _same_cache(resumed, whole)
        assert sorted(p.name for p in out_dir.iterdir()) == ["w.h5"]

    def test_a_run_without_resume_reports_and_then_deletes_the_partial_state(
            self, out_dir, tmp_path, monkeypatch):
        _flaky(monkeypatch, tmp_path)
        with pytest.raises(EenetError, match="read failed"):
            cache_model("_toy_models:wide", "_toy_models:flaky_wide", out_dir / "w.h5",
                        costs=[1, 2, 3], batch_size=16, resume=True, device="cpu",
                        verbose=False)
        assert PartialRun(out_dir / "w.h5").exists()
        with pytest.warns(UserWarning, match="holds an interrupted run; without --resume it "
                                             "is deleted once .* is complete"):
            cache_model(*WIDE, out_dir / "w.h5", costs=[1, 2, 3], batch_size=16,
                        device="cpu", verbose=False)
        assert sorted(p.name for p in out_dir.iterdir()) == ["w.h5"]

    def test_bad_input_leaves_no_state(self, out_dir, data_npz):
        with pytest.raises(EenetError, match="cannot tell which module produces exit 1"):
            cache_model("_toy_models:nan_model", str(data_npz), out_dir / "x.h5",
                        resume=True, device="cpu", verbose=False, **FAST)
        assert list(out_dir.iterdir()) == []
