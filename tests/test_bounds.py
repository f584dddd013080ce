"""Tests of eenet.rules.bounds: each bound against an independent computation, the
monotonicity the certification relies on, and (marked slow) coverage over many draws."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eenet._validation import EenetError
from eenet.rules.bounds import (
    PVALUE_BOUNDS,
    UCB_BOUNDS,
    hb_pvalue,
    hb_ucb,
    hoeffding_pvalue,
    hoeffding_ucb,
    pvalue,
    ucb,
    wsr_pvalue,
    wsr_ucb,
)
from eenet.rules.certify import crc_risks, crc_select, fixed_sequence_test

BOUNDS = sorted(UCB_BOUNDS)
DELTAS = (0.01, 0.02, 0.05, 0.1, 0.2)


def draw(population: str, size, rng: np.random.Generator) -> tuple[np.ndarray, float, float, float]:
    """Values from a population with a known mean: (values, mean, low, high)."""
    if population == "bernoulli":  # a rare event: HB's Bentkus term matters here
        return (rng.random(size) < 0.05).astype(float), 0.05, 0.0, 1.0
    if population == "costs":  # four exits, half the samples leave at the first
        costs, fractions = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.2, 0.15, 0.15])
        return rng.choice(costs, size=size, p=fractions), float(costs @ fractions), 1.0, 4.0
    if population == "beta":  # continuous, skewed
        return rng.beta(0.5, 2.0, size=size), 0.5 / 2.5, 0.0, 1.0
    if population == "gap":  # a signed accuracy gap in [-1, 1]
        values, probs = np.array([-1.0, 0.0, 1.0]), np.array([0.02, 0.93, 0.05])
        return rng.choice(values, size=size, p=probs), float(values @ probs), -1.0, 1.0
    raise ValueError(population)


# ---------------------------------------------------------------------------
# independent references: plain loops and closed forms
# ---------------------------------------------------------------------------
def binom_cdf_loop(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), summing the probability mass by a loop (in logs for large n)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * log_p + (n - i) * log_q for i in range(0, min(k, n) + 1)]
    return math.fsum(math.exp(t) for t in terms)


def hb_pvalue_reference(z: list[float], a: float) -> float:
    """HB p-value on [0, 1] from its formula, with the binomial tail summed by a loop."""
    n = len(z)
    r = sum(z) / n
    m = min(r, a)

    def h1(x: float, y: float) -> float:
        first = 0.0 if x == 0 else x * math.log(x / y)
        if x == 1:
            second = 0.0
        elif y == 1:
            second = math.inf
        else:
            second = (1 - x) * math.log((1 - x) / (1 - y))
        return first + second

    k = math.ceil(round(n * r, 9))
    return min(math.exp(-n * h1(m, a)), math.e * binom_cdf_loop(k, n, a))


def wsr_max_log_capital_reference(z: list[float], m: float, tune_delta: float,
                                  max_bet: float = 0.75) -> float:
    """The one-sided betting capital against mean >= m, by a plain loop (seed=None order)."""
    n = len(z)
    total, sq, best, log_k = 0.0, 0.0, 0.0, 0.0
    sigma2_prev = 0.25
    for t, x in enumerate(z, start=1):
        lam = math.sqrt(2 * math.log(1 / tune_delta) / (n * sigma2_prev))
        if m < 1:
            lam = min(lam, max_bet / (1 - m))
        log_k += math.log(1 + lam * (m - x))
        best = max(best, log_k)
        total += x
        mu_t = (0.5 + total) / (t + 1)
        sq += (x - mu_t) ** 2
        sigma2_prev = (0.25 + sq) / (t + 1)
    return best


def wsr_ucb_grid_reference(z: list[float], delta: float, grid: np.ndarray) -> tuple[float, float]:
    """The grid cell [previous, first] holding the smallest m rejected at level delta."""
    threshold = math.log(1 / delta)
    previous = 0.0
    for m in grid:
        if wsr_max_log_capital_reference(z, float(m), delta) >= threshold:
            return previous, float(m)
        previous = float(m)
    return previous, 1.0


# ---------------------------------------------------------------------------
# Hoeffding
# ---------------------------------------------------------------------------
class TestHoeffding:
    @pytest.mark.parametrize("n", [1, 10, 1000])
    @pytest.mark.parametrize("delta", [0.01, 0.1])
    def test_closed_form(self, n, delta):
        x = np.random.default_rng(n).uniform(2.0, 5.0, size=n)
        expected = min(x.mean() + 3.0 * math.sqrt(math.log(1 / delta) / (2 * n)), 5.0)
        np.testing.assert_allclose(hoeffding_ucb(x, delta, low=2.0, high=5.0), expected,
                                   rtol=0, atol=1e-12)

    def test_pvalue_closed_form_and_inversion(self):
        x = np.full(100, 0.5)
        assert hoeffding_pvalue(x, 0.4) == 1.0  # the mean is above the null's level
        np.testing.assert_allclose(hoeffding_pvalue(x, 0.6), math.exp(-200 * 0.01), rtol=1e-12)
        u = hoeffding_ucb(x, 0.05)
        np.testing.assert_allclose(hoeffding_pvalue(x, u), 0.05, rtol=1e-9)

    def test_no_samples(self):
        assert hoeffding_ucb([], 0.1, low=-1, high=1) == 1.0
        assert hoeffding_pvalue([], 0.0, low=-1, high=1) == 1.0


# ---------------------------------------------------------------------------
# Hoeffding-Bentkus
# ---------------------------------------------------------------------------
class TestHoeffdingBentkus:
    @pytest.mark.parametrize("n,successes", [(1, 0), (1, 1), (20, 0), (20, 3), (50, 10),
                                             (200, 7)])
    @pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2, 0.5, 0.9])
    def test_pvalue_matches_formula_with_loop_binomial(self, n, successes, alpha):
        z = [1.0] * successes + [0.0] * (n - successes)
        np.testing.assert_allclose(hb_pvalue(z, alpha), hb_pvalue_reference(z, alpha),
                                   rtol=1e-9, atol=1e-15)

    @given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.floats(0.001, 0.999))
    @settings(max_examples=100, deadline=None)
    def test_pvalue_matches_formula_continuous_values(self, z, alpha):
        np.testing.assert_allclose(hb_pvalue(z, alpha), hb_pvalue_reference(z, alpha),
                                   rtol=1e-8, atol=1e-15)

    @pytest.mark.parametrize("n,successes", [(5, 1), (100, 4), (1000, 100), (3000, 2900)])
    @pytest.mark.parametrize("delta", [0.01, 0.1])
    def test_ucb_inverts_the_pvalue(self, n, successes, delta):
        z = np.r_[np.ones(successes), np.zeros(n - successes)]
        u = hb_ucb(z, delta)
        # the p-value is delta at the bound (to brentq's 1e-12), and above it just below
        assert hb_pvalue(z, u) <= delta
        assert hb_pvalue(z, u - 1e-7) > delta
        # an independent inversion: bisection on the reference formula
        lo, hi = successes / n, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if hb_pvalue_reference(list(z), mid) <= delta else (mid, hi)
        assert lo - 1e-11 <= u <= hi + 1e-11

    @pytest.mark.parametrize("n", [1, 7, 100, 5000])
    @pytest.mark.parametrize("delta", [0.05, 0.1])
    def test_all_zeros_closed_form(self, n, delta):
        # mean 0: both terms reduce to (1 - alpha)**n, so the bound is 1 - delta**(1/n)
        np.testing.assert_allclose(hb_ucb(np.zeros(n), delta), 1 - delta ** (1 / n),
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(hb_ucb(np.full(n, 3.0), delta, low=3.0, high=7.0),
                                   3.0 + 4.0 * (1 - delta ** (1 / n)), rtol=0, atol=4e-10)

    def test_all_ones_and_no_samples(self):
        assert hb_ucb(np.ones(50), 0.1) == 1.0
        assert hb_ucb(np.full(50, 7.0), 0.1, low=3.0, high=7.0) == 7.0
        assert hb_ucb([], 0.1, low=3.0, high=7.0) == 7.0
        assert hb_pvalue([], 0.5) == 1.0

    @given(st.lists(st.floats(0, 1), min_size=1, max_size=200), st.floats(0.001, 0.5))
    @settings(max_examples=60, deadline=None)
    def test_never_above_hoeffding(self, z, delta):
        assert hb_ucb(z, delta) <= hoeffding_ucb(z, delta) + 1e-10


# ---------------------------------------------------------------------------
# Waudby-Smith-Ramdas
# ---------------------------------------------------------------------------
class TestWaudbySmithRamdas:
    @pytest.mark.parametrize("case", ["ones-and-zeros", "uniform", "all-zeros", "one-sample",
                                      "two-samples"])
    @pytest.mark.parametrize("delta", [0.05, 0.2])
    def test_ucb_matches_loop_reference_on_a_grid(self, case, delta):
        rng = np.random.default_rng(7)
        z = {"ones-and-zeros": (rng.random(60) < 0.2).astype(float).tolist(),
             "uniform": rng.uniform(0, 0.6, 40).tolist(),
             "all-zeros": [0.0] * 30,
             "one-sample": [0.3],
             "two-samples": [0.1, 0.0]}[case]
        grid = np.linspace(0, 1, 2001)[1:]
        lo, hi = wsr_ucb_grid_reference(z, delta, grid)
        u = wsr_ucb(z, delta, seed=None)
        assert lo - 1e-12 <= u <= hi + 1e-12, (lo, u, hi)

    @pytest.mark.parametrize("alpha", [0.1, 0.3, 0.6, 1.0])
    def test_pvalue_matches_loop_reference(self, alpha):
        z = np.random.default_rng(3).beta(1, 4, 80).tolist()
        expected = min(1.0, math.exp(-wsr_max_log_capital_reference(z, alpha, 0.1)))
        np.testing.assert_allclose(wsr_pvalue(z, alpha, tune_delta=0.1, seed=None), expected,
                                   rtol=1e-9, atol=1e-300)

    @pytest.mark.parametrize("delta", [0.01, 0.1])
    def test_ucb_inverts_the_pvalue(self, delta):
        x = np.random.default_rng(4).beta(2, 5, 300)
        u = wsr_ucb(x, delta)
        assert wsr_pvalue(x, u, tune_delta=delta) <= delta * (1 + 1e-9)
        assert wsr_pvalue(x, u - 1e-9, tune_delta=delta) > delta

    def test_degenerate_samples(self):
        assert wsr_ucb([], 0.1, low=2, high=6) == 6.0
        assert wsr_pvalue([], 0.5) == 1.0
        # all at the top: betting against the mean loses every round, nothing is rejected
        assert wsr_ucb(np.ones(100), 0.1) == 1.0
        assert wsr_ucb(np.full(100, 6.0), 0.1, low=2, high=6) == 6.0
        # one sample: valid, above the value, not trivial
        u = wsr_ucb([0.0], 0.1)
        assert 0.0 < u <= 1.0
        # all at the bottom: tight, like HB's 1 - delta**(1/n) in order of magnitude
        assert 0 < wsr_ucb(np.zeros(1000), 0.1) < 0.01

    def test_seed_permutes_the_samples_and_is_recorded_by_value(self):
        x = np.sort(np.random.default_rng(5).beta(2, 5, 500))  # an order tied to the values
        assert wsr_ucb(x, 0.1, seed=1) == wsr_ucb(x, 0.1, seed=1)
        # any permutation drawn independently of the values gives a similar bound
        values = [wsr_ucb(x, 0.1, seed=s) for s in range(5)]
        assert np.ptp(values) < 0.02
        # the sorted order itself is not exchangeable: ascending values make the gambler
        # who bets on a low mean rich early, a bound far below the others
        assert wsr_ucb(x, 0.1, seed=None) < min(values) - 0.05

    def test_tighter_than_hoeffding_for_low_variance(self):
        x = np.random.default_rng(6).choice([1.0, 2.0, 4.0], size=2000, p=[0.8, 0.15, 0.05])
        assert wsr_ucb(x, 0.1, low=1, high=4) < hb_ucb(x, 0.1, low=1, high=4) < \
            hoeffding_ucb(x, 0.1, low=1, high=4)


# ---------------------------------------------------------------------------
# all bounds: shapes, rescaling, monotonicity
# ---------------------------------------------------------------------------
class TestAllBounds:
    @pytest.mark.parametrize("bound", BOUNDS)
    def test_rows_equal_separate_calls(self, bound):
        x = np.random.default_rng(8).uniform(1, 4, size=(5, 120))
        rows = ucb(x, 0.1, bound=bound, low=1, high=4)
        assert rows.shape == (5,)
        np.testing.assert_array_equal(rows, [ucb(r, 0.1, bound=bound, low=1, high=4) for r in x])
        p = pvalue(x, 2.5, bound=bound, low=1, high=4)
        np.testing.assert_array_equal(p, [pvalue(r, 2.5, bound=bound, low=1, high=4) for r in x])

    @pytest.mark.parametrize("bound", BOUNDS)
    @given(z=st.lists(st.floats(0, 1), min_size=0, max_size=80),
           low=st.floats(-100, 100), width=st.floats(0.01, 1000), delta=st.floats(0.001, 0.9))
    @settings(max_examples=40, deadline=None)
    def test_rescaling(self, bound, z, low, width, delta):
        x = low + width * np.asarray(z, dtype=float)
        expected = low + width * ucb(z, delta, bound=bound)
        np.testing.assert_allclose(ucb(x, delta, bound=bound, low=low, high=low + width),
                                   expected, rtol=0, atol=1e-8 * (width + abs(low)))

    @pytest.mark.parametrize("bound", BOUNDS)
    @given(z=st.lists(st.floats(0, 1), min_size=1, max_size=100))
    @settings(max_examples=40, deadline=None)
    def test_bound_lies_between_mean_and_high(self, bound, z):
        u = ucb(z, 0.1, bound=bound)
        # WSR may fall below the sample mean in unlucky orders; never below 0 or above 1
        if bound != "wsr":
            assert u >= np.mean(z) - 1e-12
        assert 0.0 <= u <= 1.0

    @pytest.mark.parametrize("bound", ["hoeffding", "hb"])
    @given(z=st.lists(st.floats(0, 1), min_size=0, max_size=100),
           d1=st.floats(0.001, 0.999), d2=st.floats(0.001, 0.999))
    @settings(max_examples=60, deadline=None)
    def test_larger_delta_never_larger_bound(self, bound, z, d1, d2):
        small, large = sorted((d1, d2))
        # tolerance: brentq finds HB's bound to 1e-12, so two nearby levels may swap by that
        assert ucb(z, large, bound=bound) <= ucb(z, small, bound=bound) + 1e-10

    @given(z=st.lists(st.floats(0, 1), min_size=0, max_size=100),
           d1=st.floats(0.001, 0.999), d2=st.floats(0.001, 0.999), tune=st.floats(0.01, 0.5))
    @settings(max_examples=60, deadline=None)
    def test_wsr_with_fixed_tuning_is_exactly_monotone_in_delta(self, z, d1, d2, tune):
        small, large = sorted((d1, d2))
        assert (wsr_ucb(z, large, tune_delta=tune)
                <= wsr_ucb(z, small, tune_delta=tune))

    @pytest.mark.parametrize("population", ["bernoulli", "costs", "beta", "gap"])
    @pytest.mark.parametrize("n", [50, 1000])
    def test_wsr_tuned_for_delta_is_monotone_on_the_usual_levels(self, population, n):
        x, _, low, high = draw(population, (40, n), np.random.default_rng(n))
        bounds = np.stack([wsr_ucb(x, d, low=low, high=high) for d in DELTAS], axis=1)
        assert np.all(np.diff(bounds, axis=1) <= 0)

    @pytest.mark.parametrize("bound", BOUNDS)
    @pytest.mark.parametrize("population", ["costs", "beta"])
    def test_more_samples_tighter_on_average(self, bound, population):
        rng = np.random.default_rng(11)
        widths = []
        for n in (100, 400, 1600):
            x, _, low, high = draw(population, (50, n), rng)
            widths.append(np.mean(ucb(x, 0.1, bound=bound, low=low, high=high) - x.mean(axis=1)))
        assert widths[0] > widths[1] > widths[2] > 0

    @pytest.mark.parametrize("bound", BOUNDS)
    def test_pvalue_at_the_bound(self, bound):
        x = np.random.default_rng(12).choice([1.0, 2.0, 4.0], size=500, p=[0.6, 0.3, 0.1])
        u = ucb(x, 0.1, bound=bound, low=1, high=4)
        # rejecting H0: mean >= alpha at delta is the same as alpha lying above the UCB
        assert pvalue(x, u + 1e-9, bound=bound, low=1, high=4, tune_delta=0.1) <= 0.1
        assert pvalue(x, u - 1e-6, bound=bound, low=1, high=4, tune_delta=0.1) > 0.1


class TestValidation:
    @pytest.mark.parametrize("func", [hoeffding_ucb, hb_ucb, wsr_ucb])
    @pytest.mark.parametrize("delta", [0, 1, -0.1, float("nan"), "a"])
    def test_bad_delta(self, func, delta):
        with pytest.raises(EenetError, match="delta must be a (finite )?number"):
            func([0.5], delta)

    @pytest.mark.parametrize("func", [hoeffding_ucb, hb_ucb, wsr_ucb])
    def test_values_outside_the_range(self, func):
        with pytest.raises(EenetError, match=r"x has values in \[0.5, 4.5\], outside the "
                                             r"declared range \[1, 4\]"):
            func([0.5, 2.0, 4.5], 0.1, low=1, high=4)
        with pytest.raises(EenetError, match="non-finite"):
            func([0.5, float("nan")], 0.1)
        with pytest.raises(EenetError, match="low < high"):
            func([0.5], 0.1, low=1, high=1)
        with pytest.raises(EenetError, match=r"shape \[n_samples\] or \[n_rows, n_samples\]"):
            func(np.zeros((2, 2, 2)), 0.1)

    def test_float_error_at_the_ends_is_accepted(self):
        assert hb_ucb([1.0 + 1e-12, 0.0], 0.1) <= 1.0

    @pytest.mark.parametrize("func", [hoeffding_pvalue, hb_pvalue, wsr_pvalue])
    def test_levels_outside_the_range_are_clipped(self, func):
        x = [0.2, 0.3]
        assert func(x, -5.0) == 1.0  # H0: mean >= -5 always holds
        assert func(x, 7.0) == func(x, 1.0)

    def test_unknown_bound_lists_the_valid_names(self):
        with pytest.raises(EenetError, match="unknown bound 'bentkus'; choose one of: hb, "
                                             "hoeffding, wsr"):
            ucb([0.5], 0.1, bound="bentkus")
        with pytest.raises(EenetError, match="choose one of: hb, hoeffding, wsr"):
            pvalue([0.5], 0.1, bound="crc")
        assert sorted(PVALUE_BOUNDS) == BOUNDS


# ---------------------------------------------------------------------------
# conformal risk control and fixed-sequence testing
# ---------------------------------------------------------------------------
class TestFixedSequence:
    @given(st.lists(st.floats(0, 1), max_size=30), st.floats(0.001, 0.999))
    @settings(max_examples=100, deadline=None)
    def test_matches_loop(self, pvalues, delta):
        count = 0
        for p in pvalues:
            if p > delta:
                break
            count += 1
        assert fixed_sequence_test(pvalues, delta) == count

    def test_examples_and_errors(self):
        assert fixed_sequence_test([], 0.1) == 0
        assert fixed_sequence_test([0.2, 0.0], 0.1) == 0
        assert fixed_sequence_test([0.1, 0.1], 0.1) == 2  # p <= delta rejects
        with pytest.raises(EenetError, match="pvalues must be a 1-D array"):
            fixed_sequence_test([[0.1]], 0.1)
        with pytest.raises(EenetError, match="without NaN"):
            fixed_sequence_test([0.01, float("nan")], 0.1)


class TestConformalRiskControl:
    @given(st.integers(1, 6), st.integers(0, 30), st.floats(-0.5, 1.0), st.integers(0, 10**6))
    @settings(max_examples=100, deadline=None)
    def test_matches_loop(self, n_candidates, n, epsilon, seed):
        rng = np.random.default_rng(seed)
        losses = rng.choice([-1.0, 0.0, 0.5, 1.0], size=(n_candidates, n))
        bound = 1.0
        # reference: monotone envelope by a loop, then the CRC criterion row by row
        envelope = [[max(losses[k, i] for k in range(j + 1)) for i in range(n)]
                    for j in range(n_candidates)]
        expected = [(sum(row) / (n + 1) + bound / (n + 1)) for row in envelope]
        np.testing.assert_allclose(crc_risks(losses, bound), expected, rtol=1e-12, atol=1e-12)
        assume(all(abs(v - epsilon) > 1e-9 for v in expected))  # no ties decided by rounding
        selected = None
        for j, value in enumerate(expected):
            if value > epsilon:
                break
            selected = j
        assert crc_select(losses, epsilon, bound) == selected

    def test_known_values(self):
        # three candidates on 9 samples: 0, 1 and 9 losses of 1 in 9; B/(n+1) = 0.1
        losses = [[0] * 9, [0] * 8 + [1], [1] * 9]
        np.testing.assert_allclose(crc_risks(losses, 1.0), [0.1, 0.2, 1.0])
        assert crc_select(losses, 0.2, 1.0) == 1
        assert crc_select(losses, 0.19, 1.0) == 0
        assert crc_select(losses, 0.09, 1.0) is None
        assert crc_select(losses, 1.0, 1.0) == 2
        # negative losses lower the risk; only the upper end B enters
        assert crc_select([[-1] * 4 + [0] * 5, [-1] * 4 + [1] + [0] * 4], 0.2, 1.0) == 1
        # ... unless a safer candidate had a larger loss on that sample: the envelope
        # raises a riskier candidate's -1 to the safer one's 0
        assert crc_select([[0] * 9, [-1] * 4 + [1] * 5], 0.2, 1.0) == 0

    def test_envelope_only_raises_losses(self):
        # sample 0's loss drops from 1 to 0 at the riskier row: the envelope keeps 1
        losses = [[1, 0, 0, 0], [0, 0, 0, 0]]
        np.testing.assert_allclose(crc_risks(losses, 1.0), [0.4, 0.4])

    def test_no_samples_and_errors(self):
        np.testing.assert_array_equal(crc_risks(np.zeros((3, 0)), 2.0), [2.0, 2.0, 2.0])
        assert crc_select(np.zeros((3, 0)), 2.0, 2.0) == 2
        assert crc_select(np.zeros((3, 0)), 1.0, 2.0) is None
        with pytest.raises(EenetError, match="largest value 1.5 above loss_bound 1"):
            crc_risks([[0.0, 1.5]], 1.0)
        with pytest.raises(EenetError, match=r"shape \[n_candidates, n_samples\]"):
            crc_risks([0.0, 1.0], 1.0)


# ---------------------------------------------------------------------------
# validity over many draws (slow)
# ---------------------------------------------------------------------------
def miss_limit(draws: int, delta: float) -> int:
    """Misses allowed: the one-sided 99.9% quantile of Binomial(draws, delta).

    A bound that misses with probability exactly delta fails the check in at
    most 0.1% of seeds; the seeds are fixed, so the check is deterministic.
    """
    return int(scipy.stats.binom.ppf(0.999, draws, delta))


@pytest.mark.slow
class TestCoverage:
    @pytest.mark.parametrize("bound", BOUNDS)
    @pytest.mark.parametrize("population", ["bernoulli", "costs", "beta", "gap"])
    @pytest.mark.parametrize("delta", [0.05, 0.2])
    def test_ucb_misses_at_most_delta(self, bound, population, delta):
        draws, n = 1500, 150
        x, mean, low, high = draw(population, (draws, n), np.random.default_rng(21))
        bounds = ucb(x, delta, bound=bound, low=low, high=high)
        misses = int(np.sum(mean > bounds))
        assert misses <= miss_limit(draws, delta), (misses, draws, delta)

    @pytest.mark.parametrize("bound", BOUNDS)
    @pytest.mark.parametrize("population", ["bernoulli", "costs", "beta", "gap"])
    def test_pvalue_is_super_uniform_at_the_null_boundary(self, bound, population):
        # H0: mean >= alpha with alpha = the true mean, the hardest null
        draws, n, delta = 1500, 150, 0.1
        x, mean, low, high = draw(population, (draws, n), np.random.default_rng(22))
        p = pvalue(x, mean, bound=bound, low=low, high=high, tune_delta=delta)
        assert int(np.sum(p <= delta)) <= miss_limit(draws, delta)

    def test_wsr_is_not_trivially_conservative(self):
        # a valid bound that is also tight misses sometimes: at least 1% of draws at
        # delta = 0.2 (a check that the betting bound is not just returning `high`)
        x, mean, low, high = draw("costs", (1500, 150), np.random.default_rng(23))
        assert np.mean(mean > wsr_ucb(x, 0.2, low=low, high=high)) > 0.01

    @pytest.mark.parametrize("dependent", [False, True])
    def test_fixed_sequence_family_wise_error(self, dependent):
        # 10 hypotheses, nulls at positions 3, 4, 7, 9 (true nulls get uniform p-values,
        # false nulls small ones); FWER = P(any true null rejected) <= delta
        rng = np.random.default_rng(24)
        draws, delta = 20000, 0.1
        null = np.zeros(10, bool)
        null[[3, 4, 7, 9]] = True
        p = rng.beta(0.2, 5.0, size=(draws, 10))
        if dependent:  # the same uniform for every null: fixed-sequence needs no independence
            p[:, null] = rng.random((draws, 1))
        else:
            p[:, null] = rng.random((draws, int(null.sum())))
        errors = sum(bool(np.any(null[:fixed_sequence_test(row, delta)])) for row in p)
        assert errors <= miss_limit(draws, delta)
        # and the test has power: the three false nulls before the first null get through
        assert np.mean([fixed_sequence_test(row, delta) >= 3 for row in p]) > 0.5
