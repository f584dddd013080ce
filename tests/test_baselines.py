"""Score baselines, PABEE's patience rule, the static policy and the oracle."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet._validation import EenetError
from eenet.baselines import (SCORERS, EntropyScorer, MaxProbScorer, PatienceScorer,
                             ScoreMethod, apply_patience, calibrate_patience, canonical_method,
                             oracle_exits, patience_exits, run_lengths, static_exit,
                             static_thresholds)
from eenet.calibrate import apply_thresholds, calibrate

COSTS3 = np.array([1.0, 2.0, 4.0])
# Hand-made predictions of a 3-exit network; run lengths in the comments.
TOY_PREDS = np.array([
    [0, 0, 0],  # 1 2 3
    [0, 1, 1],  # 1 1 2
    [1, 0, 2],  # 1 1 1
    [2, 2, 2],  # 1 2 3
    [1, 1, 0],  # 1 2 1
    [0, 1, 0],  # 1 1 1
])


def random_probs(n: int, k: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, k, c))
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    return (p / p.sum(axis=2, keepdims=True)).astype(np.float32)


class TestScorers:
    def test_maxprob(self):
        p = random_probs(50, 3, 5, seed=0)
        s = MaxProbScorer().scores(p)
        assert s.dtype == np.float64 and s.shape == (50, 3)
        np.testing.assert_allclose(s, p.max(axis=2), rtol=1e-6)

    def test_entropy(self):
        p = random_probs(50, 3, 5, seed=1)
        p[0, 0] = [1, 0, 0, 0, 0]
        p[1, 0] = 0.2
        s = EntropyScorer().scores(p)
        pp = p.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.nansum(np.where(pp > 0, pp * np.log(pp), 0.0), axis=2)
        np.testing.assert_allclose(s, 1 - h / np.log(5), atol=1e-5)
        assert s[0, 0] == pytest.approx(1.0) and s[1, 0] == pytest.approx(0.0, abs=1e-6)
        assert s.min() >= 0 and s.max() <= 1

    def test_patience_scores(self):
        probs = np.eye(3, dtype=np.float32)[TOY_PREDS]  # one-hot [6, 3, 3]
        s = PatienceScorer().scores(probs)
        np.testing.assert_allclose(s * 3, run_lengths(TOY_PREDS))
        assert s.min() > 0 and s.max() <= 1

    @pytest.mark.parametrize("cls", [MaxProbScorer, EntropyScorer, PatienceScorer])
    def test_protocol_and_state(self, cls, tmp_path):
        p = random_probs(20, 3, 4, seed=2)
        scorer = cls()
        assert isinstance(scorer, ScoreMethod)
        assert scorer.fit(p, np.zeros(20, int), COSTS3, 2.0, seed=3) is scorer
        assert scorer.exit_distribution() is None
        torch.save(scorer.state(), tmp_path / "s.pt")
        back = cls.from_state(torch.load(tmp_path / "s.pt", weights_only=True))
        np.testing.assert_array_equal(back.scores(p), scorer.scores(p))
        other = MaxProbScorer if cls is not MaxProbScorer else EntropyScorer
        with pytest.raises(EenetError, match="state must be"):
            cls.from_state(other().state())

    def test_defaults(self):
        assert MaxProbScorer.default_calibration == "geometric"
        assert EntropyScorer.default_calibration == "geometric"
        assert PatienceScorer.default_calibration == "patience"

    def test_bad_shapes(self):
        with pytest.raises(EenetError, match="probs must have shape"):
            MaxProbScorer().scores(np.zeros((3, 4)))
        with pytest.raises(EenetError, match="labels must have shape"):
            MaxProbScorer().fit(random_probs(4, 3, 2, 0), np.zeros(3, int), COSTS3, 2.0)
        with pytest.raises(EenetError, match="below the cheapest"):
            MaxProbScorer().fit(random_probs(4, 3, 2, 0), np.zeros(4, int), COSTS3, 0.5)


class TestRegistry:
    def test_names_and_aliases(self):
        pairs = {"maxprob": "maxprob", "msdnet": "maxprob", "entropy": "entropy",
                 "branchynet": "entropy", "patience": "patience", "pabee": "patience"}
        for alias, name in pairs.items():
            assert canonical_method(alias) == name
            assert SCORERS[alias].name == name
        assert canonical_method(" MSDNet ") == "maxprob"

    def test_unknown_lists_valid(self):
        with pytest.raises(EenetError, match="choose one of: branchynet, entropy, maxprob"):
            canonical_method("ee")

    def test_registered_later(self, monkeypatch):
        class Learned:
            name = "eenet"

        monkeypatch.setitem(SCORERS, "eenet", Learned)
        assert canonical_method("EENet") == "eenet"


class TestPatience:
    def test_run_lengths_vs_loop(self):
        rng = np.random.default_rng(0)
        preds = rng.integers(0, 3, (200, 5))
        ref = np.ones_like(preds)
        for i in range(200):
            for k in range(1, 5):
                ref[i, k] = ref[i, k - 1] + 1 if preds[i, k] == preds[i, k - 1] else 1
        np.testing.assert_array_equal(run_lengths(preds), ref)

    def test_toy_exits(self):
        np.testing.assert_array_equal(patience_exits(TOY_PREDS, 0), [0] * 6)
        np.testing.assert_array_equal(patience_exits(TOY_PREDS, 1), [1, 2, 2, 1, 1, 2])
        np.testing.assert_array_equal(patience_exits(TOY_PREDS, 2), [2] * 6)

    @pytest.mark.parametrize("budget, t, mix", [(1.0, 0, 0.0), (2.0, 0, 0.5),
                                                (3.0, 1, 0.0), (3.5, 1, 0.5), (4.0, 2, 0.0)])
    def test_toy_calibration(self, budget, t, mix):
        calib = calibrate_patience(TOY_PREDS, COSTS3, budget, seed=7, guard=False)
        assert calib["cost_by_patience"] == [1.0, 3.0, 4.0]
        assert calib["patience"] == t
        assert calib["mix"] == pytest.approx(mix)
        assert calib["expected_cost"] == pytest.approx(budget)
        assert np.isnan(calib["val_accuracy"])
        # The documented draw: patience t+1 where default_rng(seed).random(n) < mix.
        use_next = np.random.default_rng(7).random(6) < mix
        expected = np.where(use_next, patience_exits(TOY_PREDS, min(t + 1, 2)),
                            patience_exits(TOY_PREDS, t))
        np.testing.assert_array_equal(apply_patience(TOY_PREDS, calib), expected)
        assert calib["val_cost"] == pytest.approx(COSTS3[expected].mean())
        assert sum(calib["fractions"]) == pytest.approx(1.0)

    def test_mixing_meets_budget_on_average(self):
        rng = np.random.default_rng(1)
        preds = np.where(rng.random((20000, 4)) < 0.7, 1, rng.integers(0, 5, (20000, 4)))
        costs = np.array([1.0, 2.0, 3.0, 4.0])
        correct = rng.random((20000, 4)) < 0.5
        calib = calibrate_patience(preds, costs, 2.2, seed=0, guard=False, correct=correct)
        assert 0 < calib["mix"] < 1
        assert calib["val_cost"] == pytest.approx(2.2, rel=0.01)
        assert 0 <= calib["val_accuracy"] <= 1
        exits = apply_patience(preds, calib)
        assert np.bincount(exits, minlength=4).sum() == 20000
        np.testing.assert_array_equal(exits, apply_patience(preds, calib, seed=0))

    def test_guard_lowers_target(self):
        rng = np.random.default_rng(2)
        preds = np.where(rng.random((3000, 4)) < 0.6, 1, rng.integers(0, 5, (3000, 4)))
        costs = np.array([1.0, 2.0, 3.0, 4.0])
        calib = calibrate_patience(preds, costs, 2.5, seed=0, n_boot=8)
        assert costs[0] <= calib["target"] < 2.5
        assert calib["guard"]["margin"] > 0
        assert calib["expected_cost"] == pytest.approx(calib["target"])

    def test_plain_containers(self, tmp_path):
        calib = calibrate_patience(TOY_PREDS, COSTS3, 2.0, guard=False)
        torch.save(calib, tmp_path / "p.pt")
        back = torch.load(tmp_path / "p.pt", weights_only=True)
        np.testing.assert_array_equal(apply_patience(TOY_PREDS, back),
                                      apply_patience(TOY_PREDS, calib))

    def test_generic_modes_on_patience_scores(self):
        probs = random_probs(600, 3, 2, seed=3)
        scores = PatienceScorer().scores(probs)
        correct = probs.argmax(axis=2) == 0
        th = calibrate(scores, correct, COSTS3, 2.0, mode="geometric", guard=False)
        assert th.val_cost <= 2.0 * (1 + 1e-9)

    def test_bad_input(self):
        with pytest.raises(EenetError, match="integer class indices"):
            calibrate_patience(TOY_PREDS.astype(float), COSTS3, 2.0)
        with pytest.raises(EenetError, match="calib must be"):
            apply_patience(TOY_PREDS, {"mix": 0.5})


class TestStatic:
    @pytest.mark.parametrize("budget, k", [(1.0, 0), (1.99, 0), (2.0, 1), (3.9, 1),
                                           (4.0, 2), (10.0, 2)])
    def test_deepest_fitting_exit(self, budget, k):
        assert static_exit(COSTS3, budget) == k
        exits = apply_thresholds(np.zeros((5, 3)), static_thresholds(COSTS3, budget))
        np.testing.assert_array_equal(exits, k)

    def test_below_cheapest(self):
        with pytest.raises(EenetError, match="below the cheapest"):
            static_exit(COSTS3, 0.9)


def brute_force_oracle(correct, costs, budget):
    n, k = correct.shape
    best = 0
    for assign in itertools.product(range(k), repeat=n):
        if costs[list(assign)].sum() <= n * budget * (1 + 1e-9):
            best = max(best, int(correct[np.arange(n), assign].sum()))
    return best


class TestOracle:
    @given(n=st.integers(1, 6), seed=st.integers(0, 10**6), q=st.floats(0, 1.2))
    @settings(max_examples=60, deadline=None)
    def test_matches_brute_force(self, n, seed, q):
        rng = np.random.default_rng(seed)
        correct = rng.random((n, 3)) < rng.random(3)
        costs = np.cumsum(rng.integers(0, 4, 3).astype(float)) + 1.0
        budget = costs[0] + q * (costs[-1] - costs[0])
        exits = oracle_exits(correct, costs, budget)
        assert exits.shape == (n,)
        assert costs[exits].mean() <= budget * (1 + 1e-9)
        assert int(correct[np.arange(n), exits].sum()) == brute_force_oracle(correct, costs,
                                                                             budget)

    def test_hopeless_samples_go_first(self):
        correct = np.array([[False, False, False], [False, False, True], [True, True, True]])
        np.testing.assert_array_equal(oracle_exits(correct, COSTS3, 10.0), [0, 2, 0])
        np.testing.assert_array_equal(oracle_exits(correct, COSTS3, 1.0), [0, 0, 0])

    def test_bad_input(self):
        with pytest.raises(EenetError, match="below the cheapest"):
            oracle_exits(np.ones((2, 3), bool), COSTS3, 0.5)
        with pytest.raises(EenetError, match="correct must have shape"):
            oracle_exits(np.ones(3, bool), COSTS3, 2.0)
