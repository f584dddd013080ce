"""eenet.rules: the one Thresholds rule (with per-sample mixing), quotas, geometric and tilted
distributions, the search staircase, the guard, patience, static and the Calibrator."""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from eenet._validation import EenetError
from eenet.rules import CALIBRATIONS, Calibrator, calibrate
from eenet.rules.distributions import (fit_quota, geometric_fractions, quota_thresholds,
                                       tilt_fractions)
from eenet.rules.guard import refit_margin, selection_margins
from eenet.rules.patience import patience_rule
from eenet.rules.search import SearchFamily
from eenet.rules.select import SELECT_REPEATS, ambiguous, choose, fold_splits
from eenet.rules.static import static_rule
from eenet.rules.thresholds import Thresholds, apply_thresholds, mix_draws
from eenet.scores import MaxProbScorer, score_cache
from eenet.scores.confidence import EntropyScorer, PatienceScorer
from eenet.synthetic import synthetic_cache

COSTS4 = np.array([1.0, 1.5, 5.0, 6.0])
COSTS3 = np.array([1.0, 2.0, 4.0])
CHEAP_SECOND = np.array([1.0, 1.1, 5.0, 6.0])  # exit 1 costs little more than exit 0
RTOL = 1e-9  # the library's slack when comparing a cost with a budget


def synthetic(n: int, seed: int, costs=COSTS4, skill=(0.5, 0.7, 0.78, 0.85),
              noise: float = 0.1):
    """Scores that track correctness: each sample has a difficulty d in [0, 1]; exit k is
    right when d (plus noise) is below its skill, and its score is a noisy sigmoid of the
    margin."""
    rng = np.random.default_rng(seed)
    k = len(costs)
    skill = np.interp(np.linspace(0, 1, k), np.linspace(0, 1, len(skill)), skill)
    d = rng.random(n)[:, None]
    correct = d + rng.normal(0, noise, (n, k)) < skill
    scores = 1 / (1 + np.exp(-(6 * (skill - d) + rng.normal(0, 0.7, (n, k)))))
    return scores, correct, np.asarray(costs, dtype=np.float64)


def loop_exits(scores, thresholds):
    """Plain-loop reference: the first exit whose score reaches its threshold; the last
    exit takes everyone left. ``thresholds`` is [n_exits] or [n_samples, n_exits]."""
    n, k = scores.shape
    th = np.broadcast_to(thresholds, (n, k))
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = k - 1
        for j in range(k - 1):
            if scores[i, j] >= th[i, j]:
                out[i] = j
                break
    return out


def brute_quota_exits(scores, fractions, cumulative=True):
    """Reference for quota_thresholds: at each exit, among the samples left, admit the
    largest top group (by score, whole tie groups only) that does not exceed the quota."""
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
threshold_values = st.sampled_from([-np.inf, np.inf, 0.0, 0.5, 1.0]) | st.floats(0, 1)


# ---------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------
class TestMixDraws:
    def test_one_at_a_time_equals_vectorised(self):
        ids = np.array([0, 5, 3, 1_000_003, 17, 5])
        for seed in (0, 1, 42):
            whole = mix_draws(ids, seed)
            one = np.array([mix_draws(np.array([i]), seed)[0] for i in ids])
            np.testing.assert_array_equal(whole, one)
            assert whole[1] == whole[5]  # the same id, the same draw
            assert np.all((whole >= 0) & (whole < 1))
        assert not np.array_equal(mix_draws(ids, 0), mix_draws(ids, 1))

    @pytest.mark.parametrize("start", [0, 1, 977, 123_456])
    @pytest.mark.parametrize("n", [1, 10, 333, 4000])
    @pytest.mark.parametrize("seed", [0, 3])
    def test_share_below_mix_within_two_samples_on_consecutive_ids(self, start, n, seed):
        draws = mix_draws(np.arange(start, start + n), seed)
        for mix in (0.0, 0.01, 0.1, 0.25, 1 / 3, 0.5, 0.77, 0.999, 1.0):
            assert abs(int((draws < mix).sum()) - mix * n) <= 2.0


class TestApplyThresholds:
    @given(scores=score_arrays, data=st.data())
    @settings(max_examples=80, deadline=None)
    def test_matches_loop(self, scores, data):
        k = scores.shape[1]
        th = np.array(data.draw(st.lists(threshold_values, min_size=k, max_size=k)))
        exits = apply_thresholds(scores, th)
        np.testing.assert_array_equal(exits, loop_exits(scores, th))
        assert exits.dtype == np.int64
        assert np.bincount(exits, minlength=k).sum() == scores.shape[0]

    @given(scores=score_arrays, data=st.data())
    @settings(max_examples=50, deadline=None)
    def test_per_sample_thresholds_match_loop(self, scores, data):
        th = np.array(data.draw(hnp.arrays(np.float64, scores.shape, elements=threshold_values)))
        np.testing.assert_array_equal(apply_thresholds(scores, th), loop_exits(scores, th))

    def test_last_threshold_ignored(self):
        s = np.array([[0.1, 0.1], [0.2, 0.0]])
        np.testing.assert_array_equal(apply_thresholds(s, [np.inf, np.inf]), [1, 1])
        np.testing.assert_array_equal(apply_thresholds(s, [0.15, np.inf]), [1, 0])

    def test_non_finite_scores_refused(self):
        with pytest.raises(EenetError, match="scores contains 1 non-finite values"):
            apply_thresholds(np.array([[np.nan, 0.0]]), [0.5, 0.5])
        with pytest.raises(EenetError, match="scores must have shape"):
            apply_thresholds(np.zeros(3), [0.5])

    def test_thresholds_of_the_wrong_length_refused(self):
        with pytest.raises(EenetError, match="thresholds"):
            apply_thresholds(np.zeros((3, 2)), [0.5])


def _random_rule(rng, k, with_alt=True):
    values = rng.choice([-np.inf, np.inf, 0.2, 0.5, 0.8], size=k)
    alt = rng.choice([-np.inf, np.inf, 0.3, 0.5, 0.9], size=k) if with_alt else None
    return Thresholds(values, alt=alt, mix=float(rng.random()) if with_alt else 0.0,
                      mix_seed=int(rng.integers(5)))


