"""Tests of eenet.features against plain-loop references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import eenet.features as features
from eenet._validation import EenetError
from eenet.features import (N_AGREEMENT_FEATURES, agreement_features, confidence_features,
                            margin, max_prob, one_minus_entropy, top_probs, vote_ratio)


def _random_probs(n: int, k: int, c: int, seed: int = 0, zeros: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.gamma(0.3, size=(n, k, c))
    if zeros:
        p[rng.random(size=p.shape) < 0.3] = 0.0
        p[:, :, 0] += 1e-3  # keep every row non-empty
    return p / p.sum(axis=2, keepdims=True)


# ---- plain-loop references -------------------------------------------------------
def _loop_max_prob(p):
    n, k, c = p.shape
    return np.array([[max(p[i, j]) for j in range(k)] for i in range(n)])


def _loop_one_minus_entropy(p):
    n, k, c = p.shape
    out = np.zeros((n, k))
    for i in range(n):
        for j in range(k):
            s = sum(float(x) * math.log(float(x)) for x in p[i, j] if x > 0)
            out[i, j] = 1.0 + s / math.log(c)
    return out


def _loop_vote(p):
    n, k, c = p.shape
    out = np.zeros((n, k))
    for i in range(n):
        preds = [int(np.argmax(p[i, j])) for j in range(k)]
        for j in range(k):
            so_far = preds[: j + 1]
            out[i, j] = max(so_far.count(cls) for cls in range(c)) / (j + 1)
    return out


class TestAgainstLoops:
    @pytest.mark.parametrize("shape", [(7, 1, 2), (20, 4, 5), (13, 6, 3)])
    def test_each_feature(self, shape):
        p = _random_probs(*shape, seed=sum(shape))
        np.testing.assert_allclose(max_prob(p), _loop_max_prob(p), rtol=0, atol=1e-12)
        np.testing.assert_allclose(one_minus_entropy(p), _loop_one_minus_entropy(p),
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(vote_ratio(p), _loop_vote(p), rtol=0, atol=1e-12)

    def test_confidence_features_stacks_the_three(self):
        p = _random_probs(11, 3, 4)
        f = confidence_features(p)
        assert f.shape == (11, 3, 3) and f.dtype == np.float64
        np.testing.assert_array_equal(f[..., 0], max_prob(p))
        np.testing.assert_allclose(f[..., 1], one_minus_entropy(p), atol=1e-12)
        np.testing.assert_array_equal(f[..., 2], vote_ratio(p))

    def test_blocks_give_the_same_answer(self, monkeypatch):
        p = _random_probs(50, 3, 4).astype(np.float32)
        whole = confidence_features(p)
        monkeypatch.setattr(features, "_BLOCK_ELEMENTS", 24)  # two samples per block
        np.testing.assert_array_equal(confidence_features(p), whole)
        np.testing.assert_array_equal(vote_ratio(p), whole[..., 2])


class TestKnownValues:
    def test_entropy_one_for_one_hot_zero_for_uniform(self):
        p = np.zeros((2, 2, 5))
        p[0, :, 3] = 1.0
        p[1] = 0.2
        np.testing.assert_allclose(one_minus_entropy(p), [[1, 1], [0, 0]], atol=1e-12)

    def test_single_class_is_certain(self):
        np.testing.assert_array_equal(one_minus_entropy(np.ones((3, 2, 1))), np.ones((3, 2)))

    @pytest.mark.parametrize("preds, expected", [
        ([0, 1, 1, 0], [1, 1 / 2, 2 / 3, 2 / 4]),
        ([2, 2, 2], [1, 1, 1]),
        ([0, 1, 2], [1, 1 / 2, 1 / 3]),
        ([1, 0, 0, 0, 1], [1, 1 / 2, 2 / 3, 3 / 4, 3 / 5]),
    ])
    def test_vote_ratio_hand_cases(self, preds, expected):
        p = np.full((1, len(preds), 3), 0.1)
        for j, cls in enumerate(preds):
            p[0, j, cls] = 0.8
        np.testing.assert_allclose(vote_ratio(p)[0], expected, atol=1e-12)

    def test_top_probs_sorted_and_padded(self):
        p = _random_probs(9, 2, 6)
        np.testing.assert_allclose(top_probs(p, 3), -np.sort(-p, axis=2)[..., :3], atol=0)
        padded = top_probs(p[:, :, :2] / p[:, :, :2].sum(2, keepdims=True), 4)
        assert padded.shape == (9, 2, 4)
        np.testing.assert_array_equal(padded[..., 2:], 0.0)


def _loop_agreement(p):
    n, k, c = p.shape
    out = np.zeros((n, k, N_AGREEMENT_FEATURES))
    for i in range(n):
        for j in range(k):
            row = sorted(p[i, j], reverse=True)
            y = int(np.argmax(p[i, j]))
            out[i, j, 0] = row[0] - row[1] if c > 1 else 1.0
            if j == 0:
                out[i, j, 1:] = [p[i, 0, y], p[i, 0, y], 1.0]
            else:
                out[i, j, 1] = p[i, j - 1, y]
                out[i, j, 2] = np.mean([p[i, jj, y] for jj in range(j)])
                out[i, j, 3] = float(int(np.argmax(p[i, j - 1])) == y)
    return out


class TestAgreement:
    @pytest.mark.parametrize("shape", [(7, 1, 2), (20, 4, 5), (13, 6, 3), (5, 3, 1)])
    def test_against_loop(self, shape):
        p = _random_probs(*shape, seed=3)
        out = agreement_features(p)
        assert out.shape == shape[:2] + (N_AGREEMENT_FEATURES,) and out.dtype == np.float64
        np.testing.assert_allclose(out, _loop_agreement(p), atol=1e-12)
        np.testing.assert_allclose(margin(p), _loop_agreement(p)[..., 0], atol=1e-12)

    def test_hand_case(self):
        p = np.array([[[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]]])
        np.testing.assert_allclose(agreement_features(p)[0], [[0.4, 0.7, 0.7, 1.0],
                                                              [0.2, 0.3, 0.3, 0.0],
                                                              [0.6, 0.6, 0.45, 1.0]])

    def test_blocks_and_torch_give_the_same_answer(self, monkeypatch):
        p = _random_probs(50, 4, 6, seed=5)
        whole = agreement_features(p)
        t = agreement_features(torch.from_numpy(p.astype(np.float32)))
        assert isinstance(t, torch.Tensor)
        np.testing.assert_allclose(t.numpy(), whole, atol=1e-6)
        np.testing.assert_allclose(margin(torch.from_numpy(p)).numpy(), whole[..., 0],
                                   atol=1e-12)
        monkeypatch.setattr(features, "_BLOCK_ELEMENTS", 24 * 7)
        np.testing.assert_array_equal(agreement_features(p), whole)


class TestDtypesAndTorch:
    def test_float16_and_float32_inputs(self):
        p = _random_probs(30, 3, 7)
        ref = confidence_features(p)
        for dtype in (np.float16, np.float32):
            out = confidence_features(p.astype(dtype))
            assert out.dtype == np.float64
            np.testing.assert_allclose(out[..., :2], ref[..., :2], atol=5e-3)

    def test_torch_matches_numpy(self):
        p = _random_probs(25, 4, 6, zeros=True).astype(np.float32)
        t = torch.from_numpy(p)
        for fn in (max_prob, one_minus_entropy, vote_ratio, confidence_features):
            out = fn(t)
            assert isinstance(out, torch.Tensor)
            np.testing.assert_allclose(out.numpy(), fn(p), atol=1e-5)
        np.testing.assert_allclose(top_probs(t, 3).numpy(), top_probs(p, 3), atol=1e-7)

    def test_torch_entropy_gradient_finite_with_zeros(self):
        p = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]], requires_grad=True)
        one_minus_entropy(p).sum().backward()
        assert torch.isfinite(p.grad).all()


class TestValidation:
    @pytest.mark.parametrize("bad, match", [
        (np.zeros((3, 4)), "shape"),
        (np.full((2, 2, 3), -1.0), r"\[0, 1\]"),
        (np.full((2, 2, 3), np.nan), r"\[0, 1\]"),
        (np.ones((2, 2, 3), dtype=np.int64), "floating"),
        (np.zeros((2, 0, 3)), "at least one exit"),
    ])
    def test_bad_probs(self, bad, match):
        with pytest.raises(EenetError, match=match):
            confidence_features(bad)

    def test_bad_m(self):
        with pytest.raises(EenetError, match="m must be a positive integer"):
            top_probs(np.full((1, 1, 2), 0.5), 0)

    def test_empty_sample_axis(self):
        assert confidence_features(np.zeros((0, 3, 4))).shape == (0, 3, 3)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
                  elements=st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)),
       st.sampled_from([np.float16, np.float32, np.float64]))
def test_features_lie_in_unit_interval(raw, dtype):
    totals = raw.sum(axis=2, keepdims=True)
    probs = np.where(totals > 0, raw / np.where(totals > 0, totals, 1.0), 1.0 / raw.shape[2])
    f = confidence_features(probs.astype(dtype))
    assert f.shape == probs.shape[:2] + (3,)
    assert np.all(np.isfinite(f))
    assert np.all((f >= 0) & (f <= 1))
    k = np.arange(1, probs.shape[1] + 1)
    assert np.all(f[..., 2] >= 1.0 / k - 1e-12)  # some exit always agrees with itself
