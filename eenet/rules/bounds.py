"""Confidence bounds and tests for the mean of bounded i.i.d. variables.

The building blocks of issue 9 (a budget that holds with stated confidence,
and risk-controlled exits), at the level of arrays:

- upper confidence bounds (UCBs) on a mean and the matching p-values for
  ``H0: mean >= alpha``: Hoeffding (:func:`hoeffding_ucb`,
  :func:`hoeffding_pvalue`), Hoeffding-Bentkus (:func:`hb_ucb`,
  :func:`hb_pvalue`) and Waudby-Smith-Ramdas betting (:func:`wsr_ucb`,
  :func:`wsr_pvalue`), all resolved by name through :data:`UCB_BOUNDS`
  (:func:`ucb`, :func:`pvalue`);

Conformal risk control and fixed-sequence testing, which select within a
family using these, are in :mod:`eenet.rules.certify`. The module holds the
three bounds together (about 540 lines, most of it the formulas in the
docstrings) because they share their validation and rescaling.

Every bound assumes that the values are i.i.d. draws from one population and
lie in an interval ``[low, high]`` known before the data are seen (for a cost,
the cheapest and the dearest exit; for a risk such as an accuracy gap,
``[-1, 1]``). The values are rescaled to ``[0, 1]`` internally and the bound
is mapped back. Taking ``low`` and ``high`` from the data themselves voids the
guarantees.

Samples lie along the last axis: ``x`` may be ``[n_samples]`` (a float comes
back) or ``[n_rows, n_samples]`` (one value per row comes back, e.g. one per
candidate policy evaluated on the same samples). ``n_samples = 0`` is legal:
the UCB is then ``high`` and every p-value is 1.

Nothing here imports torch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping

import numpy as np

from eenet._validation import EenetError, check_choice, check_number

__all__ = [
    "BoundName",
    "UCB_BOUNDS",
    "PVALUE_BOUNDS",
    "hb_pvalue",
    "hb_ucb",
    "hoeffding_pvalue",
    "hoeffding_ucb",
    "pvalue",
    "ucb",
    "wsr_pvalue",
    "wsr_ucb",
]

BoundName = Literal["hoeffding", "hb", "wsr"]

#: values may stray this far outside ``[low, high]`` (relative to its width) through
#: float error before they are refused; they are clipped back into the interval
_RANGE_RTOL = 1e-9
#: the UCBs found by root finding are exact to this (on the [0, 1] scale) and are
#: rounded up by it, so a reported bound is never below the exact one
_ROOT_XTOL = 1e-12
#: largest bet of the betting bound, as a fraction of the largest bet that keeps the
#: capital non-negative (Waudby-Smith and Ramdas suggest 1/2 or 3/4)
_WSR_MAX_BET = 0.75
#: bisection steps of the betting bound; 2**-45 < _ROOT_XTOL
_WSR_STEPS = 45


# ---------------------------------------------------------------------------
# validation and rescaling
# ---------------------------------------------------------------------------
def _check_range(low: Any, high: Any) -> tuple[float, float]:
    low = check_number("low", low)
    high = check_number("high", high)
    if not low < high:
        raise EenetError(f"the value range (low, high) must have low < high, got "
                         f"({low:g}, {high:g})")
    return low, high


def _check_delta(delta: Any, name: str = "delta") -> float:
    return check_number(name, delta, low=0.0, high=1.0, low_open=True, high_open=True)


def _unit_samples(x: Any, low: float, high: float, name: str = "x") -> np.ndarray:
    """``x`` rescaled to ``[0, 1]`` as float64 ``[n_rows, n_samples]``."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise EenetError(f"{name} must be an array of numbers, got {type(x).__name__}") from None
    if arr.ndim not in (1, 2):
        raise EenetError(f"{name} must have shape [n_samples] or [n_rows, n_samples], got "
                         f"shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise EenetError(f"{name} contains {bad} non-finite values; every value must lie in "
                         f"[{low:g}, {high:g}]")
    width = high - low
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        slack = _RANGE_RTOL * width
        if lo < low - slack or hi > high + slack:
            raise EenetError(f"{name} has values in [{lo:g}, {hi:g}], outside the declared "
                             f"range [{low:g}, {high:g}]; every value must lie in it")
    z = np.clip((arr - low) / width, 0.0, 1.0)
    return z[None, :] if z.ndim == 1 else z  # [n_rows, n_samples]