class TestThresholds:
    @pytest.mark.parametrize("seed", range(6))
    def test_exits_with_alt_and_mix_against_loop(self, seed):
        rng = np.random.default_rng(seed)
        n, k = 300, 4
        scores = np.round(rng.random((n, k)), 1)
        rule = _random_rule(rng, k)
        ids = rng.permutation(10 * n)[:n]
        ref = np.empty(n, dtype=np.int64)
        for i in range(n):  # one sample at a time, as a runtime would
            use_alt = mix_draws(np.array([ids[i]]), rule.mix_seed)[0] < rule.mix
            th = rule.alt if use_alt else rule.values
            ref[i] = loop_exits(scores[i:i + 1], th)[0]
        np.testing.assert_array_equal(rule.exits(scores, ids), ref)
        np.testing.assert_array_equal(rule.uses_alt(ids),
                                      mix_draws(ids, rule.mix_seed) < rule.mix)

    def test_same_sample_id_same_choice_in_any_order_or_subset(self):
        rng = np.random.default_rng(1)
        rule = Thresholds(np.array([0.5, 0.5, -np.inf]), alt=np.array([0.9, 0.7, -np.inf]),
                          mix=0.4, mix_seed=2)
        n = 500
        scores = rng.random((n, 3))
        ids = np.arange(1000, 1000 + n)
        exits = rule.exits(scores, ids)
        perm = rng.permutation(n)
        np.testing.assert_array_equal(rule.exits(scores[perm], ids[perm]), exits[perm])
        part = perm[:37]
        np.testing.assert_array_equal(rule.exits(scores[part], ids[part]), exits[part])
        assert abs(rule.uses_alt(ids).sum() - 0.4 * n) <= 2

    def test_default_ids_are_positions_and_no_mix_ignores_alt(self):
        rng = np.random.default_rng(2)
        scores = rng.random((50, 3))
        rule = Thresholds(np.array([0.5, 0.5, -np.inf]), alt=np.array([0.9, 0.9, 0.0]), mix=0.5)
        np.testing.assert_array_equal(rule.exits(scores), rule.exits(scores, np.arange(50)))
        plain = Thresholds(np.array([0.5, 0.5, -np.inf]), alt=np.array([0.9, 0.9, 0.0]))
        np.testing.assert_array_equal(plain.exits(scores),
                                      loop_exits(scores, np.array([0.5, 0.5, -np.inf])))
        assert not plain.uses_alt(np.arange(50)).any()

    @pytest.mark.parametrize("kwargs, match", [
        ({"values": [0.5, np.nan]}, "thresholds must not hold NaN"),
        ({"values": [[0.5, 0.1]]}, "thresholds must be a 1-D vector"),
        ({"values": []}, "thresholds must be a 1-D vector"),
        ({"values": [0.5, 0.1], "alt": [0.5]}, "alt thresholds must be a 1-D vector"),
        ({"values": [0.5, 0.1], "alt": [0.5, 0.1], "mix": 1.5}, r"mix must lie in \[0, 1\]"),
        ({"values": [0.5, 0.1], "mix": 0.5}, "mix > 0 needs alt thresholds"),
    ])
    def test_invalid_rules_refused(self, kwargs, match):
        with pytest.raises(EenetError, match=match):
            Thresholds(**kwargs)

    def test_scores_of_another_exit_count_refused(self):
        with pytest.raises(EenetError, match=r"scores must have shape \[n_samples, 3\]"):
            Thresholds(np.array([0.5, 0.5, -np.inf])).exits(np.zeros((4, 2)))

    def test_round_trip_through_a_weights_only_file(self, tmp_path):
        rule = Thresholds(np.array([0.5, np.inf, -np.inf]), alt=np.array([0.7, 0.2, -np.inf]),
                          mix=0.25, mix_seed=3).with_record(
            mode="patience", budget=2.0, target=1.9, val_cost=1.85, val_accuracy=0.7,
            fractions=np.array([0.5, 0.2, 0.3]), diagnostics={"a": np.float64(1.5),
                                                               "b": [np.int64(2)]})
        d = rule.to_dict()
        torch.save(d, tmp_path / "t.pt")
        back = Thresholds.from_dict(torch.load(tmp_path / "t.pt", weights_only=True))
        assert back.to_dict() == d
        np.testing.assert_array_equal(back.values, rule.values)
        np.testing.assert_array_equal(back.alt, rule.alt)
        assert (back.mix, back.mix_seed, back.mode, back.budget) == (0.25, 3, "patience", 2.0)
        assert back.diagnostics == {"a": 1.5, "b": [2]}
        ids = np.arange(40)
        scores = np.random.default_rng(0).random((40, 3))
        np.testing.assert_array_equal(back.exits(scores, ids), rule.exits(scores, ids))

    def test_with_record_keeps_the_rule(self):
        rule = Thresholds(np.array([0.5, -np.inf]), alt=np.array([0.6, -np.inf]), mix=0.5)
        rec = rule.with_record(val_cost=1.5)
        np.testing.assert_array_equal(rec.values, rule.values)
        assert rec.mix == 0.5 and rec.val_cost == 1.5 and math.isnan(rule.val_cost)

    @pytest.mark.parametrize("data, match", [
        ({"values": [1.0], "mix": "x"}, "thresholds are damaged"),
        ({"alt": [1.0]}, "thresholds are missing or damaged"),
        ([1, 2], "thresholds are missing or damaged"),
    ])
    def test_from_dict_errors(self, data, match):
        with pytest.raises(EenetError, match=match):
            Thresholds.from_dict(data)


# ---------------------------------------------------------------------------
# distributions and quotas
# ---------------------------------------------------------------------------
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
        np.testing.assert_array_equal(apply_thresholds(scores, th),
                                      brute_quota_exits(scores, fr, cumulative))
        assert th[-1] == -np.inf

    @pytest.mark.parametrize("seed", range(5))
    def test_heavy_ties_never_exceed_quota(self, seed):
        rng = np.random.default_rng(seed)
        n = 500
        scores = rng.integers(0, 4, (n, 4)).astype(float)  # 4 distinct values per exit
        fr = np.array([0.3, 0.2, 0.1, 0.4])
        counts = np.bincount(apply_thresholds(scores, quota_thresholds(
            scores, fr, cumulative=False)), minlength=4)
        assert np.all(counts[:3] <= np.floor(fr[:3] * n)) and counts.sum() == n
        cum = np.cumsum(np.bincount(apply_thresholds(scores, quota_thresholds(scores, fr)),
                                    minlength=4))
        assert np.all(cum[:3] <= np.floor(np.cumsum(fr)[:3] * n + 1e-9))

    def test_exact_counts_without_ties(self):
        scores = np.random.default_rng(0).random((1000, 4))
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
        assert th[0] == np.inf and th[1] == 0.7
        np.testing.assert_array_equal(apply_thresholds(s, th), [2, 1, 1, 2])

    @pytest.mark.parametrize("fractions, match", [([0.5, 0.6], "sum to 1"),
                                                  ([1.5, -0.5], "non-negative"),
                                                  ([1.0], r"shape \(2,\)")])
    def test_bad_fractions(self, fractions, match):
        with pytest.raises(EenetError, match=match):
            quota_thresholds(np.zeros((3, 2)), fractions)


