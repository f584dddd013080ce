"""Exit distributions that meet a budget, and the quota thresholds that realise them.

- :func:`geometric_fractions`: MSDNet's budgeted rule (Huang et al., "Multi-Scale
  Dense Networks for Resource Efficient Image Classification", ICLR 2018):
  exit k receives a share proportional to ``g**k``, ``g`` solved for the budget.
- :func:`tilt_fractions`: eenet's budget-exact version of EENet's learned exit
  distribution (Ilhan et al., WACV 2024): an exponential tilt toward cheap
  exits, solved for the budget.
- :func:`quota_thresholds`: EENet's and MSDNet's calibration: exit by exit,
  the most confident remaining samples fill the exit's quota.
- :func:`fit_quota`: quotas for a distribution, repaired so the realized cost
  on the calibration data never exceeds the target.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np

from eenet._validation import BUDGET_RTOL, EenetError, check_budget, check_costs
from eenet.rules.thresholds import apply_thresholds

__all__ = ["fit_quota", "fits", "geometric_fractions", "quota_thresholds", "tilt_fractions"]

_QUOTA_EPS = 1e-9  # absorbs float error in fraction * n_samples before flooring


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def fits(cost: float, budget: float) -> bool:
    """Whether an average cost stays within the budget (up to float rounding)."""
    return cost <= budget * (1 + BUDGET_RTOL) + 1e-300


def check_fractions(fractions: Any, n_exits: int, name: str = "fractions") -> np.ndarray:
    """A distribution over exits: [n_exits], non-negative, summing to 1."""
    arr = np.asarray(fractions, dtype=np.float64)
    if arr.shape != (n_exits,):
        raise EenetError(f"{name} must have shape ({n_exits},) (one share per exit), "
                         f"got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise EenetError(f"{name} must be finite and non-negative, got {arr.tolist()}")
    total = float(arr.sum())
    if abs(total - 1.0) > 1e-6:
        raise EenetError(f"{name} must sum to 1 (a distribution over exits), got sum {total:.6g}")
    return arr / total



def quota_thresholds(scores: np.ndarray, fractions: np.ndarray, *,
                     cumulative: bool = True) -> np.ndarray:
    """Sequential quota thresholds: the most confident samples leave first.

    For k = 0..K-2 in order, among the samples that have not left yet, the
    ``m_k`` with the highest ``scores[:, k]`` leave at exit k and ``t_k`` is
    the lowest score among them (EENet's calibration, Ilhan et al. WACV 2024,
    Sec. 3.3; MSDNet's budgeted evaluation). ``t_{K-1} = -inf``.

    Ties are handled safely: when the ``m_k``-th highest score is shared by
    samples outside the quota, ``t_k`` is raised just above the tied value
    (``np.nextafter``), so fewer than ``m_k`` leave rather than more. A quota
    of zero gives ``t_k = +inf``. Applying the result with
    :func:`apply_thresholds` to the same scores reproduces the selection.

    Args:
        scores: [n_samples, n_exits] finite scores.
        fractions: [n_exits] target exit distribution (non-negative, sums to 1).
        cumulative: if True (default), quotas follow the cumulative shares:
            by the end of exit k, ``floor(sum(fractions[:k+1]) * n_samples)``
            samples have left in total, so the rounding (and any shortfall
            left by ties) carries to the next exit instead of piling up at the
            last, most expensive one. If False, exit k takes
            ``floor(fractions[k] * n_samples)`` of the remaining samples, the
            paper's literal rule.

    Returns:
        float64 [n_exits] thresholds, the last one ``-inf``.

    Raises:
        EenetError: bad shapes, non-finite scores or an invalid distribution.

    Example:
        >>> import numpy as np
        >>> s = np.array([[0.9, 0.0], [0.8, 0.0], [0.8, 0.0], [0.1, 0.0]])
        >>> t = quota_thresholds(s, np.array([0.5, 0.5]))  # quota 2; 0.8 is tied
        >>> apply_thresholds(s, t).tolist()  # one leaves early rather than three
        [0, 1, 1, 1]
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, k_exits = scores.shape
    fractions = check_fractions(fractions, k_exits)
    thresholds = np.full(k_exits, -np.inf)
    remaining = np.ones(n, dtype=bool)
    n_left = 0
    cum = np.cumsum(fractions)
    for k in range(k_exits - 1):
        if cumulative:
            quota = int(math.floor(cum[k] * n + _QUOTA_EPS)) - n_left
        else:
            quota = int(math.floor(fractions[k] * n + _QUOTA_EPS))
        s = scores[remaining, k]
        quota = min(max(quota, 0), s.size)
        if quota == 0:
            thresholds[k] = np.inf
            continue
        if quota == s.size:
            t = s.min()
        else:
            t = np.partition(s, s.size - quota)[s.size - quota]  # quota-th highest
            if np.count_nonzero(s >= t) > quota:
                # Ties at the boundary: admit only the scores strictly above it.
                t = np.nextafter(t, np.inf)
        thresholds[k] = t
        leave = remaining & (scores[:, k] >= t)
        n_left += int(leave.sum())
        remaining &= ~leave
    return thresholds


def _dist_cost(fractions: np.ndarray, costs: np.ndarray) -> float:
    return float(np.dot(fractions, costs))


def geometric_fractions(costs: np.ndarray, budget: float) -> np.ndarray:
    """MSDNet's exit distribution for a budget: ``p_k`` proportional to ``g**k``.

    ``g > 0`` is solved with :func:`scipy.optimize.brentq` (on ``log g``) so
    that ``sum_k p_k c_k`` equals the budget; the cost rises monotonically
    from ``c_0`` (``g -> 0``: everyone at exit 0) to ``c_{K-1}``
    (``g -> inf``: everyone at the last exit). Huang et al., "Multi-Scale
    Dense Networks for Resource Efficient Image Classification", ICLR 2018,
    Sec. 5 (budgeted batch classification).

    Args:
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.

    Returns:
        float64 [n_exits], non-negative, summing to 1, with expected cost equal
        to the budget (to about 1e-12 relative).

    Raises:
        EenetError: the budget is below the cheapest exit, or costs are invalid.

    Example:
        >>> import numpy as np
        >>> p = geometric_fractions(np.array([1.0, 2.0, 3.0]), 2.0)
        >>> bool(np.isclose(p @ [1.0, 2.0, 3.0], 2.0)), p.round(3).tolist()
        (True, [0.333, 0.333, 0.333])
    """
    costs = check_costs(costs)
    budget = check_budget(budget, costs)
    k_exits = costs.size
    out = np.zeros(k_exits)
    if budget >= costs[-1] * (1 - 1e-15):
        out[-1] = 1.0
        return out
    if budget <= costs[0] * (1 + BUDGET_RTOL):
        # everyone leaves as cheaply as possible: at the deepest exit that costs no more
        # than the first (exits of equal cost are free to go on to)
        out[int(np.flatnonzero(costs <= costs[0] * (1 + BUDGET_RTOL)).max())] = 1.0
        return out
    idx = np.arange(k_exits, dtype=np.float64)
    cost_list = costs.tolist()

    def excess(log_g: float) -> float:
        # plain floats: a few exits' worth of numpy calls costs ten times more, and this
        # runs some twenty times per solve, hundreds of solves per search calibration
        top = max(0.0, log_g * (k_exits - 1))
        weights = [math.exp(log_g * i - top) for i in range(k_exits)]
        return sum(w * c for w, c in zip(weights, cost_list)) / sum(weights) - budget

    # At |log g| = 800 the softmax is one-hot in float64, so the bracket holds
    # for every budget strictly between c_0 and c_{K-1}.
    import scipy.optimize  # imported on use: it costs a third of a second at start-up

    log_g = scipy.optimize.brentq(excess, -800.0, 800.0, xtol=1e-13, rtol=4 * np.finfo(float).eps,
                                  maxiter=500)
    return _softmax(log_g * idx)


def _tilted(log_f: np.ndarray, cost_norm: np.ndarray, tau: float) -> np.ndarray:
    return _softmax(log_f - tau * cost_norm)


def tilt_fractions(fractions: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Tilt an exit distribution so its expected cost equals the budget.

    ``f_k(tau)`` proportional to ``fractions_k * exp(-tau * c_k / c_{K-1})``;
    the expected cost falls monotonically in ``tau``, which is solved with
    :func:`scipy.optimize.brentq`. ``tau = 0`` returns the distribution as
    given. An exponential tilt keeps the shape of the distribution and moves
    mass only as far as the budget needs (it is the distribution closest to
    ``fractions`` in KL divergence among those with the given cost).

    Exits with zero mass stay empty under any tilt, so the reachable costs
    are those between the cheapest and the most expensive exit that carries
    mass. A budget outside that range gets the nearest reachable
    distribution (all mass on the cheapest, or the most expensive, supported
    exits) and a warning naming its cost.

    Args:
        fractions: [n_exits] exit distribution (non-negative, sums to 1).
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.

    Returns:
        float64 [n_exits] distribution with expected cost equal to the budget,
        or the nearest reachable one.

    Raises:
        EenetError: invalid fractions, costs or budget.

    Warns:
        UserWarning: the budget cannot be reached by tilting.

    Example:
        >>> import numpy as np
        >>> f = tilt_fractions(np.array([0.2, 0.3, 0.5]), np.array([1.0, 2.0, 4.0]), 2.0)
        >>> round(float(f @ [1.0, 2.0, 4.0]), 9)
        2.0
    """
    costs = check_costs(costs)
    fractions = check_fractions(fractions, costs.size)
    budget = check_budget(budget, costs)
    support = fractions > 0
    lo_cost, hi_cost = float(costs[support].min()), float(costs[support].max())
    if costs[-1] <= 0 or hi_cost - lo_cost <= 0:
        reachable = lo_cost
        if not math.isclose(reachable, budget, rel_tol=1e-12):
            warnings.warn(f"tilting cannot change the cost of this exit distribution; its "
                          f"cost stays at {reachable:g} (budget {budget:g})", stacklevel=2)
        return fractions.copy()
    with np.errstate(divide="ignore"):
        log_f = np.log(fractions)
    cost_norm = costs / costs[-1]

    def limit(cheapest: bool) -> np.ndarray:
        edge = lo_cost if cheapest else hi_cost
        out = np.where(support & (costs == edge), fractions, 0.0)
        return out / out.sum()

    if budget <= lo_cost * (1 + 1e-12):
        if budget < lo_cost * (1 - 1e-12):
            warnings.warn(f"budget {budget:g} is below every exit this distribution uses; "
                          f"the nearest reachable cost is {lo_cost:g} (all of its mass on "
                          f"its cheapest exit)", stacklevel=2)
        return limit(cheapest=True)
    if budget >= hi_cost * (1 - 1e-12):
        if budget > hi_cost * (1 + 1e-12):
            warnings.warn(f"budget {budget:g} is above every exit this distribution uses; "
                          f"the nearest reachable cost is {hi_cost:g} (all of its mass on "
                          f"its most expensive exit)", stacklevel=2)
        return limit(cheapest=False)

    def excess(tau: float) -> float:
        return _dist_cost(_tilted(log_f, cost_norm, tau), costs) - budget

    # Widen the bracket until the cost changes sign (tiny cost gaps need a
    # large tau); the limits above guarantee a sign change exists.
    lo, hi = -1.0, 1.0
    while excess(lo) < 0 and lo > -1e15:
        lo *= 4
    while excess(hi) > 0 and hi < 1e15:
        hi *= 4
    if excess(lo) < 0:
        return limit(cheapest=False)
    if excess(hi) > 0:
        return limit(cheapest=True)
    import scipy.optimize

    tau = scipy.optimize.brentq(excess, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps,
                                maxiter=500)
    return _tilted(log_f, cost_norm, tau)


def fit_quota(scores: np.ndarray, costs: np.ndarray, target: float,
               dist_fn: Callable[[float], np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Quota thresholds for ``dist_fn(target)``, repaired so the realized cost fits.

    Ties (and rounding) can keep samples from leaving early, so the realized
    validation cost can exceed the distribution's expected cost. If it does,
    the distribution's budget is lowered by bisection until the realized
    cost fits the target (``c_0`` always fits: everyone leaves at exit 0).

    Returns:
        (thresholds [n_exits], the distribution used [n_exits], its budget).
    """
    def fit(b: float) -> tuple[np.ndarray, np.ndarray, float]:
        dist = dist_fn(b)
        th = quota_thresholds(scores, dist)
        return th, dist, float(costs[apply_thresholds(scores, th)].mean())

    th, dist, cost = fit(target)
    if fits(cost, target):
        return th, dist, target
    c0 = float(costs[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Rounding alone overshoots by a few samples' worth: lowering the
        # distribution's budget by the overshoot usually fits at once.
        b, hi = target, target
        for _ in range(4):
            b = max(c0, b - (cost - target))
            th, dist, cost = fit(b)
            if fits(cost, target):
                return th, dist, b
            hi = b
            if b == c0:
                break
        # Otherwise (large tied blocks) bisect between c_0, which always fits
        # (everyone leaves at exit 0), and the lowest budget that did not.
        lo = c0
        best = fit(lo)
        best_b = lo
        if fits(best[2], target):
            # a budget step that moves no quota by a whole sample changes nothing
            gaps = np.diff(costs)
            resolution = 0.25 * float(gaps[gaps > 0].min() if np.any(gaps > 0) else 0.0) \
                / max(scores.shape[0], 1)
            for _ in range(40):
                if hi - lo <= max(1e-7 * target, resolution):
                    break
                mid = 0.5 * (lo + hi)
                cand = fit(mid)
                if fits(cand[2], target):
                    lo, best, best_b = mid, cand, mid
                else:
                    hi = mid
    return best[0], best[1], best_b


