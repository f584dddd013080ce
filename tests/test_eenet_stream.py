"""EENet's lean per-exit scoring: one packed state, the C kernel and the pure-torch kernel.

The reference is the trained heads' forward on the features training saw
(``EENetScorer._features``), which the per-field history scored to within
``HEAD_TOL`` before the packed state replaced it; both kernels must match it, and
each other, on caches and in the runtime, at batch sizes 1, 7 and 64.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from eenet.cache import ExitCache
from eenet.ingest.forward import select_rows
from eenet.policy import ExitPolicy
from eenet.rules import Thresholds
from eenet.runtime.model import EarlyExitModel
from eenet.scores import eenet_kernel, score_cache
from eenet.scores.eenet import EENetScorer
from eenet.synthetic import synthetic_cache

HEAD_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 heads, another order of the sums
BATCH_SIZES = [1, 7, 64]
CONFIGS = [
    {},  # the defaults: agreement features, full probabilities, one hidden layer
    {"depth": 0},
    {"depth": 2, "hidden": 5},
    {"features": "paper", "target": "correct"},
    {"prob_features": "top", "top_m": 3},
    {"prob_features": "top", "top_m": 12, "depth": 2},
    {"prob_features": "top", "top_m": 1, "features": "paper"},
]

needs_c = pytest.mark.skipif(eenet_kernel.load_kernel() is None,
                             reason="no C compiler: the torch kernel serves")


def _randomised(scorer: EENetScorer, seed: int) -> EENetScorer:
    """The scorer with random weights, so no trained structure hides a wrong column."""
    gen = torch.Generator().manual_seed(seed)
    state = scorer.to_state()
    state["state_dict"] = {k: torch.randn(v.shape, generator=gen) * 0.5
                           for k, v in state["state_dict"].items()}
    return EENetScorer.from_state(state)


def _with_kernel(scorer: EENetScorer, kernel: str) -> EENetScorer:
    out = copy.copy(scorer)
    out._stream = copy.copy(scorer.stream)
    out._stream.kernel = kernel
    return out


def _reference(scorer: EENetScorer, cache) -> np.ndarray:
    with torch.no_grad():
        return scorer._net(scorer._cache_features(cache))[0].double().numpy()


def _leaving(scorer: EENetScorer, logits: np.ndarray, batch: int, seed: int) -> np.ndarray:
    """Scores exit by exit in batches, a random third of the samples leaving after each
    exit (the state kept by ``select_rows``, as the runtime keeps it); NaN once gone."""
    n, k_exits, c = logits.shape
    out = np.full((n, k_exits), np.nan)
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        for begin in range(0, n, batch):
            rows = torch.arange(begin, min(begin + batch, n))
            state = scorer.start(rows.numel(), c, "cpu")
            for k in range(k_exits):
                s = scorer.score_exit(k, torch.from_numpy(logits[rows.numpy(), k]), state)
                out[rows.numpy(), k] = s.double().numpy()
                keep = torch.from_numpy(np.sort(rng.permutation(rows.numel())[
                    :max(1, rows.numel() * 2 // 3)]))
                state, rows = select_rows(state, keep), rows[keep]
    return out


@pytest.fixture(scope="module")
def caches():
    return {"3x10": synthetic_cache(300, n_exits=3, n_classes=10, seed=0),
            "5x2": synthetic_cache(150, n_exits=5, n_classes=2, seed=4)}


@pytest.fixture(scope="module")
def scorers(caches):
    out = {}
    for i, kw in enumerate(CONFIGS):
        cache = caches["3x10"]
        scorer = EENetScorer(epochs=1, **{"hidden": 6, **kw}).fit(cache, cache.costs, 2.0)
        out[i] = _randomised(scorer, seed=i)
    cache = caches["5x2"]
    out["5x2"] = _randomised(EENetScorer(epochs=1, hidden=4).fit(cache, cache.costs, 4.0), 1)
    return out


def _cache_of(name, caches):
    return caches["5x2" if name == "5x2" else "3x10"]


NAMES = list(range(len(CONFIGS))) + ["5x2"]


class TestKernelsOnCaches:
    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("kernel", ["torch", pytest.param("c", marks=needs_c)])
    def test_whole_cache_equals_the_heads_forward(self, scorers, caches, name, kernel):
        scorer, cache = _with_kernel(scorers[name], kernel), _cache_of(name, caches)
        np.testing.assert_allclose(score_cache(scorer, cache), _reference(scorer, cache),
                                   **HEAD_TOL)

    @needs_c
    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize("batch", BATCH_SIZES)
    def test_kernels_agree_while_samples_leave(self, scorers, caches, name, batch):
        cache = _cache_of(name, caches)
        c_scores = _leaving(_with_kernel(scorers[name], "c"), cache.logits, batch, seed=batch)
        t_scores = _leaving(_with_kernel(scorers[name], "torch"), cache.logits, batch,
                            seed=batch)
        assert np.array_equal(np.isnan(c_scores), np.isnan(t_scores))
        np.testing.assert_allclose(c_scores, t_scores, **HEAD_TOL)
        seen = ~np.isnan(c_scores)
        np.testing.assert_allclose(c_scores[seen], _reference(scorers[name], cache)[seen],
                                   **HEAD_TOL)

    def test_the_state_is_one_packed_tensor(self, scorers):
        scorer = scorers[0]
        state = scorer.start(5, 10)
        assert list(state) == ["packed"]
        packed = state["packed"]
        assert packed.shape == (5, scorer.stream.width) and packed.dtype == torch.float32
        with torch.inference_mode():
            scorer.score_exit(0, torch.randn(5, 10), state)
        assert state["packed"] is packed  # updated in place, nothing reallocated

    @needs_c
    def test_the_c_kernel_reads_strided_logits_and_copies_a_strided_state(self, scorers,
                                                                           caches):
        scorer, cache = _with_kernel(scorers[0], "c"), caches["3x10"]
        logits = torch.from_numpy(cache.logits[:20])
        with torch.inference_mode():
            state = scorer.start(40, 10)
            state = {"packed": state["packed"][::2]}  # every other row: a strided view
            got = [scorer.score_exit(k, logits[:, k], state) for k in range(3)]
        np.testing.assert_allclose(torch.stack(got, 1).double().numpy(),
                                   _reference(scorer, cache.subset(np.arange(20))), **HEAD_TOL)

    def test_without_a_compiler_the_torch_kernel_serves(self, scorers, caches, monkeypatch):
        monkeypatch.setattr(eenet_kernel, "_tried", False)
        monkeypatch.setattr(eenet_kernel, "_kernel", None)
        monkeypatch.setenv("EENET_C_KERNEL", "0")
        cache = caches["3x10"]
        scorer = _with_kernel(scorers[0], "auto")
        np.testing.assert_allclose(score_cache(scorer, cache), _reference(scorer, cache),
                                   **HEAD_TOL)
        with pytest.raises(RuntimeError, match="C kernel could not be built"):
            score_cache(_with_kernel(scorers[0], "c"), cache)


class _Staged(torch.nn.Module):
    """Three linear stages, a head after each."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stages = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 10) for _ in range(3)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))


