"""Tests of eenet.scores.features (torch, exit by exit) against plain-loop references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

from eenet.scores.features import (advance_history, max_prob, new_history, one_minus_entropy,
                                   probabilities, select_rows, top_probs)

# float32 features against float64 loops over the same float32 probabilities
TOL = {"rtol": 0.0, "atol": 1e-6}


def _logits(n: int, k: int, c: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, c, generator=gen) * scale


def _ties(n: int, k: int, c: int, seed: int = 0) -> torch.Tensor:
    """Logits with few distinct values, so arg-max ties and equal answers are common."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, k, c), generator=gen).float()


# ---- plain-loop references over one probability row --------------------------------
def _argmax(row) -> int:
    best = 0
    for j in range(len(row)):
        if row[j] > row[best]:
            best = j  # ties stay with the lowest index
    return best


def _loop_entropy_score(row) -> float:
    c = len(row)
    s = sum(float(x) * math.log(float(x)) for x in row if x > 0)
    return min(1.0, max(0.0, 1.0 + s / math.log(c)))


def _loop_history(p: np.ndarray):
    """Per sample and exit: pred, run, vote, prev_at_pred, mean_at_pred, agree (loops)."""
    n, k, c = p.shape
    out = {key: np.zeros((n, k)) for key in ("pred", "run", "vote", "prev", "mean", "agree")}
    for i in range(n):
        preds = []
        for j in range(k):
            y = _argmax(p[i, j])
            preds.append(y)
            run = 1
            while run <= j and preds[j - run] == y:
                run += 1
            out["pred"][i, j] = y
            out["run"][i, j] = run
            out["vote"][i, j] = max(preds.count(cls) for cls in range(c)) / (j + 1)
            if j == 0:
                out["prev"][i, j] = out["mean"][i, j] = p[i, 0, y]
                out["agree"][i, j] = 1.0
            else:
                out["prev"][i, j] = p[i, j - 1, y]
                out["mean"][i, j] = sum(float(p[i, jj, y]) for jj in range(j)) / j
                out["agree"][i, j] = float(preds[j - 1] == y)
    return out


def _run_history(logits: torch.Tensor, probs: bool = True):
    n, k, c = logits.shape
    hist = new_history(n, c, probs=probs)
    outs = []
    for j in range(k):
        outs.append(advance_history(hist, j, probabilities(logits[:, j])))
    return outs


class TestProbabilities:
    def test_softmax_rows(self):
        logits = _logits(9, 1, 5, seed=1)[:, 0].double()
        p = probabilities(logits)
        assert p.dtype == torch.float32
        ref = np.exp(logits.numpy() - logits.numpy().max(axis=1, keepdims=True))
        ref /= ref.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(p.numpy(), ref, rtol=0, atol=1e-6)

    def test_log_probabilities_give_the_same_probabilities(self):
        logits = _logits(6, 1, 4, seed=2)[:, 0]
        assert_close(probabilities(torch.log_softmax(logits, dim=1)), probabilities(logits),
                     rtol=0, atol=1e-6)


class TestSummaries:
    @pytest.mark.parametrize("shape", [(7, 2), (20, 5), (13, 3), (4, 200)])
    def test_max_prob_and_entropy_against_loops(self, shape):
        n, c = shape
        p = probabilities(_logits(n, 1, c, seed=c)[:, 0])
        rows = p.double().numpy()
        assert_close(max_prob(p).double(), torch.tensor([max(r) for r in rows]), **TOL)
        assert_close(one_minus_entropy(p).double(),
                     torch.tensor([_loop_entropy_score(r) for r in rows], dtype=torch.float64),
                     **TOL)

    def test_entropy_one_for_one_hot_zero_for_uniform_and_zero_log_zero(self):
        p = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
        out = one_minus_entropy(p)
        assert torch.isfinite(out).all()
        assert_close(out, torch.tensor([1.0, 0.0, 0.5]), rtol=0, atol=1e-6)

    @pytest.mark.parametrize("c, m", [(6, 3), (6, 6), (2, 4), (10, 1)])
    def test_top_probs_sorted_and_zero_padded(self, c, m):
        p = probabilities(_logits(11, 1, c, seed=c + m)[:, 0])
        out = top_probs(p, m)
        assert out.shape == (11, m)
        for i, row in enumerate(p.tolist()):
            ref = sorted(row, reverse=True)[:m] + [0.0] * max(0, m - c)
            assert_close(out[i], torch.tensor(ref), rtol=0, atol=0)

    @settings(max_examples=60, deadline=None)
    @given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 7)),
                      elements=st.floats(-80, 80, width=32)))
    def test_summaries_lie_in_unit_interval(self, logits):
        p = probabilities(torch.from_numpy(logits))
        for value in (max_prob(p), one_minus_entropy(p)):
            assert torch.isfinite(value).all()
            assert value.min() >= 0.0 and value.max() <= 1.0
        assert (max_prob(p) >= 1.0 / logits.shape[1] - 1e-6).all()