class TestGeometricFractions:
    @pytest.mark.parametrize("costs", [[1.0, 2.0, 3.0, 4.0], [1.0, 1.5, 5.0, 6.0],
                                       [0.1, 0.2, 0.2, 10.0], [2.0, 3.0]])
    @pytest.mark.parametrize("q", [1e-6, 0.01, 0.3, 0.5, 0.9, 0.999999])
    def test_meets_budget(self, costs, q):
        costs = np.array(costs)
        budget = costs[0] + q * (costs[-1] - costs[0])
        p = geometric_fractions(costs, budget)
        assert abs(p @ costs - budget) <= 1e-9 * budget
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
        assert np.all(p >= 0)
        if np.all(p > 1e-250):
            ratios = p[1:] / p[:-1]
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
        np.testing.assert_array_equal(geometric_fractions(COSTS4, 7.0), [0, 0, 0, 1])
        with pytest.raises(EenetError, match="below the cheapest exit's cost 1"):
            geometric_fractions(COSTS4, 0.5)

    def test_equal_cost_first_exits_send_everyone_to_the_deepest(self):
        np.testing.assert_array_equal(geometric_fractions(np.array([1.0, 1.0, 3.0, 4.0]), 1.0),
                                      [0, 1, 0, 0])
        np.testing.assert_array_equal(
            geometric_fractions(np.array([2.0, 2.0, 2.0, 5.0]), 2.0), [0, 0, 1, 0])


class TestTiltFractions:
    @pytest.mark.parametrize("budget", [1.01, 2.0, 3.3, 5.9])
    def test_hits_budget_with_an_exponential_tilt(self, budget):
        f = np.array([0.1, 0.4, 0.3, 0.2])
        out = tilt_fractions(f, COSTS4, budget)
        assert abs(out @ COSTS4 - budget) <= 1e-9 * budget
        slope = np.diff(np.log(out / f)) / np.diff(COSTS4)  # log(out/f) affine in the cost
        np.testing.assert_allclose(slope, slope[0], rtol=1e-6, atol=1e-9)

    def test_identity_at_own_cost(self):
        f = np.array([0.1, 0.4, 0.3, 0.2])
        np.testing.assert_allclose(tilt_fractions(f, COSTS4, f @ COSTS4), f, rtol=0, atol=1e-9)

    def test_zero_mass_stays_zero(self):
        out = tilt_fractions(np.array([0.0, 0.5, 0.0, 0.5]), COSTS4, 3.0)
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
        out = tilt_fractions(np.array([0.01, 0.01, 0.98]), costs, 1.0 + 5e-7)
        assert abs(out @ costs - (1.0 + 5e-7)) <= 1e-9


class TestFitQuota:
    @pytest.mark.parametrize("decimals", [1, 2, None])
    @pytest.mark.parametrize("target", [1.2, 2.2, 4.0])
    def test_realized_cost_fits_even_with_tied_scores(self, decimals, target):
        s, _, costs = synthetic(2000, seed=13)
        if decimals is not None:
            s = np.round(s, decimals)
        th, dist, dist_budget = fit_quota(s, costs, target,
                                          lambda b: geometric_fractions(costs, b))
        assert cost_of(s, th, costs) <= target * (1 + RTOL)
        assert costs[0] <= dist_budget <= target
        np.testing.assert_allclose(dist @ costs, dist_budget, rtol=1e-9)
        np.testing.assert_array_equal(th, quota_thresholds(s, dist))

    def test_repairs_only_when_the_first_fit_overshoots(self):
        s, _, costs = synthetic(1000, seed=14)
        fixed = np.array([0.5, 0.25, 0.125, 0.125])  # whole quotas of 1000 samples
        _, dist, dist_budget = fit_quota(s, costs, 2.25, lambda b: fixed)
        assert dist_budget == 2.25 and float(fixed @ costs) == 2.25
        # floor rounding keeps a few samples too long: the distribution's budget drops
        th, dist, dist_budget = fit_quota(s, costs, 3.0,
                                          lambda b: geometric_fractions(costs, b))
        assert float(geometric_fractions(costs, 3.0) @ costs) == pytest.approx(3.0)
        assert cost_of(s, quota_thresholds(s, geometric_fractions(costs, 3.0)), costs) > 3.0
        assert dist_budget < 3.0 and cost_of(s, th, costs) <= 3.0 * (1 + RTOL)


# ---------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_problem():
    s, c, costs = synthetic(1500, seed=1)
    return s, c, costs, SearchFamily(s, c, costs, seed=0)