def _to_range(unit: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map bounds on the [0, 1] scale back; 1 becomes ``high`` exactly, despite rounding."""
    return np.where(unit >= 1.0, high, low + (high - low) * unit)


def _shaped(values: np.ndarray, x_ndim: int) -> Any:
    """One value per row, or a float for 1-D input."""
    return float(values[0]) if x_ndim == 1 else values


def _unit_level(alpha: Any, low: float, high: float) -> float:
    """A null level on the [0, 1] scale; levels outside the range are clipped."""
    alpha = check_number("alpha", alpha)
    return min(max((alpha - low) / (high - low), 0.0), 1.0)


# ---------------------------------------------------------------------------
# Hoeffding
# ---------------------------------------------------------------------------
def hoeffding_ucb(x: Any, delta: float, *, low: float = 0.0, high: float = 1.0) -> Any:
    """Hoeffding's upper confidence bound on the mean.

    ``mean(x) + (high - low) * sqrt(log(1 / delta) / (2 n))``, capped at ``high``
    (Hoeffding, "Probability inequalities for sums of bounded random
    variables", JASA 1963, Theorem 2). The simple reference the other bounds
    are measured against: it ignores the variance.

    Guarantee: for i.i.d. values in ``[low, high]`` with mean ``mu``,
    ``P(mu > UCB) <= delta``.

    Args:
        x: values, ``[n_samples]`` or ``[n_rows, n_samples]``.
        delta: miss probability, in (0, 1).
        low: smallest possible value, known in advance.
        high: largest possible value, known in advance.

    Returns:
        The bound (a float, or ``[n_rows]``); ``high`` when ``n_samples = 0``.

    Raises:
        EenetError: ``delta`` outside (0, 1), ``low >= high``, or values outside
            ``[low, high]`` or not finite.

    Example:
        >>> round(hoeffding_ucb([0.5] * 100, 0.1), 4)
        0.6073
    """
    low, high = _check_range(low, high)
    delta = _check_delta(delta)
    z = _unit_samples(x, low, high)
    n = z.shape[1]
    if n == 0:
        out = np.ones(z.shape[0])
    else:
        out = np.minimum(z.mean(axis=1) + math.sqrt(math.log(1 / delta) / (2 * n)), 1.0)
    return _shaped(_to_range(out, low, high), np.ndim(x))


def hoeffding_pvalue(x: Any, alpha: float, *, low: float = 0.0, high: float = 1.0) -> Any:
    """Hoeffding's p-value for ``H0: mean >= alpha``.

    ``exp(-2 n max(alpha - mean_hat, 0)**2)`` on the [0, 1] scale (Hoeffding,
    JASA 1963, Theorem 2); inverting it at ``delta`` gives
    :func:`hoeffding_ucb`.

    Guarantee: under H0, ``P(p <= u) <= u`` for every ``u`` in [0, 1].

    Args:
        x: values, ``[n_samples]`` or ``[n_rows, n_samples]``.
        alpha: the null's level, in the units of ``x`` (clipped to ``[low, high]``).
        low: smallest possible value, known in advance.
        high: largest possible value, known in advance.

    Returns:
        The p-value (a float, or ``[n_rows]``); 1 when ``n_samples = 0``.

    Example:
        >>> round(hoeffding_pvalue([0.5] * 100, 0.6073), 4)
        0.1
    """
    low, high = _check_range(low, high)
    a = _unit_level(alpha, low, high)
    z = _unit_samples(x, low, high)
    n = z.shape[1]
    if n == 0:
        return _shaped(np.ones(z.shape[0]), np.ndim(x))
    gap = np.maximum(a - z.mean(axis=1), 0.0)
    return _shaped(np.exp(-2 * n * gap ** 2), np.ndim(x))


# ---------------------------------------------------------------------------
# Hoeffding-Bentkus
# ---------------------------------------------------------------------------
def _h1(a: float, b: float) -> float:
    """``a log(a/b) + (1-a) log((1-a)/(1-b))``, the Bernoulli relative entropy."""
    import scipy.special  # scipy is imported on use: it costs a third of a second at start-up

    return float(scipy.special.rel_entr(a, b) + scipy.special.rel_entr(1 - a, 1 - b))


def _successes(total: float) -> int:
    """``ceil(total)``, reading totals within float error of an integer as that integer."""
    nearest = round(total)
    if abs(total - nearest) <= 1e-9 * max(1.0, abs(total)):
        return int(nearest)
    return int(math.ceil(total))


def _hb_unit_pvalue(total: float, n: int, a: float) -> float:
    """HB p-value on the [0, 1] scale from the sum of ``n`` values."""
    if n == 0 or a <= 0.0:
        return 1.0
    mean = total / n
    hoeffding = math.exp(-n * _h1(min(mean, a), a))
    import scipy.stats

    bentkus = math.e * float(scipy.stats.binom.cdf(_successes(total), n, a))
    return min(hoeffding, bentkus, 1.0)


def hb_pvalue(x: Any, alpha: float, *, low: float = 0.0, high: float = 1.0) -> Any:
    """The Hoeffding-Bentkus p-value for ``H0: mean >= alpha``.

    On the [0, 1] scale, with ``mean_hat`` the sample mean of ``n`` values
    (Bates, Angelopoulos, Lei, Malik, Jordan, "Distribution-Free,
    Risk-Controlling Prediction Sets", JACM 2021, the HB p-value built from
    the Hoeffding and Bentkus inequalities)::

        p = min(exp(-n h1(min(mean_hat, alpha), alpha)),
                e * P(Binom(n, alpha) <= ceil(n mean_hat)))
        h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))

    The first term is Hoeffding's relative-entropy bound, the second
    Bentkus's, which is much tighter for means near 0 or 1 (a cost near the
    cheapest exit, a small risk).

    Guarantee: for i.i.d. values in ``[low, high]``, under H0
    ``P(p <= u) <= u`` for every ``u`` in [0, 1].

    Args:
        x: values, ``[n_samples]`` or ``[n_rows, n_samples]``.
        alpha: the null's level, in the units of ``x`` (clipped to ``[low, high]``).
        low: smallest possible value, known in advance.
        high: largest possible value, known in advance.

    Returns:
        The p-value (a float, or ``[n_rows]``); 1 when ``n_samples = 0``.

    Example:
        >>> round(hb_pvalue([0] * 100, 0.05), 4)  # min((0.95)**100, e (0.95)**100)
        0.0059
    """
    low, high = _check_range(low, high)
    a = _unit_level(alpha, low, high)
    z = _unit_samples(x, low, high)
    n = z.shape[1]
    out = np.array([_hb_unit_pvalue(float(t), n, a) for t in z.sum(axis=1)])
    return _shaped(out, np.ndim(x))


def _hb_unit_ucb(total: float, n: int, delta: float) -> float:
    if n == 0:
        return 1.0
    mean = total / n
    if mean >= 1.0:
        return 1.0
    # The p-value is continuous and non-increasing in alpha; it is 1 at alpha = mean
    # (the binomial median is at most ceil(n mean), so the Bentkus term is >= e/2) and
    # 0 at alpha = 1, so the root below is the smallest alpha whose p-value is delta.
    import scipy.optimize

    root = scipy.optimize.brentq(lambda a: _hb_unit_pvalue(total, n, a) - delta,
                                 mean, 1.0, xtol=_ROOT_XTOL)
    return min(root + 2 * _ROOT_XTOL, 1.0)


def hb_ucb(x: Any, delta: float, *, low: float = 0.0, high: float = 1.0) -> Any:
    """The Hoeffding-Bentkus upper confidence bound on the mean.

    The smallest ``alpha`` whose HB p-value (:func:`hb_pvalue`) is at most
    ``delta``, found with :func:`scipy.optimize.brentq` and rounded up by
    ``1e-12`` of the range (Bates, Angelopoulos, Lei, Malik, Jordan,
    "Distribution-Free, Risk-Controlling Prediction Sets", JACM 2021).

    Guarantee: for i.i.d. values in ``[low, high]`` with mean ``mu``,
    ``P(mu > UCB) <= delta``. Never above :func:`hoeffding_ucb`, up to that
    rounding (Pinsker's inequality makes the HB p-value at most Hoeffding's).
    Arguments, result and errors as for :func:`hoeffding_ucb`.

    Example:
        >>> round(hb_ucb([0] * 100, 0.1), 4)  # all zeros: 1 - delta ** (1 / n)
        0.0228
    """
    low, high = _check_range(low, high)
    delta = _check_delta(delta)
    z = _unit_samples(x, low, high)
    n = z.shape[1]
    out = np.array([_hb_unit_ucb(float(t), n, delta) for t in z.sum(axis=1)])
    return _shaped(_to_range(out, low, high), np.ndim(x))


# ---------------------------------------------------------------------------
# Waudby-Smith-Ramdas betting
# ---------------------------------------------------------------------------
def _permuted(z: np.ndarray, seed: int | None) -> np.ndarray:
    if seed is None:
        return z
    order = np.random.default_rng(seed).permutation(z.shape[1])
    return z[:, order]


def _wsr_bets(z: np.ndarray, delta: float) -> np.ndarray:
    """Predictable plug-in bets ``[n_rows, n_samples]``, tuned for a fixed ``n``.

    ``lambda_t = sqrt(2 log(1/delta) / (n sigma2_{t-1}))`` with the running
    estimates ``mu_t = (1/2 + sum_{i<=t} x_i) / (t + 1)`` and
    ``sigma2_t = (1/4 + sum_{i<=t} (x_i - mu_i)**2) / (t + 1)``, which use
    only the values before ``t`` (Waudby-Smith and Ramdas 2024, the
    predictable plug-in with its fixed-sample-size tuning, one-sided).
    """
    n_rows, n = z.shape
    t = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(z, axis=1)) / (t + 1)  # mu_t, t = 1..n
    sigma2 = (0.25 + np.cumsum((z - mu) ** 2, axis=1)) / (t + 1)  # sigma2_t, t = 1..n
    sigma2_before = np.concatenate([np.full((n_rows, 1), 0.25), sigma2[:, :-1]], axis=1)
    return np.sqrt(2 * math.log(1 / delta) / (n * sigma2_before))


def _wsr_log_capital(z: np.ndarray, bets: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``max_t log K_t(m)`` per row, the gambler's best capital against ``mean >= m``.

    ``K_t(m) = prod_{i<=t} (1 - lambda_i(m) (x_i - m))`` with the bets truncated to
    ``lambda_i(m) = min(lambda_i, c / (1 - m))``, ``c`` = :data:`_WSR_MAX_BET`, so
    every factor is at least ``1 - c > 0``. Each factor is non-decreasing in
    ``m``, so the capital is too.
    """
    headroom = np.maximum(1.0 - m, 0.0)[:, None]  # [n_rows, 1]
    with np.errstate(divide="ignore"):
        cap = np.where(headroom > 0, _WSR_MAX_BET / headroom, np.inf)
    lam = np.minimum(bets, cap)  # [n_rows, n_samples]
    log_capital = np.cumsum(np.log1p(lam * (m[:, None] - z)), axis=1)
    return np.maximum(log_capital.max(axis=1, initial=0.0), 0.0)