@needs_c
class TestKernelsInTheRuntime:
    @pytest.mark.parametrize("batch", BATCH_SIZES)
    def test_served_scores_agree(self, scorers, caches, batch):
        """Both kernels serve the same scores; thresholds at the median score of each exit
        send about half of the samples still running out there."""
        net = _Staged().eval()
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            h, logits = x, []
            for stage, head in zip(net.stages, net.heads):
                h = stage(h)
                logits.append(head(h))
        cache = ExitCache(torch.stack(logits, 1).numpy(), np.zeros(64, dtype=np.int64),
                          np.array([1.0, 2.0, 3.0]))
        medians = np.median(score_cache(scorers[0], cache), axis=0)
        policy = ExitPolicy("eenet", epochs=1, hidden=6).fit(caches["3x10"], 2.0)
        policy.rule = Thresholds(np.r_[medians[:2], -np.inf])
        outs = {}
        for kernel in ("c", "torch"):
            served = copy.copy(policy)
            served.scorer = _with_kernel(scorers[0], kernel)
            model = EarlyExitModel(net, served)
            outs[kernel] = [model(x[s:s + batch]) for s in range(0, len(x), batch)]
        exits = {k: torch.cat([o.exit for o in v]) for k, v in outs.items()}
        scores = {k: torch.cat([o.score for o in v]) for k, v in outs.items()}
        same = exits["c"] == exits["torch"]
        assert int((~same).sum()) <= 1  # a score within float error of its threshold
        assert np.unique(exits["c"].numpy()).size == 3
        torch.testing.assert_close(scores["c"][same], scores["torch"][same], equal_nan=True,
                                   **HEAD_TOL)