class TestSearchFamily:
    def test_staircase_strictly_increasing_and_true_on_the_data(self, family_problem):
        s, c, costs, fam = family_problem
        assert fam.n_steps > 20
        assert np.all(np.diff(fam.step_cost) > 0) and np.all(np.diff(fam.step_accuracy) > 0)
        for i in range(fam.n_steps):
            th = fam.step(i)
            assert th[-1] == -np.inf
            assert cost_of(s, th, costs) == pytest.approx(fam.step_cost[i], rel=1e-12)
            assert acc_of(s, th, c) == pytest.approx(fam.step_accuracy[i], rel=1e-12)

    @pytest.mark.parametrize("budget", [1.0, 1.2, 1.7, 2.0, 3.0, 4.5, 6.0, 9.0])
    def test_at_is_the_most_accurate_step_that_fits(self, family_problem, budget):
        s, c, costs, fam = family_problem
        th = fam.at(budget)
        fitting = [i for i in range(fam.n_steps) if fam.step_cost[i] <= budget * (1 + RTOL)]
        assert cost_of(s, th, costs) <= budget * (1 + RTOL)
        assert acc_of(s, th, c) == pytest.approx(max(fam.step_accuracy[fitting]), rel=1e-12)
        np.testing.assert_array_equal(th, fam.step(fam.index_at(budget)))

    def test_step_returns_a_copy(self, family_problem):
        *_, fam = family_problem
        fam.step(0)[0] = 123.0
        assert fam.step(0)[0] != 123.0

    @pytest.mark.parametrize("seed, decimals", [(1, None), (2, None), (3, 1), (4, 2)])
    def test_at_least_as_accurate_as_the_geometric_rule_at_ladder_costs(self, seed, decimals):
        s, c, costs = synthetic(1500, seed=seed)
        if decimals is not None:
            s = np.round(s, decimals)
        fam = SearchFamily(s, c, costs, seed=seed)
        geometric = Calibrator(s, c, costs, mode="geometric", guard=False)
        for budget in np.linspace(costs[0], costs[-1], 10)[1:-1]:  # n_ladder = 8
            assert acc_of(s, fam.at(budget), c) >= geometric.rule(budget).val_accuracy - 1e-12

    def test_full_budget_at_least_the_last_exit(self, family_problem):
        s, c, costs, fam = family_problem
        assert acc_of(s, fam.at(costs[-1]), c) >= c[:, -1].mean()

    def test_seeded(self):
        s, c, costs = synthetic(600, seed=5)
        a, b = SearchFamily(s, c, costs, seed=3), SearchFamily(s, c, costs, seed=3)
        np.testing.assert_array_equal(a.step_cost, b.step_cost)
        for i in range(a.n_steps):
            np.testing.assert_array_equal(a.step(i), b.step(i))

    def test_single_exit(self):
        fam = SearchFamily(np.zeros((5, 1)), np.array([[1], [0], [1], [1], [0]], bool), [2.0])
        assert fam.n_steps == 1 and fam.step_accuracy.tolist() == [0.6]
        np.testing.assert_array_equal(fam.at(2.0), [-np.inf])


# ---------------------------------------------------------------------------
# patience and static
# ---------------------------------------------------------------------------
# Hand-made predictions of a 3-exit network; run lengths in the comments.
TOY_PREDS = np.array([
    [0, 0, 0],  # 1 2 3
    [0, 1, 1],  # 1 1 2
    [1, 0, 2],  # 1 1 1
    [2, 2, 2],  # 1 2 3
    [1, 1, 0],  # 1 2 1
    [0, 1, 0],  # 1 1 1
])
TOY_RUNS = np.array([[1, 2, 3], [1, 1, 2], [1, 1, 1], [1, 2, 3], [1, 2, 1], [1, 1, 1]]) / 3
# exits by patience: t=0 all at 0 (cost 1); t=1 [1,2,2,1,1,2] (cost 3); t=2 all at 2 (cost 4)
TOY_EXITS = {0: [0] * 6, 1: [1, 2, 2, 1, 1, 2], 2: [2] * 6}


def _loop_patience(runs, costs, budget, seed, ids):
    """Reference for the patience rule: the largest patience t whose cost fits, then
    samples move to patience t + 1 one at a time in the order of their draws
    (one id at a time) while the total cost still fits."""
    n, k = runs.shape
    by_t = [loop_exits(runs, np.full(k, (t + 0.5) / k)) for t in range(k)]
    fitting = [t for t in range(k) if costs[by_t[t]].mean() <= budget * (1 + RTOL)]
    t = max(fitting) if fitting else 0
    exits = by_t[t].copy()
    if t < k - 1:
        draws = [mix_draws(np.array([i]), seed)[0] for i in ids]
        total = float(costs[exits].sum())
        for i in sorted(range(n), key=lambda i: draws[i]):
            after = total - costs[by_t[t][i]] + costs[by_t[t + 1][i]]
            if after > budget * n * (1 + RTOL):
                break
            exits[i], total = by_t[t + 1][i], after
    return t, exits


class TestPatience:
    def test_scores_of_the_toy_predictions(self):
        c = synthetic_cache(6, n_exits=3, n_classes=3)
        logits = np.eye(3, dtype=np.float32)[TOY_PREDS] * 5
        c = dataclasses.replace(c, logits=logits)
        np.testing.assert_allclose(score_cache(PatienceScorer().fit(c, COSTS3, 2.0), c),
                                   TOY_RUNS, rtol=0, atol=1e-7)

    @pytest.mark.parametrize("t", [0, 1, 2])
    def test_uniform_threshold_is_patience_t(self, t):
        rule = Thresholds(np.full(3, (t + 0.5) / 3))
        np.testing.assert_array_equal(rule.exits(TOY_RUNS), TOY_EXITS[t])

    @pytest.mark.parametrize("budget, t", [(1.0, 0), (2.0, 0), (2.6, 0), (3.0, 1), (3.5, 1),
                                           (4.0, 2), (5.0, 2)])
    @pytest.mark.parametrize("seed, first_id", [(7, 0), (0, 100)])
    def test_hand_example(self, budget, t, seed, first_id):
        ids = np.arange(first_id, first_id + 6)
        rule = patience_rule(TOY_RUNS, COSTS3, budget, seed=seed, sample_ids=ids)
        assert rule.diagnostics["cost_by_patience"] == [1.0, 3.0, 4.0]
        assert rule.diagnostics["patience"] == t and rule.mix_seed == seed
        ref_t, ref = _loop_patience(TOY_RUNS, COSTS3, budget, seed, ids)
        assert ref_t == t
        np.testing.assert_array_equal(rule.exits(TOY_RUNS, ids), ref)
        assert COSTS3[ref].mean() <= budget * (1 + RTOL)

    @pytest.mark.parametrize("seed", range(4))
    def test_random_runs_against_loop(self, seed):
        rng = np.random.default_rng(seed)
        n, k = 300, 4
        preds = np.where(rng.random((n, k)) < 0.6, 1, rng.integers(0, 4, (n, k)))
        runs = np.ones((n, k))
        for j in range(1, k):
            runs[:, j] = np.where(preds[:, j] == preds[:, j - 1], runs[:, j - 1] + 1, 1)
        runs /= k
        costs = np.cumsum(rng.uniform(0.5, 2.0, k))
        ids = rng.permutation(10 * n)[:n]
        for q in (0.1, 0.35, 0.6, 0.9):
            budget = costs[0] + q * (costs[-1] - costs[0])
            rule = patience_rule(runs, costs, budget, seed=seed, sample_ids=ids)
            _, ref = _loop_patience(runs, costs, budget, seed, ids)
            np.testing.assert_array_equal(rule.exits(runs, ids), ref)

    def test_calibrated_rule_on_a_cache(self):
        cache = synthetic_cache(3000, n_exits=4, seed=5)
        s = score_cache(PatienceScorer().fit(cache, cache.costs, 3.0), cache)
        rule = Calibrator(s, cache.correct(), cache.costs, mode="patience",
                          guard=False).rule(2.5)
        assert 0 < rule.mix < 1 and rule.mode == "patience"
        by_t, t = rule.diagnostics["cost_by_patience"], rule.diagnostics["patience"]
        # realized on the calibration data: at most the budget, within a sample's cost of it
        assert 2.5 - (cache.costs[-1] - cache.costs[0]) / 3000 <= rule.val_cost <= 2.5
        # and the share moved matches the expectation's mix to within a percent
        expected_mix = (2.5 - by_t[t]) / (by_t[t + 1] - by_t[t])
        assert rule.mix == pytest.approx(expected_mix, abs=0.01)
        assert abs(rule.uses_alt(np.arange(3000)).sum() - rule.mix * 3000) <= 2
        # sampling noise of who uses alt: a few standard errors of the per-sample cost change
        exits_t = Thresholds(rule.values).exits(s)
        exits_u = Thresholds(rule.alt).exits(s)
        change = cache.costs[exits_u] - cache.costs[exits_t]
        se = change.std() * math.sqrt(rule.mix * (1 - rule.mix) / 3000)
        assert abs(rule.val_cost - 2.5) <= 4 * se + 2 * change.max() / 3000

    @pytest.mark.parametrize("guard", [False, True])
    @pytest.mark.parametrize("with_ids", [False, True])
    def test_realized_cost_within_a_sample_of_the_target(self, guard, with_ids):
        cache = synthetic_cache(3000, n_exits=4, seed=5)
        s = score_cache(PatienceScorer().fit(cache, cache.costs, 3.0), cache)
        ids = np.random.default_rng(1).permutation(10**6)[:3000] if with_ids else None
        cal = Calibrator(s, cache.correct(), cache.costs, mode="patience", guard=guard,
                         n_boot=5, sample_ids=ids)
        one = (cache.costs[-1] - cache.costs[0]) / cache.n_samples
        for budget in (1.5, 2.0, 2.5, 3.0, 3.5):
            rule = cal.rule(budget)
            assert rule.val_cost <= rule.target * (1 + RTOL)
            assert rule.val_cost >= rule.target - one
            realized = cache.costs[rule.exits(s, np.arange(3000) if ids is None else ids)]
            assert rule.val_cost == pytest.approx(realized.mean(), rel=1e-12)