def wsr_pvalue(x: Any, alpha: float, *, low: float = 0.0, high: float = 1.0,
               tune_delta: float = 0.1, seed: int | None = 0) -> Any:
    """The betting p-value for ``H0: mean >= alpha`` (Waudby-Smith and Ramdas).

    ``p = min(1, 1 / max_{t<=n} K_t(alpha))`` where ``K_t`` is the capital of a
    gambler who bets against the mean being ``alpha`` or more, with the
    predictable plug-in bets of Waudby-Smith and Ramdas, "Estimating means of
    bounded random variables by betting", JRSS-B 2024 (the hedged capital
    process, one-sided, with its fixed-sample-size tuning). Under H0 the
    capital is a non-negative supermartingale, so Ville's inequality makes
    ``p`` valid even with the maximum over ``t``.

    The bets depend on the order of the samples; with ``seed`` the samples are
    first put in a random order drawn independently of their values, so the
    p-value is valid whatever order they came in (for instance sorted by
    class). ``seed=None`` keeps the given order, valid only when that order is
    itself exchangeable.

    Guarantee: for i.i.d. values in ``[low, high]``, under H0
    ``P(p <= u) <= u`` for every ``u`` in [0, 1], over the draw of the data
    and of the order.

    Args:
        x: values, ``[n_samples]`` or ``[n_rows, n_samples]``.
        alpha: the null's level, in the units of ``x`` (clipped to ``[low, high]``).
        low: smallest possible value, known in advance.
        high: largest possible value, known in advance.
        tune_delta: the level the bets are tuned for, in (0, 1); the p-value is
            valid whatever it is.
        seed: seed of the random order of the samples, or ``None`` to keep theirs.

    Returns:
        The p-value (a float, or ``[n_rows]``); 1 when ``n_samples = 0``.

    Example:
        >>> wsr_pvalue([0.1] * 200, 0.5) < 1e-6
        True
    """
    low, high = _check_range(low, high)
    tune_delta = _check_delta(tune_delta, "tune_delta")
    a = _unit_level(alpha, low, high)
    z = _unit_samples(x, low, high)
    if z.shape[1] == 0:
        return _shaped(np.ones(z.shape[0]), np.ndim(x))
    z = _permuted(z, seed)
    log_k = _wsr_log_capital(z, _wsr_bets(z, tune_delta), np.full(z.shape[0], a))
    return _shaped(np.exp(-log_k), np.ndim(x))