class TestHistory:
    @pytest.mark.parametrize("shape", [(7, 1, 2), (20, 4, 5), (13, 6, 3), (30, 5, 2)])
    @pytest.mark.parametrize("tied", [False, True])
    def test_every_history_feature_against_loops(self, shape, tied):
        logits = _ties(*shape, seed=sum(shape)) if tied else _logits(*shape, seed=sum(shape))
        p = torch.softmax(logits.float(), dim=2)
        ref = _loop_history(p.double().numpy())
        outs = _run_history(logits)
        for j, out in enumerate(outs):
            np.testing.assert_array_equal(out["pred"].numpy(), ref["pred"][:, j])
            np.testing.assert_array_equal(out["run"].numpy(), ref["run"][:, j])
            np.testing.assert_allclose(out["vote"].numpy(), ref["vote"][:, j], rtol=0, atol=1e-7)
            np.testing.assert_allclose(out["prev_at_pred"].numpy(), ref["prev"][:, j],
                                       rtol=0, atol=1e-6)
            np.testing.assert_allclose(out["mean_at_pred"].numpy(), ref["mean"][:, j],
                                       rtol=0, atol=1e-6)
            np.testing.assert_array_equal(out["agree"].numpy(), ref["agree"][:, j])

    def test_hand_case(self):
        # exits answer 0, 1, 1: runs 1, 1, 2; votes 1, 1/2, 2/3
        p = torch.tensor([[[0.7, 0.3]], [[0.4, 0.6]], [[0.2, 0.8]]]).transpose(0, 1)  # [1, 3, 2]
        hist = new_history(1, 2)
        outs = [advance_history(hist, j, p[:, j]) for j in range(3)]
        assert [int(o["pred"]) for o in outs] == [0, 1, 1]
        assert [float(o["run"]) for o in outs] == [1.0, 1.0, 2.0]
        assert_close(torch.cat([o["vote"] for o in outs]), torch.tensor([1.0, 0.5, 2 / 3]))
        assert_close(torch.cat([o["prev_at_pred"] for o in outs]), torch.tensor([0.7, 0.3, 0.6]))
        assert_close(torch.cat([o["mean_at_pred"] for o in outs]),
                     torch.tensor([0.7, 0.3, 0.45]))
        assert_close(torch.cat([o["agree"] for o in outs]), torch.tensor([1.0, 0.0, 1.0]))

    def test_without_probabilities_keeps_only_what_votes_and_runs_need(self):
        logits = _logits(10, 3, 4, seed=5)
        hist = new_history(10, 4, probs=False)
        assert set(hist) == {"pred", "run", "votes"}
        lean = _run_history(logits, probs=False)
        full = _run_history(logits, probs=True)
        for a, b in zip(lean, full):
            assert set(a) == {"pred", "run", "vote"}
            for key in a:
                assert_close(a[key], b[key], rtol=0, atol=0)

    def test_select_rows_continues_like_the_whole_batch(self):
        """The runtime drops exited samples by indexing every history tensor; the
        survivors' later features must equal those of the full batch."""
        logits = _logits(12, 4, 5, seed=7)
        full = _run_history(logits)
        keep = torch.tensor([True, False, True, True, False, False, True, False, True, True,
                             False, True])
        hist = new_history(12, 5)
        for j in range(2):
            advance_history(hist, j, probabilities(logits[:, j]))
        hist = select_rows(hist, keep)
        idx = torch.nonzero(keep).flatten()
        hist = select_rows(hist, torch.arange(idx.numel()).flip(0))  # and reorder
        for j in range(2, 4):
            out = advance_history(hist, j, probabilities(logits[idx.flip(0), j]))
            for key, value in out.items():
                assert_close(value, full[j][key][idx.flip(0)], rtol=0, atol=1e-7)

    def test_select_rows_keeps_every_tensor(self):
        state = {"a": torch.arange(5), "b": torch.arange(10).view(5, 2)}
        out = select_rows(state, torch.tensor([4, 1]))
        assert out["a"].tolist() == [4, 1] and out["b"].tolist() == [[8, 9], [2, 3]]