class TestStatic:
    def test_most_accurate_affordable_exit(self):
        ok = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0]], bool)
        # accuracies 0.25, 0.75, 0.75, 0.5 at costs 1, 2, 3, 4
        costs = np.array([1.0, 2.0, 3.0, 4.0])
        for target, k in [(1.0, 0), (1.9, 0), (2.0, 1), (3.5, 1), (4.0, 1), (9.0, 1)]:
            rule = static_rule(ok, costs, target)
            assert rule.diagnostics["exit"] == k
            np.testing.assert_array_equal(rule.exits(np.zeros((4, 4))), k)

    def test_equal_costs_ties_go_to_the_cheaper_exit(self):
        costs = np.array([1.0, 1.0, 3.0, 4.0])
        better = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], bool)
        assert static_rule(better, costs, 1.0).diagnostics["exit"] == 1
        tied = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
        assert static_rule(tied, costs, 1.0).diagnostics["exit"] == 0

    def test_overthinking_network_keeps_the_best_exit(self):
        cache = synthetic_cache(2000, n_exits=5, seed=0, base_acc=(0.6, 0.8, 0.9, 0.85, 0.7))
        acc = cache.correct().mean(axis=0)
        best = int(np.argmax(acc))
        assert best < 4
        for budget in (cache.costs[best], cache.costs[-1], 2 * cache.costs[-1]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rule = Calibrator(np.zeros((2000, 5)), cache.correct(), cache.costs,
                                  mode="static").rule(budget)
            assert rule.val_accuracy == pytest.approx(acc[best], rel=1e-12)


# ---------------------------------------------------------------------------
# the Calibrator
# ---------------------------------------------------------------------------
def _mode_inputs(mode: str, n: int, seed: int):
    s, c, costs = synthetic(n, seed=seed)
    if mode == "patience":
        preds = np.where(np.random.default_rng(seed).random((n, 4)) < 0.6, 1,
                         np.random.default_rng(seed + 1).integers(0, 4, (n, 4)))
        runs = np.ones((n, 4))
        for j in range(1, 4):
            runs[:, j] = np.where(preds[:, j] == preds[:, j - 1], runs[:, j - 1] + 1, 1)
        s = runs / 4
    fr = np.array([0.4, 0.3, 0.2, 0.1]) if mode == "assignment" else None
    return s, c, costs, fr


class TestCalibrator:
    @pytest.mark.parametrize("mode", sorted(CALIBRATIONS))
    @pytest.mark.parametrize("guard", [False, True])
    @pytest.mark.parametrize("budget", [1.3, 2.5, 4.5])
    def test_every_mode_meets_its_target(self, mode, guard, budget):
        n = 1500
        s, c, costs, fr = _mode_inputs(mode, n, seed=10)
        rule = Calibrator(s, c, costs, mode=mode, fractions=fr, guard=guard, n_boot=5,
                          seed=4).rule(budget)
        exits = rule.exits(s)
        assert exits.shape == (n,) and exits.min() >= 0 and exits.max() < 4
        counts = np.bincount(exits, minlength=4)
        assert counts.sum() == n
        np.testing.assert_allclose(rule.fractions, counts / n, rtol=0, atol=1e-12)
        assert rule.val_cost == pytest.approx(costs[exits].mean(), rel=1e-12)
        assert rule.val_accuracy == pytest.approx(c[np.arange(n), exits].mean(), rel=1e-12)
        assert (rule.mode, rule.budget, rule.mix_seed) == (mode, budget, 4)
        assert costs[0] <= rule.target <= budget * (1 + RTOL)
        # mixed rules too: the samples moved to the second patience are chosen to fit
        assert rule.val_cost <= rule.target * (1 + RTOL)
        if guard:
            assert rule.val_cost <= budget * (1 + RTOL)
            if mode != "static":
                assert rule.target < budget and "guard" in rule.diagnostics
        else:
            assert rule.target == budget

    @pytest.mark.parametrize("guard", [False, True])
    @pytest.mark.parametrize("budget", [1.3, 2.0, 4.0, 5.8])
    def test_select_is_the_winner_calibrated_on_everything(self, guard, budget):
        s, c, _ = synthetic(3000, seed=21, costs=CHEAP_SECOND)
        rule = Calibrator(s, c, CHEAP_SECOND, mode="select", guard=guard, n_boot=5,
                          seed=2).rule(budget)
        d = rule.diagnostics
        held_out, chosen = d["held_out_accuracy"], d["selected"]
        assert set(held_out) == {"geometric", "search"} and rule.mode == "select"
        assert d["leader"] == max(held_out, key=held_out.get)
        # the choice: the first candidate within tie_z paired standard errors of the leader
        within = [m for m in ("geometric", "search")
                  if d["behind_leader"][m] <= d["tie_z"] * d["behind_leader_se"][m] + 1e-12]
        assert chosen == within[0] and 1 <= d["repeats"] <= SELECT_REPEATS and d["folds"] == 2
        np.testing.assert_allclose(d["behind_leader"][chosen],
                                   held_out[d["leader"]] - held_out[chosen], atol=1e-12)
        alone = Calibrator(s, c, CHEAP_SECOND, mode=chosen, guard=guard, n_boot=5,
                           seed=2).rule(budget)
        np.testing.assert_array_equal(rule.values, alone.values)
        assert (rule.val_cost, rule.val_accuracy, rule.target) == (
            alone.val_cost, alone.val_accuracy, alone.target)  # the guard sized for the choice

    def test_a_tie_goes_to_the_first_candidate(self):
        """Two candidates that make the same rule tie exactly: the first listed wins."""
        s, c, costs = synthetic(2000, seed=5)
        for order in (("geometric", "search"), ("search", "geometric")):
            rule = Calibrator(s, c, costs, mode="select", guard=False,
                              select_from=order, tie_z=1e6).rule(3.0)
            assert rule.diagnostics["selected"] == order[0]

    def test_select_refuses_bad_settings(self):
        s, c, costs = synthetic(200, seed=5)
        with pytest.raises(EenetError, match="folds >= 2"):
            Calibrator(s, c, costs, mode="select", folds=1)
        with pytest.raises(EenetError, match="unknown calibration|select from"):
            Calibrator(s, c, costs, mode="select", select_from=("geometric", "select"))
        with pytest.raises(EenetError, match="tie_z"):
            Calibrator(s, c, costs, mode="select", tie_z=-1.0)


class TestSelectionPieces:
    def test_folds_cover_every_sample_once(self):
        for repeat in (0, 1):
            splits = fold_splits(11, 3, repeat, seed=4)
            held = np.concatenate([h for _, h in splits])
            np.testing.assert_array_equal(np.sort(held), np.arange(11))
            for fit, h in splits:
                assert np.intersect1d(fit, h).size == 0 and fit.size + h.size == 11
        assert not np.array_equal(fold_splits(11, 3, 0, 4)[0][1], fold_splits(11, 3, 1, 4)[0][1])

    def test_choose_against_a_plain_computation(self):
        rng = np.random.default_rng(0)
        right = {"geometric": (rng.random(500) < 0.70).astype(float),
                 "search": (rng.random(500) < 0.76).astype(float)}
        chosen, record = choose(right, ["geometric", "search"], tie_z=1.0)
        diff = right["search"] - right["geometric"]
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        assert record["leader"] == "search"
        np.testing.assert_allclose(record["behind_leader_se"]["geometric"], se, rtol=1e-12)
        assert chosen == ("geometric" if diff.mean() <= se else "search")
        assert choose(right, ["geometric", "search"], tie_z=1e9)[0] == "geometric"
        assert choose(right, ["geometric", "search"], tie_z=0.0)[0] == "search"

    def test_ambiguous_near_the_tie_boundary_only(self):
        rec = {"tie_z": 1.0, "behind_leader": {"a": 0.0, "b": 0.015},
               "behind_leader_se": {"a": 0.0, "b": 0.01}}
        assert ambiguous(rec)  # 1.5 se behind: within one se of the boundary at 1 se
        rec["behind_leader"]["b"] = 0.05  # 5 se behind: clearly not a tie
        assert not ambiguous(rec)


class TestSelectChoosesTheBetterCalibration:
    """The default's choice equals the better of geometric and search on 20,000 fresh
    samples (within 0.1 point), on networks built so that each one wins."""

    @staticmethod
    def fresh_accuracy(costs, budgets, seed, n, **net):
        s, c, _ = synthetic(n, seed=seed, costs=costs, **net)
        s_new, c_new, _ = synthetic(20_000, seed=1000 + seed, costs=costs, **net)
        rows = np.arange(s_new.shape[0])
        out = []
        for budget in budgets:
            acc = {}
            for mode in ("geometric", "search", "select"):
                rule = Calibrator(s, c, costs, mode=mode, guard=False, seed=seed).rule(budget)
                acc[mode] = float(c_new[rows, rule.exits(s_new)].mean())
                if mode == "select":
                    acc["chosen"] = rule.diagnostics["selected"]
            out.append(acc)
        return out

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_search_where_the_first_exit_is_weak_and_the_second_cheap(self, seed):
        net = dict(skill=(0.3, 0.7, 0.78, 0.85))
        for acc in self.fresh_accuracy(CHEAP_SECOND, (1.3, 2.0), seed, 4000, **net):
            assert acc["search"] > acc["geometric"] + 0.02  # built so that search wins
            assert acc["chosen"] == "search"
            assert acc["select"] >= max(acc["geometric"], acc["search"]) - 0.001

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_geometric_where_exits_are_strong_and_scores_smooth(self, seed):
        """Six strong exits, correctness nearly nested, few calibration samples: the
        search's extra freedom fits the calibration samples, geometric carries over."""
        costs = np.arange(1.0, 7.0)
        net = dict(skill=(0.6, 0.7, 0.78, 0.85, 0.9, 0.93), noise=0.03)
        for acc in self.fresh_accuracy(costs, (4.3, 5.2), seed, 800, **net):
            assert acc["geometric"] > acc["search"] + 0.001  # built so that geometric wins
            assert acc["chosen"] == "geometric"
            assert acc["select"] >= max(acc["geometric"], acc["search"]) - 0.001

    def test_it_is_every_score_based_methods_default(self):
        from eenet.scores import METHODS

        for name in ("eenet", "eenet-paper", "maxprob", "entropy", "patience"):
            assert METHODS[name].default_calibration == "select"
            assert {"geometric", "search"} <= set(METHODS[name].select_from)
        assert METHODS["eenet"].select_from[0] == "geometric"  # ties: the smoother rule

    def test_certification_uses_the_family_of_the_choice(self):
        s, c, _ = synthetic(3000, seed=3, costs=CHEAP_SECOND)
        cal = Calibrator(s, c, CHEAP_SECOND, mode="select")
        family = cal.candidates(budget=1.3)
        assert family[0].diagnostics["selected"] == "search"
        assert len(family) == len(Calibrator(s, c, CHEAP_SECOND, mode="search").candidates())
        assert cal.candidates()[0].diagnostics["selected"] == "geometric"  # no budget

    def test_assignment_tilts_to_budget(self):
        s, c, costs = synthetic(4000, seed=11)
        fr = np.array([0.7, 0.1, 0.1, 0.1])  # costs 1.85, below the budget
        rule = Calibrator(s, c, costs, mode="assignment", fractions=fr, guard=False).rule(3.0)
        d = rule.diagnostics
        assert d["predicted_cost"] == pytest.approx(3.0, rel=1e-3)
        assert d["predicted_cost"] == pytest.approx(d["distribution_budget"], rel=1e-9)
        assert rule.val_cost == pytest.approx(3.0, rel=2e-3)
        tilted = np.array(d["target_fractions"])
        np.testing.assert_allclose(np.diff(np.log(tilted / fr)) / np.diff(costs),
                                   np.diff(np.log(tilted / fr))[0] / np.diff(costs)[0],
                                   rtol=1e-6)

    def test_assignment_unreachable_warns_and_floors(self):
        s, c, costs = synthetic(1000, seed=12)
        with pytest.warns(UserWarning, match="cannot meet 1.2; its empty exits got a"):
            rule = Calibrator(s, c, costs, mode="assignment", fractions=[0.0, 0.5, 0.5, 0.0],
                              guard=False).rule(1.2)
        assert rule.val_cost <= 1.2 * (1 + RTOL)
        assert rule.diagnostics["fraction_floor"] > 0

    @pytest.mark.parametrize("mode", ["geometric", "assignment", "search"])
    def test_heavy_ties_still_fit(self, mode):
        s, c, costs = synthetic(2000, seed=13)
        s = np.round(s, 1)  # 11 distinct score values
        rule = Calibrator(s, c, costs, mode=mode, fractions=[0.25] * 4, guard=False).rule(2.2)
        assert rule.val_cost <= 2.2 * (1 + RTOL)

    def test_budget_above_the_last_exit_warns(self):
        s, c, costs = synthetic(800, seed=14)
        for mode in ("geometric", "search"):
            with pytest.warns(UserWarning, match="above the last exit's cost 6"):
                rule = Calibrator(s, c, costs, mode=mode).rule(7.0)
            assert rule.val_accuracy >= c[:, -1].mean() - 1e-12
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rule = Calibrator(s, c, costs, mode="geometric").rule(6.0)  # the full model
        np.testing.assert_array_equal(rule.exits(s), 3)

    @pytest.mark.parametrize("guard", [False, True])
    @pytest.mark.parametrize("mode, exits", [("geometric", 1), ("search", None),
                                              ("static", 1)])
    def test_equal_cost_first_exits_at_their_cost(self, guard, mode, exits):
        """Costs [1, 1, 3, 4] at budget 1: nobody pays more than exit 0, and exit 1 (same
        cost, more accurate) is free to use."""
        cache = synthetic_cache(800, n_exits=4, seed=1, costs=[1.0, 1.0, 3.0, 4.0])
        s = score_cache(MaxProbScorer(), cache)
        ok = cache.correct()
        assert ok[:, 1].mean() > ok[:, 0].mean()
        rule = Calibrator(s, ok, cache.costs, mode=mode, guard=guard, n_boot=5).rule(1.0)
        got = rule.exits(s)
        assert got.max() <= 1 and rule.val_cost == 1.0
        if exits is not None:
            np.testing.assert_array_equal(got, exits)
        else:
            assert rule.val_accuracy >= ok[:, 1].mean()

    def test_search_family_and_margins_are_built_once(self):
        s, c, costs = synthetic(800, seed=15)
        cal = Calibrator(s, c, costs, mode="search", n_boot=4)
        fam = cal.family()
        first = cal.rule(2.0)
        margins = cal._margins
        cal.rule(3.0)
        assert cal.family() is fam and cal._margins is margins
        np.testing.assert_array_equal(cal.rule(2.0).values, first.values)

    @pytest.mark.parametrize("mode", ["geometric", "search", "static"])
    def test_calibrate_is_one_rule_of_a_calibrator(self, mode):
        s, c, costs = synthetic(600, seed=16)
        a = calibrate(s, c, costs, 2.5, mode=mode, n_boot=4, seed=2)
        b = Calibrator(s, c, costs, mode=mode, n_boot=4, seed=2).rule(2.5)
        np.testing.assert_array_equal(a.values, b.values)
        assert (a.target, a.val_cost) == (b.target, b.val_cost)

    @pytest.mark.parametrize("kwargs, match", [
        ({"mode": "assignment"}, "needs the learned exit distribution"),
        ({"mode": "quota"}, "unknown calibration 'quota'; choose one of: assignment"),
        ({"mode": "geometric", "correct": np.ones((5, 2), bool)},
         r"correct must have shape \(100, 4\)"),
        ({"mode": "geometric", "scores": np.full((100, 4), np.nan)}, "non-finite"),
        ({"mode": "geometric", "scores": np.zeros((0, 4))}, "scores must have shape"),
        ({"mode": "geometric", "costs": [3.0, 2.0, 1.0, 0.5]}, "costs must be cumulative"),
        ({"mode": "assignment", "fractions": [0.5, 0.5]}, r"fractions must have shape \(4,\)"),
        ({"mode": "geometric", "n_boot": 1}, "n_boot must be an integer of at least 2"),
        ({"mode": "geometric", "level": 1.0}, r"level must lie in \[0.5, 1\)"),
    ])
    def test_bad_input(self, kwargs, match):
        s, c, costs = synthetic(100, seed=17)
        args = {"scores": s, "correct": c, "costs": costs, **kwargs}
        with pytest.raises(EenetError, match=match):
            Calibrator(args.pop("scores"), args.pop("correct"), args.pop("costs"), **args)

    def test_budget_below_the_cheapest_exit(self):
        s, c, costs = synthetic(100, seed=18)
        with pytest.raises(EenetError, match="budget 0.5 is below the cheapest exit's cost 1"):
            Calibrator(s, c, costs, mode="geometric").rule(0.5)

    def test_single_exit(self):
        rule = calibrate(np.zeros((5, 1)), np.ones((5, 1), bool), [1.0], 1.0, mode="search")
        np.testing.assert_array_equal(rule.exits(np.zeros((5, 1))), 0)


def _random_cache(draw_seed, n, k, base_acc, equal_first, n_classes):
    rng = np.random.default_rng(draw_seed)
    costs = np.cumsum(rng.uniform(0.2, 2.0, k))
    if equal_first:
        costs[1] = costs[0]
    return synthetic_cache(n, n_exits=k, n_classes=n_classes, seed=draw_seed,
                           base_acc=base_acc, costs=costs)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(20, 400), k=st.integers(2, 5),
       base_acc=st.lists(st.floats(0.2, 0.95), min_size=2, max_size=5),
       equal_first=st.booleans(), n_classes=st.integers(2, 8),
       scorer=st.sampled_from(["maxprob", "entropy", "noise", "ties"]),
       mode=st.sampled_from(["search", "search+guard", "static"]),
       budgets=st.lists(st.floats(0, 1.2), min_size=2, max_size=8))