def wsr_ucb(x: Any, delta: float, *, low: float = 0.0, high: float = 1.0,
            seed: int | None = 0, tune_delta: float | None = None) -> Any:
    """The Waudby-Smith-Ramdas betting upper confidence bound on the mean.

    The smallest ``m`` whose betting capital (:func:`wsr_pvalue`) reaches
    ``1 / delta`` at some ``t <= n``: the one-sided
    predictable-plug-in bound of Waudby-Smith and Ramdas, "Estimating means
    of bounded random variables by betting", JRSS-B 2024. The capital is
    non-decreasing in ``m``, so the bound is found by bisection (45 halvings,
    all rows at once), keeping the end that is rejected: the bound reported is
    never below the exact one. It adapts to the variance, so it is much
    tighter than Hoeffding's when the values spread little.

    The bets depend on the order of the samples; with ``seed`` they are first
    put in a random order drawn independently of their values (see
    :func:`wsr_pvalue`). Rows share the order, so ``x[j]`` and ``x[k]`` may
    hold two candidates' values on the same samples.

    The bets are tuned for ``delta`` unless ``tune_delta`` is given (the
    paper's recommendation). The bound is then smaller for a larger
    ``delta`` in every check we ran with ``delta <= 0.2``, but not by
    construction: truncating the bets (so the capital stays positive) can
    reverse the order for two nearby levels, which we have seen only above
    ``delta = 0.5`` with a few dozen samples. With a fixed ``tune_delta`` the
    bound is non-increasing in ``delta`` exactly, at the price of a slightly
    wider bound away from ``tune_delta`` (about 3% at ``delta = 0.05`` and 9%
    at ``0.01`` with ``tune_delta = 0.1``).

    Guarantee: for i.i.d. values in ``[low, high]`` with mean ``mu``,
    ``P(mu > UCB) <= delta``, over the draw of the data and of the order,
    whatever ``tune_delta`` is. With one sample the bound is valid but close
    to ``high``.

    Args:
        x: values, ``[n_samples]`` or ``[n_rows, n_samples]``.
        delta: miss probability, in (0, 1).
        low: smallest possible value, known in advance.
        high: largest possible value, known in advance.
        seed: seed of the random order of the samples, or ``None`` to keep theirs.
        tune_delta: the level the bets are tuned for, in (0, 1); ``None`` tunes
            them for ``delta``.

    Returns:
        The bound (a float, or ``[n_rows]``); ``high`` when ``n_samples = 0``.

    Raises:
        EenetError: ``delta`` or ``tune_delta`` outside (0, 1), ``low >= high``,
            or values outside ``[low, high]`` or not finite.

    Example:
        >>> 0.1 < wsr_ucb([0.1] * 1000, 0.1) < 0.12
        True
    """
    low, high = _check_range(low, high)
    delta = _check_delta(delta)
    tune = delta if tune_delta is None else _check_delta(tune_delta, "tune_delta")
    z = _unit_samples(x, low, high)
    n_rows, n = z.shape
    if n == 0:
        return _shaped(np.full(n_rows, high), np.ndim(x))
    z = _permuted(z, seed)
    bets = _wsr_bets(z, tune)
    threshold = math.log(1 / delta)
    # Written by hand: a bisection on all rows at once (scipy's brentq takes one row).
    # lo is never rejected (at m = 0 no factor exceeds 1), hi always is or equals 1.
    lo = np.zeros(n_rows)
    hi = np.ones(n_rows)
    for _ in range(_WSR_STEPS):
        mid = 0.5 * (lo + hi)
        rejected = _wsr_log_capital(z, bets, mid) >= threshold
        hi = np.where(rejected, mid, hi)
        lo = np.where(rejected, lo, mid)
    return _shaped(_to_range(hi, low, high), np.ndim(x))


