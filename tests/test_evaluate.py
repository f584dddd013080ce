"""eenet.evaluate: metrics against loops, risks against hand-computed cases, EvalResult, and
the oracle against brute force."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet._validation import EenetError
from eenet.cache import ExitCache
from eenet.evaluate import (RISKS, EvalResult, evaluate_exits, evaluate_oracle, exit_accuracy,
                            oracle_exits, risk_table)
from eenet.policy import ExitPolicy
from eenet.synthetic import synthetic_cache

COSTS3 = np.array([1.0, 2.0, 4.0])


def _loop_exit_accuracy(correct, exits):
    k = correct.shape[1]
    out = []
    for j in range(k):
        rows = [i for i in range(len(exits)) if exits[i] == j]
        out.append(sum(bool(correct[i, j]) for i in rows) / len(rows) if rows else math.nan)
    return np.array(out)


# A hand-made cache: 3 samples, 3 exits, 2 classes, logits = log-probabilities.
HAND_PROBS = np.array([
    [[0.75, 0.25], [0.25, 0.75], [0.9, 0.1]],  # label 0: right, wrong, right
    [[0.75, 0.25], [0.25, 0.75], [0.4, 0.6]],  # label 1: wrong, right, right
    [[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]],      # label 0: wrong, right, wrong
])
HAND_LABELS = np.array([0, 1, 0])
# ||p - onehot(y)||^2 = 2 (1 - p_y)^2 with two classes
HAND_BRIER = np.array([[0.125, 1.125, 0.02], [1.125, 0.125, 0.32], [1.28, 0.32, 0.98]])
HAND_CONSISTENCY = np.array([[0, 1, 0], [1, 0, 0], [0, 1, 0]], float)
HAND_GAP = np.array([[0, 1, 0], [1, 0, 0], [0, -1, 0]], float)


@pytest.fixture
def hand_cache():
    return ExitCache(np.log(HAND_PROBS).astype(np.float32), HAND_LABELS, COSTS3)


class TestExitAccuracy:
    @pytest.mark.parametrize("seed", range(4))
    def test_against_loop(self, seed):
        rng = np.random.default_rng(seed)
        correct = rng.random((50, 4)) < 0.6
        exits = rng.choice([0, 1, 3], size=50)  # exit 2 unused
        got = exit_accuracy(correct, exits)
        np.testing.assert_allclose(got, _loop_exit_accuracy(correct, exits), rtol=0, atol=1e-15)
        assert math.isnan(got[2])
        np.testing.assert_allclose(exit_accuracy(correct),
                                   [np.mean(correct[:, j]) for j in range(4)], rtol=0,
                                   atol=1e-15)

    @pytest.mark.parametrize("exits, match", [
        (np.array([0.0, 1.0]), "1-D integer array"),
        (np.array([[0, 1]]), "1-D integer array"),
        (np.array([0, 3]), r"exits must lie in \[0, 3\), got \[0, 3\]"),
        (np.array([-1, 0]), r"exits must lie in \[0, 3\)"),
    ])
    def test_bad_exits(self, exits, match):
        with pytest.raises(EenetError, match=match):
            exit_accuracy(np.ones((2, 3), bool), exits)


class TestRiskTable:
    def test_hand_case(self, hand_cache):
        risks = risk_table(hand_cache)
        assert set(risks) == set(RISKS)
        np.testing.assert_array_equal(risks["consistency"], HAND_CONSISTENCY)
        np.testing.assert_array_equal(risks["gap"], HAND_GAP)
        np.testing.assert_allclose(risks["brier"], HAND_BRIER - HAND_BRIER[:, -1:], rtol=0,
                                   atol=1e-6)

    def test_against_loop_and_zero_at_the_last_exit(self):
        cache = synthetic_cache(80, n_exits=4, n_classes=5, seed=3)
        risks = risk_table(cache)
        z = cache.logits.astype(np.float64)
        p = np.exp(z - z.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        pred, ok = cache.predictions(), cache.correct()
        for i in range(cache.n_samples):
            y = cache.labels[i]
            brier = [sum((p[i, j, c] - (c == y)) ** 2 for c in range(5)) for j in range(4)]
            for j in range(4):
                assert risks["consistency"][i, j] == float(pred[i, j] != pred[i, -1])
                assert risks["gap"][i, j] == float(ok[i, -1]) - float(ok[i, j])
                assert risks["brier"][i, j] == pytest.approx(brier[j] - brier[-1], abs=1e-6)
        for kind in RISKS:
            assert risks[kind].shape == (80, 4) and risks[kind].dtype == np.float64
            np.testing.assert_array_equal(risks[kind][:, -1], 0.0)
        assert np.all(np.abs(risks["brier"]) <= 2.0)


class TestEvaluateExits:
    @pytest.mark.parametrize("seed", range(3))
    def test_against_loops(self, seed):
        cache = synthetic_cache(200, n_exits=4, seed=seed)
        rng = np.random.default_rng(seed)
        exits = rng.choice([0, 1, 3], size=200)
        res = evaluate_exits(exits, cache, method="m", budget=3.0)
        ok = cache.correct()
        assert res.accuracy == pytest.approx(np.mean([ok[i, exits[i]] for i in range(200)]),
                                             rel=1e-12)
        assert res.avg_cost == pytest.approx(np.mean([cache.costs[e] for e in exits]),
                                             rel=1e-12)
        counts = [int(np.sum(exits == j)) for j in range(4)]
        assert res.exit_counts == tuple(counts) and sum(res.exit_counts) == 200
        np.testing.assert_allclose(res.exit_fractions, np.array(counts) / 200, rtol=0,
                                   atol=1e-15)
        np.testing.assert_allclose(res.exit_accuracy, _loop_exit_accuracy(ok, exits), rtol=0,
                                   atol=1e-15)
        table = risk_table(cache)
        for kind in RISKS:
            ref = np.mean([table[kind][i, exits[i]] for i in range(200)])
            assert res.risks[kind] == pytest.approx(ref, rel=1e-12, abs=1e-15)
        assert (res.method, res.budget, res.n_samples, res.cost_unit) == ("m", 3.0, 200, "ms")

    def test_hand_case(self, hand_cache):
        res = evaluate_exits(np.array([0, 1, 2]), hand_cache, method="hand", budget=2.0)
        assert res.accuracy == pytest.approx(2 / 3)
        assert res.avg_cost == pytest.approx(7 / 3)
        assert res.risks["consistency"] == 0.0 and res.risks["gap"] == 0.0
        assert res.risks["brier"] == pytest.approx((0.105 - 0.195 + 0.0) / 3, abs=1e-6)
        last = evaluate_exits(np.full(3, 2), hand_cache, method="last", budget=None)
        assert all(v == 0.0 for v in last.risks.values())

    def test_charges_the_given_costs(self, hand_cache):
        res = evaluate_exits(np.array([0, 0, 2]), hand_cache, method="m", budget=None,
                             costs=np.array([1.5, 2.5, 5.0]))
        assert res.avg_cost == pytest.approx((1.5 + 1.5 + 5.0) / 3)

    def test_wrong_length(self, hand_cache):
        with pytest.raises(EenetError, match="exits has 2 entries for 3 samples"):
            evaluate_exits(np.array([0, 1]), hand_cache, method="m", budget=None)


class TestEvalResult:
    @pytest.fixture
    def result(self):
        return EvalResult(method="maxprob", budget=2.0, accuracy=0.75, avg_cost=1.8,
                          cost_unit="ms", exit_fractions=(0.5, 0.5, 0.0),
                          exit_accuracy=(0.5, 1.0, math.nan), exit_counts=(2, 2, 0),
                          n_samples=4, risks={"consistency": 0.25, "gap": 0.0, "brier": 0.1})

    def test_row(self, result):
        row = result.to_row()
        assert list(row) == ["method", "budget", "accuracy", "avg_cost", "exit_fractions",
                             "n_samples", "risk_consistency", "risk_gap", "risk_brier"]
        assert row["exit_fractions"] == "0.5000;0.5000;0.0000"
        assert (row["risk_consistency"], row["risk_gap"], row["risk_brier"]) == (0.25, 0.0, 0.1)

    def test_json_is_plain_and_nan_free(self, result):
        out = result.to_json()
        text = json.dumps(out, allow_nan=False)  # raises on NaN
        assert json.loads(text)["exit_accuracy"] == [0.5, 1.0, None]
        assert out["cost_over_budget"] == pytest.approx(0.9)
        assert out["exit_counts"] == [2, 2, 0] and out["cost_unit"] == "ms"

    def test_table(self, result):
        text = result.format_table()
        assert "budget    2 ms" in text and "(90.0% of budget)" in text
        assert "accuracy  0.7500   (4 samples)" in text
        assert "consistency 0.2500" in text
        assert text.splitlines()[-1].split() == ["2", "0.0000", "0", "-"]

    def test_without_budget(self, result):
        free = dataclasses.replace(result, budget=None)
        assert math.isnan(free.cost_ratio) and free.to_json()["cost_over_budget"] is None
        assert "budget    -" in free.format_table()


# ---------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------
def brute_force_oracle(correct, costs, budget):
    n, k = correct.shape
    best = 0
    for assign in itertools.product(range(k), repeat=n):
        if costs[list(assign)].sum() <= n * budget * (1 + 1e-9):
            best = max(best, int(correct[np.arange(n), assign].sum()))
    return best


class TestOracle:
    @given(n=st.integers(1, 6), k=st.integers(1, 4), seed=st.integers(0, 10**6),
           q=st.floats(0, 1.2))
    @settings(max_examples=80, deadline=None)
    def test_matches_brute_force(self, n, k, seed, q):
        rng = np.random.default_rng(seed)
        correct = rng.random((n, k)) < rng.random(k)
        costs = np.cumsum(rng.integers(0, 4, k).astype(float)) + 1.0
        budget = costs[0] + q * (costs[-1] - costs[0])
        exits = oracle_exits(correct, costs, budget)
        assert exits.shape == (n,) and exits.dtype == np.int64
        assert costs[exits].mean() <= budget * (1 + 1e-9)
        assert int(correct[np.arange(n), exits].sum()) == brute_force_oracle(correct, costs,
                                                                             budget)

    def test_hopeless_samples_stay_at_exit_0_and_right_ones_at_their_cheapest(self):
        correct = np.array([[False, False, False], [False, False, True], [True, True, True],
                            [False, True, True]])
        np.testing.assert_array_equal(oracle_exits(correct, COSTS3, 10.0), [0, 2, 0, 1])
        np.testing.assert_array_equal(oracle_exits(correct, COSTS3, 1.0), [0, 0, 0, 0])
        np.testing.assert_array_equal(oracle_exits(correct, COSTS3, 1.25), [0, 0, 0, 1])

    @pytest.mark.parametrize("args, match", [
        ((np.ones((2, 3), bool), COSTS3, 0.5), "below the cheapest"),
        ((np.ones(3, bool), COSTS3, 2.0), "correct must have shape"),
        ((np.ones((2, 3), bool), COSTS3[:2], 2.0), "costs has 2 values"),
    ])
    def test_bad_input(self, args, match):
        with pytest.raises(EenetError, match=match):
            oracle_exits(*args)

    def test_bounds_every_single_exit_and_policy(self, val_test_caches):
        val, test = val_test_caches
        for budget in (1.5, 3.0, 4.5):
            oracle = evaluate_oracle(test, budget)
            assert oracle.method == "oracle" and oracle.budget == budget
            assert oracle.avg_cost <= budget * (1 + 1e-9)
            ok = test.correct()
            affordable = [j for j in range(test.n_exits) if test.costs[j] <= budget]
            assert oracle.accuracy >= max(ok[:, j].mean() for j in affordable)
            assert oracle.accuracy >= ExitPolicy("maxprob").fit(val, budget).evaluate(
                test).accuracy
        with pytest.raises(EenetError, match="below the cheapest exit's cost 1 ms"):
            evaluate_oracle(test, 0.5)