@example(seed=0, n=400, k=5, base_acc=[0.6, 0.8, 0.9, 0.85, 0.7], equal_first=False,
         n_classes=10, scorer="maxprob", mode="search",
         budgets=[0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0])
@example(seed=0, n=400, k=5, base_acc=[0.6, 0.8, 0.9, 0.85, 0.7], equal_first=False,
         n_classes=10, scorer="maxprob", mode="search+guard",
         budgets=[0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0])
def test_calibration_accuracy_never_falls_as_the_budget_rises(seed, n, k, base_acc,
                                                                equal_first, n_classes, scorer,
                                                                mode, budgets):
    """Also on networks whose last exit is not the most accurate ("overthinking")."""
    cache = _random_cache(seed, n, k, tuple(base_acc), equal_first, n_classes)
    if scorer in ("maxprob", "entropy"):
        s = score_cache(MaxProbScorer() if scorer == "maxprob" else EntropyScorer(), cache)
    else:
        s = np.random.default_rng(seed).random((n, k))
        if scorer == "ties":
            s = np.round(s, 1)
    costs, ok = cache.costs, cache.correct()
    cal = Calibrator(s, ok, costs, mode="static" if mode == "static" else "search",
                     guard=mode == "search+guard", n_boot=4, seed=seed)
    accuracy = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for q in sorted(budgets):
            budget = costs[0] + q * (costs[-1] - costs[0])
            rule = cal.rule(budget)
            assert rule.val_cost <= rule.target * (1 + RTOL)
            assert costs[0] * (1 - RTOL) <= rule.target <= budget * (1 + RTOL)
            accuracy.append(rule.val_accuracy)
    assert np.all(np.diff(accuracy) >= -1e-12), accuracy
    if mode == "static" and max(budgets) >= 1.0:
        assert accuracy[-1] == pytest.approx(ok.mean(axis=0).max(), rel=1e-12)


