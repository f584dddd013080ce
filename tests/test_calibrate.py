"""Thresholds, quotas, budget-meeting distributions, the search and the guard."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from eenet._validation import EenetError
from eenet.calibrate import (Thresholds, apply_thresholds, calibrate, geometric_fractions,
                             guard_target, quota_thresholds, search_thresholds,
                             tilt_fractions)

COSTS4 = np.array([1.0, 1.5, 5.0, 6.0])


def synthetic(n: int, seed: int, costs=COSTS4, skill=(0.5, 0.7, 0.78, 0.85),
              noise: float = 0.1):
    """Scores that track correctness: each sample has a difficulty d in [0, 1];
    exit k is right when d (plus noise) is below its skill, and its score is a
    noisy sigmoid of the margin."""
    rng = np.random.default_rng(seed)
    k = len(costs)
    skill = np.interp(np.linspace(0, 1, k), np.linspace(0, 1, len(skill)), skill)
    d = rng.random(n)[:, None]
    correct = d + rng.normal(0, noise, (n, k)) < skill
    scores = 1 / (1 + np.exp(-(6 * (skill - d) + rng.normal(0, 0.7, (n, k)))))
    return scores, correct, np.asarray(costs, dtype=np.float64)


def loop_exits(scores, thresholds):
    """Plain-loop reference for apply_thresholds."""
    n, k = scores.shape
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = k - 1
        for j in range(k - 1):
            if scores[i, j] >= thresholds[j]:
                out[i] = j
                break
    return out


def brute_quota_exits(scores, fractions, cumulative=True):
    """Reference for quota_thresholds: at each exit, among the samples left,
    admit the largest top group (by score, whole tie groups only) that does
    not exceed the quota."""
    n, k = scores.shape
    exits = np.full(n, k - 1)
    left = list(range(n))
    done = 0
    for j in range(k - 1):
        if cumulative:
            quota = math.floor(sum(fractions[:j + 1]) * n + 1e-9) - done
        else:
            quota = math.floor(fractions[j] * n + 1e-9)
        quota = max(0, quota)
        best = []
        for t in sorted({scores[i, j] for i in left}, reverse=True):
            group = [i for i in left if scores[i, j] >= t]
            if len(group) > quota:
                break
            best = group
        for i in best:
            exits[i] = j
        left = [i for i in left if i not in best]
        done += len(best)
    return exits


def cost_of(scores, thresholds, costs):
    return float(costs[apply_thresholds(scores, thresholds)].mean())


def acc_of(scores, thresholds, correct):
    e = apply_thresholds(scores, thresholds)
    return float(correct[np.arange(e.size), e].mean())


score_arrays = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 12), st.integers(1, 4)),
    elements=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) | st.floats(0, 1))


class TestApplyThresholds:
    @given(scores=score_arrays, data=st.data())
    @settings(max_examples=80, deadline=None)
    def test_matches_loop(self, scores, data):
        k = scores.shape[1]
        th = np.array(data.draw(st.lists(
            st.sampled_from([-np.inf, np.inf, 0.0, 0.5, 1.0]) | st.floats(0, 1),
            min_size=k, max_size=k)))
        exits = apply_thresholds(scores, th)
        np.testing.assert_array_equal(exits, loop_exits(scores, th))
        assert exits.dtype == np.int64
        assert np.bincount(exits, minlength=k).sum() == scores.shape[0]

    def test_last_threshold_ignored(self):
        s = np.array([[0.1, 0.1], [0.2, 0.0]])
        np.testing.assert_array_equal(apply_thresholds(s, [np.inf, np.inf]), [1, 1])
        np.testing.assert_array_equal(apply_thresholds(s, [0.15, np.inf]), [1, 0])

    def test_bad_input(self):
        with pytest.raises(EenetError, match="thresholds must have shape"):
            apply_thresholds(np.zeros((3, 2)), [0.5])
        with pytest.raises(EenetError, match="non-finite"):
            apply_thresholds(np.array([[np.nan, 0.0]]), [0.5, 0.5])
        with pytest.raises(EenetError, match="NaN"):
            apply_thresholds(np.zeros((1, 2)), [np.nan, 0.5])


class TestQuotaThresholds:
    @given(scores=score_arrays, data=st.data(), cumulative=st.booleans())
    @settings(max_examples=150, deadline=None)
    def test_matches_brute_force_with_ties(self, scores, data, cumulative):
        k = scores.shape[1]
        raw = np.array(data.draw(st.lists(st.integers(0, 5), min_size=k, max_size=k)), float)
        if raw.sum() == 0:
            raw[-1] = 1
        fr = raw / raw.sum()
        th = quota_thresholds(scores, fr, cumulative=cumulative)
        exits = apply_thresholds(scores, th)
        np.testing.assert_array_equal(exits, brute_quota_exits(scores, fr, cumulative))
        assert th[-1] == -np.inf

    @pytest.mark.parametrize("seed", range(5))
    def test_heavy_ties_never_exceed_quota(self, seed):
        rng = np.random.default_rng(seed)
        n = 500
        scores = rng.integers(0, 4, (n, 4)).astype(float)  # 4 distinct values per exit
        fr = np.array([0.3, 0.2, 0.1, 0.4])
        th = quota_thresholds(scores, fr, cumulative=False)
        counts = np.bincount(apply_thresholds(scores, th), minlength=4)
        assert np.all(counts[:3] <= np.floor(fr[:3] * n))
        assert counts.sum() == n
        th = quota_thresholds(scores, fr)
        cum = np.cumsum(np.bincount(apply_thresholds(scores, th), minlength=4))
        assert np.all(cum[:3] <= np.floor(np.cumsum(fr)[:3] * n + 1e-9))

    def test_exact_counts_without_ties(self):
        rng = np.random.default_rng(0)
        scores = rng.random((1000, 4))
        fr = np.array([0.123, 0.2, 0.377, 0.3])
        counts = np.bincount(apply_thresholds(scores, quota_thresholds(
            scores, fr, cumulative=False)), minlength=4)
        np.testing.assert_array_equal(counts[:3], np.floor(fr[:3] * 1000))
        counts = np.bincount(apply_thresholds(scores, quota_thresholds(scores, fr)),
                             minlength=4)
        np.testing.assert_array_equal(np.cumsum(counts)[:3],
                                      np.floor(np.cumsum(fr)[:3] * 1000 + 1e-9))

    def test_zero_quota_is_inf_and_top_scores_leave(self):
        s = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.7, 0.0], [0.1, 0.3, 0.0]])
        th = quota_thresholds(s, np.array([0.0, 0.5, 0.5]))
        assert th[0] == np.inf
        assert th[1] == 0.7
        np.testing.assert_array_equal(apply_thresholds(s, th), [2, 1, 1, 2])

    def test_bad_fractions(self):
        with pytest.raises(EenetError, match="sum to 1"):
            quota_thresholds(np.zeros((3, 2)), [0.5, 0.6])
        with pytest.raises(EenetError, match="non-negative"):
            quota_thresholds(np.zeros((3, 2)), [1.5, -0.5])
        with pytest.raises(EenetError, match="shape"):
            quota_thresholds(np.zeros((3, 2)), [1.0])


class TestGeometricFractions:
    @pytest.mark.parametrize("costs", [[1.0, 2.0, 3.0, 4.0], [1.0, 1.5, 5.0, 6.0],
                                       [0.0, 0.1, 0.1, 10.0], [2.0, 3.0]])
    @pytest.mark.parametrize("q", [1e-6, 0.01, 0.3, 0.5, 0.9, 0.999999])
    def test_meets_budget(self, costs, q):
        costs = np.array(costs)
        budget = costs[0] + q * (costs[-1] - costs[0])
        if budget <= 0:
            pytest.skip("budget must be positive")
        p = geometric_fractions(costs, budget)
        assert abs(p @ costs - budget) <= 1e-9 * budget
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
        assert np.all(p >= 0)
        ratios = p[1:] / p[:-1]
        if np.all(p > 1e-250):
            np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)  # p_k ~ g^k

    def test_monotone_in_budget(self):
        budgets = np.linspace(1.0, 6.0, 40)
        cdfs = np.array([np.cumsum(geometric_fractions(COSTS4, b)) for b in budgets])
        assert np.all(np.diff(cdfs, axis=0) <= 1e-12)  # mass moves to deeper exits
        means = [geometric_fractions(COSTS4, b) @ COSTS4 for b in budgets]
        assert np.all(np.diff(means) > 0)

    def test_edges(self):
        np.testing.assert_array_equal(geometric_fractions(COSTS4, 1.0), [1, 0, 0, 0])
        np.testing.assert_array_equal(geometric_fractions(COSTS4, 6.0), [0, 0, 0, 1])
        with pytest.warns(UserWarning, match="above the last exit"):
            np.testing.assert_array_equal(geometric_fractions(COSTS4, 7.0), [0, 0, 0, 1])
        with pytest.raises(EenetError, match="below the cheapest"):
            geometric_fractions(COSTS4, 0.5)


class TestTiltFractions:
    @pytest.mark.parametrize("budget", [1.01, 2.0, 3.3, 5.9])
    def test_hits_budget(self, budget):
        f = np.array([0.1, 0.4, 0.3, 0.2])
        out = tilt_fractions(f, COSTS4, budget)
        assert abs(out @ COSTS4 - budget) <= 1e-9 * budget
        # An exponential tilt: log(out/f) is affine in the cost.
        slope = np.diff(np.log(out / f)) / np.diff(COSTS4)
        np.testing.assert_allclose(slope, slope[0], rtol=1e-6, atol=1e-9)

    def test_identity_at_own_cost(self):
        f = np.array([0.1, 0.4, 0.3, 0.2])
        np.testing.assert_allclose(tilt_fractions(f, COSTS4, f @ COSTS4), f, atol=1e-9)

    def test_zero_mass_stays_zero(self):
        f = np.array([0.0, 0.5, 0.0, 0.5])
        out = tilt_fractions(f, COSTS4, 3.0)
        assert out[0] == 0 and out[2] == 0
        assert abs(out @ COSTS4 - 3.0) <= 1e-9

    def test_unreachable_warns_with_nearest(self):
        f = np.array([0.0, 0.5, 0.5, 0.0])
        with pytest.warns(UserWarning, match=r"nearest reachable cost is 1\.5"):
            out = tilt_fractions(f, COSTS4, 1.2)
        np.testing.assert_array_equal(out, [0, 1, 0, 0])
        with pytest.warns(UserWarning, match=r"nearest reachable cost is 5\b"):
            out = tilt_fractions(f, COSTS4, 5.5)
        np.testing.assert_array_equal(out, [0, 0, 1, 0])

    def test_small_cost_gap_needs_large_tau(self):
        costs = np.array([1.0, 1.0 + 1e-6, 2.0])
        f = np.array([0.01, 0.01, 0.98])
        out = tilt_fractions(f, costs, 1.0 + 5e-7)
        assert abs(out @ costs - (1.0 + 5e-7)) <= 1e-9


class TestSearchThresholds:
    @pytest.mark.parametrize("budget", [1.2, 2.0, 3.0, 4.5])
    def test_fits_budget_and_beats_geometric(self, budget):
        s, c, costs = synthetic(3000, seed=1)
        th = search_thresholds(s, c, costs, budget)
        assert cost_of(s, th, costs) <= budget * (1 + 1e-9)
        geo = calibrate(s, c, costs, budget, mode="geometric", guard=False)
        assert acc_of(s, th, c) >= geo.val_accuracy
        assert th[-1] == -np.inf

    def test_beats_a_given_start(self):
        s, c, costs = synthetic(2000, seed=2)
        init = quota_thresholds(s, np.array([0.5, 0.2, 0.1, 0.2]))
        budget = cost_of(s, init, costs)
        th = search_thresholds(s, c, costs, budget, init=init)
        assert acc_of(s, th, c) >= acc_of(s, init, c)
        assert cost_of(s, th, costs) <= budget * (1 + 1e-9)

    def test_fast_at_10k(self):
        s, c, costs = synthetic(10_000, seed=3)
        search_thresholds(s[:500], c[:500], costs, 2.0)  # warm-up
        t0 = time.perf_counter()
        th = search_thresholds(s, c, costs, 2.0)
        assert time.perf_counter() - t0 < 2.0
        assert cost_of(s, th, costs) <= 2.0 * (1 + 1e-9)

    def test_full_budget_maximises_accuracy(self):
        s, c, costs = synthetic(2000, seed=4)
        th = search_thresholds(s, c, costs, costs[-1])
        assert acc_of(s, th, c) >= c[:, -1].mean()

    def test_seeded(self):
        s, c, costs = synthetic(2000, seed=5)
        np.testing.assert_array_equal(search_thresholds(s, c, costs, 2.5, seed=3),
                                      search_thresholds(s, c, costs, 2.5, seed=3))


class TestGuard:
    def test_target_between_cheapest_and_budget(self):
        s, c, costs = synthetic(2000, seed=6)

        def fit(sc, co, cs, b):
            return quota_thresholds(sc, geometric_fractions(cs, b))

        target = guard_target(s, c, costs, 2.0, fit, seed=0, n_boot=10)
        assert costs[0] <= target < 2.0
        assert target == guard_target(s, c, costs, 2.0, fit, seed=0, n_boot=10)
        # A bigger unseen split needs a smaller margin.
        assert guard_target(s, c, costs, 2.0, fit, n_boot=10, n_eval=10**9) > target

    def test_degenerate_budget(self):
        s, c, costs = synthetic(500, seed=7)
        target = guard_target(s, c, costs, costs[0], lambda *a: quota_thresholds(
            a[0], geometric_fractions(a[2], a[3])), n_boot=5)
        assert target == costs[0]

    def test_bad_arguments(self):
        s, c, costs = synthetic(100, seed=8)
        with pytest.raises(EenetError, match="n_boot"):
            guard_target(s, c, costs, 2.0, lambda *a: None, n_boot=1)
        with pytest.raises(EenetError, match="level"):
            guard_target(s, c, costs, 2.0, lambda *a: None, level=1.0)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["geometric", "search"])
    def test_reduces_overshoot_on_fresh_data(self, mode):
        budgets = [1.3, 2.0, 3.0]
        over = {False: [], True: []}
        ratio = {False: [], True: []}
        for seed in range(40 if mode == "geometric" else 15):
            s, c, costs = synthetic(3000, seed=100 + seed)
            s_new, _, _ = synthetic(3000, seed=10_000 + seed)
            for b in budgets:
                for guard in (False, True):
                    th = calibrate(s, c, costs, b, mode=mode, guard=guard, seed=seed)
                    r = cost_of(s_new, th.values, costs) / b
                    over[guard].append(r > 1)
                    ratio[guard].append(r)
        rate_off, rate_on = np.mean(over[False]), np.mean(over[True])
        assert rate_on <= 0.5 * rate_off
        assert rate_on <= 0.25
        # Not needlessly conservative: the guarded policy still spends most of it.
        assert np.mean(ratio[True]) >= 0.95


class TestThresholdsRecord:
    def test_round_trip_plain(self, tmp_path):
        s, c, costs = synthetic(800, seed=9)
        th = calibrate(s, c, costs, 2.0, mode="geometric", n_boot=4)
        d = th.to_dict()
        for v in d["values"] + d["fractions"]:
            assert type(v) is float
        torch.save(d, tmp_path / "t.pt")
        back = Thresholds.from_dict(torch.load(tmp_path / "t.pt", weights_only=True))
        np.testing.assert_array_equal(back.values, th.values)
        np.testing.assert_array_equal(back.fractions, th.fractions)
        assert back.to_dict() == d
        assert back.values[-1] == -np.inf

    def test_from_dict_errors(self):
        with pytest.raises(EenetError, match="lack"):
            Thresholds.from_dict({"values": [1.0]})
        with pytest.raises(EenetError, match="dict"):
            Thresholds.from_dict([1, 2])


class TestCalibrate:
    @pytest.mark.parametrize("mode", ["assignment", "geometric", "search"])
    @pytest.mark.parametrize("guard", [False, True])
    def test_meets_target(self, mode, guard):
        s, c, costs = synthetic(1500, seed=10)
        fr = np.array([0.4, 0.3, 0.2, 0.1]) if mode == "assignment" else None
        th = calibrate(s, c, costs, 2.5, mode=mode, fractions=fr, guard=guard, n_boot=5)
        exits = th.apply(s)
        assert np.bincount(exits, minlength=4).sum() == 1500
        np.testing.assert_allclose(th.fractions, np.bincount(exits, minlength=4) / 1500)
        assert th.val_cost <= th.target * (1 + 1e-9)
        assert costs[0] <= th.target <= 2.5
        assert (th.target < 2.5) == guard
        assert th.mode == mode
        if mode == "search":
            assert th.predicted_cost is None
        else:
            assert th.predicted_cost <= th.target * (1 + 1e-9)
            assert th.val_cost == pytest.approx(th.predicted_cost, rel=0.01)
            assert "guard" in th.diagnostics or not guard

    def test_assignment_tilts_to_budget(self):
        s, c, costs = synthetic(4000, seed=11)
        fr = np.array([0.7, 0.1, 0.1, 0.1])  # costs 1.85, below the budget
        th = calibrate(s, c, costs, 3.0, mode="assignment", fractions=fr, guard=False)
        # Floor rounding may need the distribution's budget a hair lower.
        assert th.predicted_cost == pytest.approx(3.0, rel=1e-3)
        assert th.predicted_cost == pytest.approx(th.diagnostics["distribution_budget"],
                                                  rel=1e-9)
        assert th.val_cost == pytest.approx(3.0, rel=2e-3)

    def test_assignment_unreachable_warns_and_floors(self):
        s, c, costs = synthetic(1000, seed=12)
        with pytest.warns(UserWarning, match="cannot meet the target"):
            th = calibrate(s, c, costs, 1.2, mode="assignment",
                           fractions=[0.0, 0.5, 0.5, 0.0], guard=False)
        assert th.val_cost <= 1.2 * (1 + 1e-9)

    def test_heavy_ties_still_fit(self):
        s, c, costs = synthetic(2000, seed=13)
        s = np.round(s, 1)  # 11 distinct score values
        for mode in ("geometric", "assignment"):
            th = calibrate(s, c, costs, 2.2, mode=mode, fractions=[0.25] * 4, guard=False)
            assert th.val_cost <= 2.2 * (1 + 1e-9)

    def test_full_budget(self):
        s, c, costs = synthetic(1000, seed=14)
        with pytest.warns(UserWarning, match="above the last exit"):
            th = calibrate(s, c, costs, 7.0, mode="geometric")
        assert np.all(th.apply(s) == 3) and th.target == 7.0
        with pytest.warns(UserWarning, match="above the last exit"):
            th = calibrate(s, c, costs, 7.0, mode="search")
        assert th.val_accuracy >= c[:, -1].mean()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            th = calibrate(s, c, costs, 6.0, mode="geometric")  # exactly the full model
        assert np.all(th.apply(s) == 3)

    def test_bad_input(self):
        s, c, costs = synthetic(100, seed=15)
        with pytest.raises(EenetError, match="needs fractions"):
            calibrate(s, c, costs, 2.0, mode="assignment")
        with pytest.raises(EenetError, match="choose one of"):
            calibrate(s, c, costs, 2.0, mode="quota")
        with pytest.raises(EenetError, match="below the cheapest"):
            calibrate(s, c, costs, 0.5, mode="geometric")
        with pytest.raises(EenetError, match="correct must have shape"):
            calibrate(s, c[:, :2], costs, 2.0, mode="geometric")

    def test_single_exit(self):
        th = calibrate(np.zeros((5, 1)), np.ones((5, 1), bool), [1.0], 1.0, mode="search")
        np.testing.assert_array_equal(th.apply(np.zeros((5, 1))), 0)

    @given(n=st.integers(1, 40), k=st.integers(2, 4), seed=st.integers(0, 10**6),
           mode=st.sampled_from(["assignment", "geometric", "search"]),
           q=st.floats(0, 1), ties=st.booleans())
    @settings(max_examples=40, deadline=None)
    def test_every_sample_exits_once(self, n, k, seed, mode, q, ties):
        rng = np.random.default_rng(seed)
        s = rng.random((n, k))
        if ties:
            s = np.round(s * 2) / 2
        c = rng.random((n, k)) < 0.6
        costs = np.cumsum(rng.random(k) + 0.1)
        budget = costs[0] + q * (costs[-1] - costs[0])
        fr = rng.dirichlet(np.ones(k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            th = calibrate(s, c, costs, budget, mode=mode, fractions=fr,
                           guard=n >= 20 and seed % 4 == 0, n_boot=3, seed=seed)
        exits = th.apply(s)
        assert exits.shape == (n,) and exits.min() >= 0 and exits.max() < k
        assert np.bincount(exits, minlength=k).sum() == n
        assert th.val_cost <= budget * (1 + 1e-9)


class TestSearchCrossCheck:
    """`search` keeps its thresholds only where held-out halves confirm they win."""

    def _geometric(self, scores, costs, budget):
        th = calibrate(scores, np.zeros_like(scores, dtype=bool), costs, budget,
                       mode="geometric", guard=False)
        return th.values

    def test_informative_scores_keep_the_search(self):
        scores, correct, _ = synthetic(4000, seed=3)
        th = calibrate(scores, correct, COSTS4, 2.5, mode="search", guard=False)
        cv = th.diagnostics["search_cv"]
        assert cv["kept"] == "search"
        assert cv["held_out_correct"]["search"] > cv["held_out_correct"]["geometric"]
        np.testing.assert_array_equal(
            th.values, search_thresholds(scores, correct, COSTS4, 2.5, seed=0))

    def test_fallback_returns_the_geometric_thresholds(self):
        # scores that carry no information about correctness: searched thresholds can
        # only fit noise, and whichever rule the check keeps is returned exactly
        rng = np.random.default_rng(5)
        scores = rng.random((3000, 4))
        correct = rng.random((3000, 4)) < np.array([0.5, 0.6, 0.7, 0.8])
        th = calibrate(scores, correct, COSTS4, 2.5, mode="search", guard=False)
        cv = th.diagnostics["search_cv"]
        expected = (search_thresholds(scores, correct, COSTS4, 2.5, seed=0)
                    if cv["kept"] == "search" else self._geometric(scores, COSTS4, 2.5))
        np.testing.assert_array_equal(th.values, expected)
        assert th.val_cost <= 2.5 + 1e-9

    def test_off_switch(self):
        scores, correct, _ = synthetic(500, seed=4)
        th = calibrate(scores, correct, COSTS4, 2.5, mode="search", guard=False, cv_repeats=0)
        assert "search_cv" not in th.diagnostics