# ---------------------------------------------------------------------------
# by name
# ---------------------------------------------------------------------------
#: the upper confidence bounds by name; each takes ``(x, delta, *, low, high)``
UCB_BOUNDS: Mapping[str, Callable[..., Any]] = {
    "hoeffding": hoeffding_ucb,
    "hb": hb_ucb,
    "wsr": wsr_ucb,
}
#: the p-values by name; each takes ``(x, alpha, *, low, high)``
PVALUE_BOUNDS: Mapping[str, Callable[..., Any]] = {
    "hoeffding": hoeffding_pvalue,
    "hb": hb_pvalue,
    "wsr": wsr_pvalue,
}


def ucb(x: Any, delta: float, *, bound: BoundName = "wsr", low: float = 0.0,
        high: float = 1.0, seed: int | None = 0) -> Any:
    """The upper confidence bound named ``bound`` (see :data:`UCB_BOUNDS`).

    ``seed`` only matters to ``"wsr"`` (the order of the samples).

    Raises:
        EenetError: an unknown ``bound`` (the message lists the valid names), or
            what the bound itself refuses.

    Example:
        >>> ucb([0.5] * 100, 0.1, bound="hoeffding") == hoeffding_ucb([0.5] * 100, 0.1)
        True
    """
    check_choice("bound", bound, UCB_BOUNDS)
    if bound == "wsr":
        return wsr_ucb(x, delta, low=low, high=high, seed=seed)
    return UCB_BOUNDS[bound](x, delta, low=low, high=high)


def pvalue(x: Any, alpha: float, *, bound: BoundName = "hb", low: float = 0.0,
           high: float = 1.0, tune_delta: float = 0.1, seed: int | None = 0) -> Any:
    """The p-value for ``H0: mean >= alpha`` named ``bound`` (see :data:`PVALUE_BOUNDS`).

    ``tune_delta`` and ``seed`` only matter to ``"wsr"`` (its bets are tuned
    for ``tune_delta``, and the samples put in a random order).

    Raises:
        EenetError: an unknown ``bound`` (the message lists the valid names), or
            what the p-value itself refuses.
    """
    check_choice("bound", bound, PVALUE_BOUNDS)
    if bound == "wsr":
        return wsr_pvalue(x, alpha, low=low, high=high, tune_delta=tune_delta, seed=seed)
    return PVALUE_BOUNDS[bound](x, alpha, low=low, high=high)