# ---------------------------------------------------------------------------
# the guard
# ---------------------------------------------------------------------------
class TestGuard:
    def test_refit_margin_shrinks_with_a_larger_unseen_split(self):
        s, c, costs = synthetic(1500, seed=6)

        def fit(sc, co, ids):
            return Thresholds(fit_quota(sc, costs, 2.0,
                                        lambda b: geometric_fractions(costs, b))[0])

        margin, info = refit_margin(fit, s, c, costs, np.arange(1500), seed=0, n_boot=10)
        again, _ = refit_margin(fit, s, c, costs, np.arange(1500), seed=0, n_boot=10)
        big, _ = refit_margin(fit, s, c, costs, np.arange(1500), seed=0, n_boot=10,
                              n_eval=10**9)
        assert 0 < margin < 2.0 - costs[0] and again == margin
        assert 0 <= big < margin
        assert info["n_boot"] == 10 and info["level"] == 0.9

    def test_refit_margin_with_too_few_samples_warns(self):
        with pytest.warns(UserWarning, match="too few for the budget guard"):
            margin, _ = refit_margin(lambda *a: None, np.zeros((1, 2)), np.ones((1, 2), bool),
                                     np.array([1.0, 2.0]), np.arange(1))
        assert margin == 0.0

    def test_selection_margins_non_negative_and_shrink_with_n_eval(self):
        s, c, costs = synthetic(1500, seed=7)
        fam = SearchFamily(s, c, costs)
        steps = np.stack([apply_thresholds(s, fam.step(i)) for i in range(fam.n_steps)])
        taus = np.linspace(costs[0], costs[-1], 9)
        m, info = selection_margins(steps, c, costs, taus, seed=0, n_boot=10)
        big, _ = selection_margins(steps, c, costs, taus, seed=0, n_boot=10, n_eval=10**9)
        assert m.shape == (9,) and np.all(m >= 0) and np.all(big <= m + 1e-12)
        assert m.max() > 0 and info["subsample_scale"] == 1.0

    @pytest.mark.parametrize("mode", ["geometric", "search", "assignment", "patience"])
    def test_target_between_the_cheapest_exit_and_the_budget(self, mode):
        s, c, costs, fr = _mode_inputs(mode, 1500, seed=20)
        cal = Calibrator(s, c, costs, mode=mode, fractions=fr, n_boot=6)
        targets = []
        for budget in (costs[0], 1.2, 2.0, 3.5, 5.5):
            rule = cal.rule(budget)
            assert costs[0] <= rule.target <= budget
            targets.append(rule.target)
        assert targets[0] == costs[0]
        assert max(targets[1:]) > costs[0]

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["geometric", "search"])
    def test_reduces_overshoot_on_fresh_data(self, mode):
        budgets = [1.3, 2.0, 3.0]
        over = {False: [], True: []}
        ratio = {False: [], True: []}
        for seed in range(40 if mode == "geometric" else 15):
            s, c, costs = synthetic(3000, seed=100 + seed)
            s_new, _, _ = synthetic(3000, seed=10_000 + seed)
            for guard in (False, True):
                cal = Calibrator(s, c, costs, mode=mode, guard=guard, seed=seed)
                for b in budgets:
                    r = cost_of(s_new, cal.rule(b).values, costs) / b
                    over[guard].append(r > 1)
                    ratio[guard].append(r)
        rate_off, rate_on = np.mean(over[False]), np.mean(over[True])
        assert rate_off >= 0.3  # without the guard, fresh data overshoots often
        assert rate_on <= 0.5 * rate_off and rate_on <= 0.25
        assert np.mean(ratio[True]) >= 0.95  # not needlessly conservative
