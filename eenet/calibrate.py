"""From per-exit scores to per-exit thresholds that meet an average-cost budget.

A *score* ``scores[n, k]`` says how ready sample ``n`` is to leave at exit
``k`` (higher = readier). A threshold vector ``t`` [n_exits] turns scores into
a policy: each sample leaves at the first exit ``k`` with
``scores[n, k] >= t[k]``; the last exit's threshold is treated as ``-inf``,
so every sample leaves exactly once (:func:`apply_thresholds`).

Three calibration modes choose ``t`` on a validation split
(:func:`calibrate`):

- ``"assignment"``: an exit distribution given by the caller (EENet's learned
  mean assignment, Ilhan et al., "EENet: Learning to Early Exit for Adaptive
  Inference", WACV 2024) is tilted so its cost equals the budget
  (:func:`tilt_fractions`), then turned into sequential quotas
  (:func:`quota_thresholds`).
- ``"geometric"``: MSDNet's budgeted rule (Huang et al., "Multi-Scale Dense
  Networks for Resource Efficient Image Classification", ICLR 2018): exit
  ``k`` receives a share proportional to ``g**k`` with ``g`` solved so the
  expected cost equals the budget (:func:`geometric_fractions`), then quotas.
- ``"search"``: thresholds that maximise validation accuracy subject to the
  validation average cost staying within the budget
  (:func:`search_thresholds`).

Thresholds fitted on one split spend a little more on another. With the
budget guard on (:func:`guard_target`), every mode is calibrated against a
target slightly below the budget, chosen by bootstrapping the fitting
procedure on the validation data itself.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from eenet._validation import EenetError, check_budget, check_choice, check_costs, check_finite
from eenet.metrics import exit_fractions

__all__ = [
    "CalibrationMode",
    "Thresholds",
    "apply_thresholds",
    "calibrate",
    "geometric_fractions",
    "guard_target",
    "quota_thresholds",
    "search_thresholds",
    "tilt_fractions",
]

CalibrationMode = Literal["assignment", "geometric", "search"]
MODES: tuple[str, ...] = ("assignment", "geometric", "search")

_BUDGET_RTOL = 1e-9  # relative slack when comparing a cost with the budget
_QUOTA_EPS = 1e-9  # absorbs float error in fraction * n_samples before flooring
_FRACTION_FLOOR = 1e-9  # mass given to empty exits when a tilt cannot reach the budget


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise EenetError(f"{name} must have shape [n_samples, n_exits], got shape {arr.shape}")
    check_finite(name, arr)
    return arr


def _as_correct(correct: Any, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.shape != shape:
        raise EenetError(f"correct must have shape {shape} (one flag per sample and exit, "
                         f"like scores), got {arr.shape}")
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise EenetError("correct must hold booleans (or 0/1), got other values")
        arr = arr.astype(bool)
    return arr


def _as_thresholds(thresholds: Any, n_exits: int) -> np.ndarray:
    arr = np.asarray(thresholds, dtype=np.float64)
    if arr.shape != (n_exits,):
        raise EenetError(f"thresholds must have shape ({n_exits},) (one per exit), "
                         f"got {arr.shape}")
    if np.isnan(arr).any():
        raise EenetError(f"thresholds must not be NaN, got {arr.tolist()}")
    return arr


def _as_fractions(fractions: Any, n_exits: int, name: str = "fractions") -> np.ndarray:
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


def _fits(cost: float, budget: float) -> bool:
    return cost <= budget * (1 + _BUDGET_RTOL) + 1e-300


# ---------------------------------------------------------------------------
# thresholds <-> exits
# ---------------------------------------------------------------------------
def apply_thresholds(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Exit of every sample: the first exit whose score reaches its threshold.

    Args:
        scores: [n_samples, n_exits] finite scores, higher = readier to exit.
        thresholds: [n_exits] thresholds; ``+inf`` closes an exit, and the
            last entry is ignored (treated as ``-inf``) so every sample exits.

    Returns:
        int64 [n_samples], exits in ``[0, n_exits)``.

    Raises:
        EenetError: shapes disagree, or scores are not finite.

    Example:
        >>> import numpy as np
        >>> apply_thresholds(np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([0.5, 0.99]))
        array([0, 1])
    """
    scores = _as_scores(scores)
    thresholds = _as_thresholds(thresholds, scores.shape[1])
    passed = scores >= thresholds  # [n_samples, n_exits]
    passed[:, -1] = True
    return np.argmax(passed, axis=1).astype(np.int64)


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
    scores = _as_scores(scores)
    n, k_exits = scores.shape
    fractions = _as_fractions(fractions, k_exits)
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


# ---------------------------------------------------------------------------
# exit distributions that meet a budget
# ---------------------------------------------------------------------------
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

    Warns:
        UserWarning: the budget is above the last exit's cost; everyone goes
            to the last exit.

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
        if budget > costs[-1] * (1 + _BUDGET_RTOL):
            warnings.warn(f"budget {budget:g} is above the last exit's cost {costs[-1]:g}; "
                          f"everyone goes to the last exit", stacklevel=2)
        out[-1] = 1.0
        return out
    if budget <= costs[0]:
        out[0] = 1.0
        return out
    idx = np.arange(k_exits, dtype=np.float64)

    def excess(log_g: float) -> float:
        return _dist_cost(scipy.special.softmax(log_g * idx), costs) - budget

    # At |log g| = 800 the softmax is one-hot in float64, so the bracket holds
    # for every budget strictly between c_0 and c_{K-1}.
    log_g = scipy.optimize.brentq(excess, -800.0, 800.0, xtol=1e-13, rtol=4 * np.finfo(float).eps,
                                  maxiter=500)
    return scipy.special.softmax(log_g * idx)


def _tilted(log_f: np.ndarray, cost_norm: np.ndarray, tau: float) -> np.ndarray:
    return scipy.special.softmax(log_f - tau * cost_norm)


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
    fractions = _as_fractions(fractions, costs.size)
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
    tau = scipy.optimize.brentq(excess, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps,
                                maxiter=500)
    return _tilted(log_f, cost_norm, tau)


def _quota_fit(scores: np.ndarray, costs: np.ndarray, target: float,
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
    if _fits(cost, target):
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
            if _fits(cost, target):
                return th, dist, b
            hi = b
            if b == c0:
                break
        # Otherwise (large tied blocks) bisect between c_0, which always fits
        # (everyone leaves at exit 0), and the lowest budget that did not.
        lo = c0
        best = fit(lo)
        best_b = lo
        if _fits(best[2], target):
            for _ in range(40):
                if hi - lo <= 1e-7 * target:
                    break
                mid = 0.5 * (lo + hi)
                cand = fit(mid)
                if _fits(cand[2], target):
                    lo, best, best_b = mid, cand, mid
                else:
                    hi = mid
    return best[0], best[1], best_b


# ---------------------------------------------------------------------------
# validation-optimal thresholds
# ---------------------------------------------------------------------------
class _Search:
    """Coordinate search over per-exit threshold grids (hand-written: no library
    optimises this piecewise-constant, budget-constrained objective).

    Every exit k < K-1 gets an ascending grid of candidate thresholds ending
    in ``+inf`` (exit closed); ``bins_t[k, n]`` counts the grid values at or
    below ``scores[n, k]``, so sample n passes candidate g iff
    ``bins_t[k, n] > g``. With the other thresholds fixed, the accuracy and cost
    of every candidate at exit k follow from one ``bincount`` and a cumulative
    sum over the samples that reach exit k, so one coordinate step costs
    O(n_samples * n_exits) whatever the grid size.
    """

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: np.ndarray,
                 n_grid: int, extra: list[np.ndarray]) -> None:
        n, k_exits = scores.shape
        self.n, self.k_exits = n, k_exits
        self.correct_t = np.ascontiguousarray(correct.T, dtype=np.float64)  # [n_exits, n]
        self.costs = costs
        self.scale = float(costs[-1]) if costs[-1] > 0 else 1.0
        self.grids: list[np.ndarray] = []
        self.bins_t = np.empty((k_exits - 1, n), dtype=np.int64)  # [n_exits - 1, n]
        levels = np.linspace(0.0, 1.0, n_grid)
        for k in range(k_exits - 1):
            cand = [np.quantile(scores[:, k], levels), [np.inf]]
            cand += [th[k:k + 1] for th in extra]
            grid = np.unique(np.concatenate(cand))
            self.grids.append(grid)
            self.bins_t[k] = np.searchsorted(grid, scores[:, k], side="right")

    def index_of(self, thresholds: np.ndarray) -> np.ndarray:
        return np.array([int(np.searchsorted(g, t)) for g, t in
                         zip(self.grids, thresholds[:-1])], dtype=np.int64)

    def thresholds(self, g: np.ndarray) -> np.ndarray:
        out = np.full(self.k_exits, -np.inf)
        for k, grid in enumerate(self.grids):
            out[k] = grid[g[k]]
        return out

    def _outcome(self, g: np.ndarray, skip: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Correctness and cost of every sample with exit ``skip`` closed, and
        whether the sample reaches exit ``skip`` (passes no earlier exit)."""
        last = self.k_exits - 1
        corr = self.correct_t[last].copy()
        cost = np.full(self.n, self.costs[last])
        reach = np.ones(self.n, dtype=bool)
        # Walk the exits from the last to the first: the earliest pass wins.
        for j in range(last - 1, -1, -1):
            if j == skip:
                continue
            p = self.bins_t[j] > g[j]
            corr = np.where(p, self.correct_t[j], corr)
            cost = np.where(p, self.costs[j], cost)
            if j < skip:
                reach &= ~p
        return corr, cost, reach

    def evaluate(self, g: np.ndarray) -> tuple[float, float]:
        corr, cost, _ = self._outcome(g, -1)
        return float(corr.sum()), float(cost.sum())

    def tables(self, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Total correct count and total cost for every candidate at exit k."""
        corr_wo, cost_wo, reach = self._outcome(g, k)
        b = self.bins_t[k][reach]
        size = self.grids[k].size + 1
        d_acc = np.bincount(b, weights=self.correct_t[k][reach] - corr_wo[reach],
                            minlength=size)
        d_cost = np.bincount(b, weights=self.costs[k] - cost_wo[reach], minlength=size)
        # Candidate g admits the samples with bins > g: a suffix sum over bins.
        gain_acc = d_acc.sum() - np.cumsum(d_acc)[:-1]
        gain_cost = d_cost.sum() - np.cumsum(d_cost)[:-1]
        return corr_wo.sum() + gain_acc, cost_wo.sum() + gain_cost

    def _order(self, sweep: int, rng: np.random.Generator) -> np.ndarray:
        """Exits to visit in a coordinate sweep: in order first, then shuffled."""
        order = np.arange(self.k_exits - 1)
        if sweep:
            rng.shuffle(order)
        return order

    def lagrangian(self, g: np.ndarray, lam: float, order_rng: np.random.Generator,
                   max_sweeps: int) -> np.ndarray:
        """Coordinate ascent on ``correct - lam * cost / c_{K-1}``."""
        g = g.copy()
        for sweep in range(max_sweeps):
            changed = False
            for k in self._order(sweep, order_rng):
                acc, cost = self.tables(g, k)
                obj = acc - lam * cost / self.scale
                best = obj.max()
                ties = np.flatnonzero(obj >= best - 1e-9)
                pick = ties[np.argmin(cost[ties])]
                if obj[pick] > obj[g[k]] + 1e-9 or (obj[pick] >= obj[g[k]] - 1e-9
                                                     and cost[pick] < cost[g[k]] - 1e-9):
                    g[k] = pick
                    changed = True
            if not changed:
                break
        return g

    def constrained(self, g: np.ndarray, cap: float, order_rng: np.random.Generator,
                    max_sweeps: int) -> np.ndarray:
        """Coordinate ascent on accuracy with total cost <= cap.

        A move is taken when it raises the correct count, or keeps it and
        lowers the cost (freed budget lets later moves raise accuracy). An
        infeasible start is first repaired by the single move that fits the
        cap with the highest accuracy.
        """
        g = g.copy()
        acc_now, cost_now = self.evaluate(g)
        if cost_now > cap:
            best: tuple[float, float, int, int] | None = None
            cheapest: tuple[float, int, int] | None = None
            for k in range(self.k_exits - 1):
                acc, cost = self.tables(g, k)
                ok = np.flatnonzero(cost <= cap)
                if ok.size:
                    j = ok[np.lexsort((cost[ok], -acc[ok]))[0]]
                    if best is None or (acc[j], -cost[j]) > (best[0], -best[1]):
                        best = (acc[j], cost[j], k, j)
                j = int(np.argmin(cost))
                if cheapest is None or cost[j] < cheapest[0]:
                    cheapest = (cost[j], k, j)
            assert cheapest is not None
            k, j = (best[2], best[3]) if best is not None else (cheapest[1], cheapest[2])
            g[k] = j
            acc_now, cost_now = self.evaluate(g)
            if cost_now > cap:
                return g  # cannot happen when grid 0 admits every sample at exit 0
        for sweep in range(max_sweeps):
            changed = False
            for k in self._order(sweep, order_rng):
                acc, cost = self.tables(g, k)
                ok = np.flatnonzero(cost <= cap)
                if not ok.size:
                    continue
                j = ok[np.lexsort((cost[ok], -acc[ok]))[0]]
                if acc[j] > acc_now + 0.5 or (acc[j] > acc_now - 0.5
                                              and cost[j] < cost_now - 1e-9 * self.scale):
                    g[k] = j
                    acc_now, cost_now = acc[j], cost[j]
                    changed = True
            if not changed:
                break
        return g


def search_thresholds(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray,
                      budget: float, *, seed: int = 0, n_grid: int = 64,
                      n_bisect: int = 14, max_sweeps: int = 8,
                      init: np.ndarray | None = None) -> np.ndarray:
    """Thresholds that maximise validation accuracy with average cost <= budget.

    Every exit k < K-1 chooses its threshold from a grid of ``n_grid`` score
    quantiles (plus ``+inf``, the exit closed); a coarse grid keeps the
    search from fitting single validation samples. Two stages:

    1. Lagrangian relaxation: for a price ``lam`` on cost, coordinate ascent
       maximises ``#correct - lam * total_cost / c_{K-1}`` (each coordinate
       step is solved exactly over its grid); ``lam`` is bisected on a log
       scale to the cheapest price whose solution fits the budget. The price
       makes every exit trade accuracy for cost at the same rate, which a
       one-exit-at-a-time search under a hard cap cannot do. Prices only
       reach the budgets on the convex hull of the accuracy-cost curve, so
       the solution at the dearest price that does not fit is kept too.
    2. Local repair under the hard cap: coordinate ascent on accuracy with
       the validation cost kept within the budget, taking moves that add
       correct samples, or keep them and cut cost (a start over the budget
       first takes the single move that fits with the most correct
       samples). It runs from both Lagrangian solutions, from MSDNet's
       geometric quota thresholds at this budget (repaired to fit) and from
       ``init`` if given; the most accurate result wins (ties: the cheaper).
       So the result is never less accurate on validation than the
       geometric rule.

    Args:
        scores: [n_samples, n_exits] finite scores, higher = readier to exit.
        correct: [n_samples, n_exits] bool, whether each exit is right.
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.
        seed: seeds the order in which exits are visited after the first sweep.
        n_grid: candidate thresholds per exit (score quantiles).
        n_bisect: bisection steps on the price ``lam``.
        max_sweeps: coordinate sweeps per ascent.
        init: optional [n_exits] thresholds to start the repair stage from.

    Returns:
        float64 [n_exits] thresholds, the last one ``-inf``; their validation
        cost is at most the budget.

    Raises:
        EenetError: bad shapes or values, or a budget below the cheapest exit.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> s = rng.random((500, 3)); ok = rng.random((500, 3)) < s
        >>> t = search_thresholds(s, ok, np.array([1.0, 2.0, 3.0]), 2.0)
        >>> float(np.array([1.0, 2.0, 3.0])[apply_thresholds(s, t)].mean()) <= 2.0
        True
    """
    scores = _as_scores(scores)
    correct = _as_correct(correct, scores.shape)
    costs = check_costs(costs, scores.shape[1])
    budget = check_budget(budget, costs)
    n, k_exits = scores.shape
    if k_exits == 1:
        return np.array([-np.inf])
    if n_grid < 2:
        raise EenetError(f"n_grid must be at least 2, got {n_grid}")
    cap = budget * n * (1 + _BUDGET_RTOL)
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geo, _, _ = _quota_fit(scores, costs, min(budget, float(costs[-1])),
                               lambda b: geometric_fractions(costs, b))
    starts = [geo] + ([] if init is None else [_as_thresholds(init, k_exits)])
    search = _Search(scores, correct, costs, n_grid, starts)
    start_idx = [search.index_of(th) for th in starts]
    closed = np.array([g.size - 1 for g in search.grids])  # everyone at the last exit

    # Stage 1: the cheapest price on cost whose solution fits, and the
    # dearest one whose solution does not (repaired in stage 2, it often
    # beats the fitting one: the prices jump over budgets between the two).
    g_free = search.lagrangian(closed, 0.0, rng, max_sweeps)
    candidates = [g_free] if search.evaluate(g_free)[1] <= cap else []
    if not candidates:
        lo, hi = 0.0, 1.0
        g_lo, g_hi = g_free, None
        while hi < 1e12:
            g = search.lagrangian(start_idx[0], hi, rng, max_sweeps)
            if search.evaluate(g)[1] <= cap:
                g_hi = g
                break
            lo, hi, g_lo = hi, hi * 8, g
        if g_hi is not None:
            lo = max(lo, hi / 8)
            for _ in range(n_bisect):
                mid = math.sqrt(lo * hi)
                g = search.lagrangian(g_hi, mid, rng, max_sweeps)
                if search.evaluate(g)[1] <= cap:
                    hi, g_hi = mid, g
                else:
                    lo, g_lo = mid, g
            candidates.append(g_hi)
        candidates.append(g_lo)
    # Stage 2: repair under the hard cap from every start.
    best, best_key = None, None
    for g0 in candidates + start_idx:
        g = search.constrained(g0, cap, rng, max_sweeps)
        acc, cost = search.evaluate(g)
        if cost > cap:
            continue
        key = (acc, -cost)
        if best_key is None or key > best_key:
            best, best_key = g, key
    assert best is not None  # the geometric start always fits after _quota_fit
    return search.thresholds(best)


# ---------------------------------------------------------------------------
# budget guard
# ---------------------------------------------------------------------------
def _check_guard_args(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 2:
        raise EenetError(f"n_boot must be an integer of at least 2, got {n_boot}")
    if not 0.5 <= level < 1:
        raise EenetError(f"level must lie in [0.5, 1), got {level}")


def _guard(scores: np.ndarray, correct: np.ndarray | None, costs: np.ndarray, budget: float,
           fit_fn: Callable[..., Any], apply_fn: Callable[[np.ndarray, Any], np.ndarray], *,
           seed: int, n_boot: int, level: float, n_eval: int | None) -> dict[str, Any]:
    """Bootstrap margin of :func:`guard_target`; returns the target and diagnostics."""
    n = scores.shape[0]
    if n < 2:
        warnings.warn(f"{n} validation sample(s) are too few for the budget guard; "
                      f"calibrating against the budget itself", stacklevel=3)
        return {"target": budget, "margin": 0.0, "n_boot": 0, "level": level}

    # Bootstrap world: a resample plays the validation split and the full
    # validation split plays the unseen population. The optimism of the
    # in-sample cost, cost(full) - cost(resample), of thresholds fitted on the
    # resample estimates how much more the real thresholds spend on new data.
    eval_var: list[float] = []

    def optimism(idx: np.ndarray) -> float:
        idx = np.asarray(idx, dtype=np.int64)
        params = fit_fn(scores[idx], None if correct is None else correct[idx], costs, budget)
        full = costs[apply_fn(scores, params)]
        inbag = costs[apply_fn(scores[idx], params)].mean()
        eval_var.append(float(full.var()))
        return float(full.mean() - inbag)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scipy.stats.bootstrap((np.arange(n),), optimism, n_resamples=n_boot,
                                    vectorized=False, method="percentile",
                                    rng=np.random.default_rng(seed))
    delta = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    n_eval = n if n_eval is None else int(n_eval)
    # Normal upper bound on the overshoot: the fit's optimism (mean and spread
    # over resamples) plus the sampling noise of a mean over n_eval unseen samples.
    sd_fit = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    sd_eval = math.sqrt(float(np.mean(eval_var)) / max(n_eval, 1)) if eval_var else 0.0
    z = float(scipy.stats.norm.ppf(level))
    margin = max(0.0, float(delta.mean()) + z * math.hypot(sd_fit, sd_eval))
    target = max(float(costs[0]), budget - margin)
    return {"target": target, "margin": margin, "optimism_mean": float(delta.mean()),
            "optimism_sd": sd_fit, "eval_sd": sd_eval, "n_eval": n_eval, "n_boot": n_boot,
            "level": level, "z": z}


def guard_target(scores: np.ndarray, correct: np.ndarray | None, costs: np.ndarray,
                 budget: float, thresholds_fn: Callable[..., Any], *, seed: int = 0,
                 n_boot: int = 20, level: float = 0.9, n_eval: int | None = None,
                 apply_fn: Callable[[np.ndarray, Any], np.ndarray] | None = None) -> float:
    """A calibration target below the budget so unseen data stays within it.

    Thresholds fitted on validation spend a little more on other data: their
    quantiles are noisy, and a search that stops just under the budget tends
    to pick thresholds whose validation cost happens to be low. The guard
    measures this with the bootstrap estimate of the optimism of an
    in-sample estimate (Efron, "Estimating the Error Rate of a Prediction
    Rule", JASA 1983; Efron & Tibshirani, "An Introduction to the
    Bootstrap", 1993, Ch. 17), through :func:`scipy.stats.bootstrap`: in the
    bootstrap world a resample plays the validation split and the full split
    plays the unseen population, so ``thresholds_fn`` is
    refitted on ``n_boot`` resamples of the validation split, and each fit's
    optimism ``delta_b = cost(full split) - cost(resample)`` is recorded. The
    overshoot on ``n_eval`` unseen samples is then bounded by the normal
    quantile at ``level``::

        margin = mean(delta) + z_level * sqrt(var(delta) + var(cost) / n_eval)

    where ``var(cost)`` is the per-sample cost variance under the fitted
    policy (the noise of averaging over a finite unseen split). The target
    is ``max(c_0, budget - max(margin, 0))``. The margin grows with the
    spread of the per-sample costs and shrinks like ``1/sqrt(n_samples)``:
    about 1-1.7 % of the budget at N = 10,000 for exits costing
    (1, 1.5, 5, 6), where unguarded thresholds overshoot on a fresh split
    about half the time.

    Args:
        scores: [n_samples, n_exits] validation scores (or any per-sample
            array ``thresholds_fn`` and ``apply_fn`` understand).
        correct: [n_samples, n_exits] bool, or None when the fit needs no labels.
        costs: [n_exits] cumulative exit costs.
        budget: average cost per sample.
        thresholds_fn: ``fn(scores, correct, costs, budget) -> params``
            fitting the policy (thresholds [n_exits] by default).
        seed: seed of the resampling.
        n_boot: bootstrap resamples (each refits ``thresholds_fn`` once).
        level: one-sided probability that the unseen cost stays within the
            budget, under the normal approximation.
        n_eval: size of the unseen split the budget applies to; default the
            validation size.
        apply_fn: ``fn(scores, params) -> exits``; default
            :func:`apply_thresholds`.

    Returns:
        The target average cost, in ``[c_0, budget]``.

    Raises:
        EenetError: invalid costs, budget, ``n_boot`` or ``level``.
    """
    costs = check_costs(costs)
    budget = check_budget(budget, costs)
    _check_guard_args(n_boot, level)
    scores = np.asarray(scores)
    info = _guard(scores, correct, costs, budget, thresholds_fn,
                  apply_fn or apply_thresholds, seed=seed, n_boot=n_boot, level=level,
                  n_eval=n_eval)
    return float(info["target"])


# ---------------------------------------------------------------------------
# result and the one entry point
# ---------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


@dataclass(frozen=True, eq=False)
class Thresholds:
    """Calibrated per-exit thresholds and what they did on validation.

    Attributes:
        values: [n_exits] float64 thresholds for :func:`apply_thresholds`
            (``+inf`` closes an exit; the last is ``-inf``).
        mode: ``"assignment"``, ``"geometric"`` or ``"search"``.
        budget: the budget asked for (average cost per sample).
        target: the budget actually calibrated against (below ``budget`` when
            the guard is on).
        fractions: [n_exits] realized exit distribution on validation.
        val_cost: realized average cost on validation.
        val_accuracy: realized accuracy on validation.
        predicted_cost: expected cost of the quota distribution (quota modes;
            ``None`` for ``"search"``).
        diagnostics: plain-container details (guard, target distribution, ...).
    """

    values: np.ndarray
    mode: str
    budget: float
    target: float
    fractions: np.ndarray
    val_cost: float
    val_accuracy: float
    predicted_cost: float | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def n_exits(self) -> int:
        return int(self.values.size)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Exit of every sample, int64 [n_samples] (see :func:`apply_thresholds`)."""
        return apply_thresholds(scores, self.values)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (lists, floats, strings; infinities stay floats)."""
        return {
            "values": [float(v) for v in self.values],
            "mode": self.mode,
            "budget": float(self.budget),
            "target": float(self.target),
            "fractions": [float(v) for v in self.fractions],
            "val_cost": float(self.val_cost),
            "val_accuracy": float(self.val_accuracy),
            "predicted_cost": None if self.predicted_cost is None else float(self.predicted_cost),
            "diagnostics": _plain(self.diagnostics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Thresholds":
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            EenetError: keys are missing or values have the wrong form.
        """
        required = ("values", "mode", "budget", "target", "fractions", "val_cost",
                    "val_accuracy")
        if not isinstance(data, Mapping):
            raise EenetError(f"thresholds must be a dict, got {type(data).__name__}")
        missing = [key for key in required if key not in data]
        if missing:
            raise EenetError(f"thresholds lack {', '.join(missing)}")
        values = np.asarray(data["values"], dtype=np.float64)
        fractions = np.asarray(data["fractions"], dtype=np.float64)
        if values.ndim != 1 or fractions.shape != values.shape or np.isnan(values).any():
            raise EenetError(f"thresholds values/fractions must be equal-length lists, got "
                             f"{data['values']!r} and {data['fractions']!r}")
        predicted = data.get("predicted_cost")
        return cls(values=values, mode=str(data["mode"]), budget=float(data["budget"]),
                   target=float(data["target"]), fractions=fractions,
                   val_cost=float(data["val_cost"]), val_accuracy=float(data["val_accuracy"]),
                   predicted_cost=None if predicted is None else float(predicted),
                   diagnostics=dict(data.get("diagnostics") or {}))


def _search_beats_geometric(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray,
                            budget: float, *, seed: int, repeats: int
                            ) -> tuple[bool, dict[str, Any]]:
    """Does the searched rule beat MSDNet's geometric rule on samples it did not see?

    Searched thresholds are picked to maximise accuracy on the very samples
    they are scored on, so their validation accuracy is optimistic; where
    the budget leaves little to gain (near the full model's cost, say) the
    optimism can exceed the gain and the search loses to the plain rule on
    new data. Two-fold cross-validation, ``repeats`` times with fresh random
    halves: both rules are fitted on one half at ``budget`` and scored on the
    other. The search is kept only if it gets strictly more held-out samples
    right in total.
    """
    n = scores.shape[0]
    if n < 40:  # halves this small say nothing; trust the search
        return True, {"kept": "search", "skipped": f"{n} samples are too few to cross-validate"}
    rng = np.random.default_rng([seed, 7919])
    rows = np.arange(n)
    won = {"search": 0, "geometric": 0}
    for _ in range(repeats):
        perm = rng.permutation(n)
        halves = (perm[: n // 2], perm[n // 2:])
        for fit_idx, held in (halves, halves[::-1]):
            s_fit, c_fit = scores[fit_idx], correct[fit_idx]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_search = search_thresholds(s_fit, c_fit, costs, budget, seed=seed)
                t_geo = _quota_fit(s_fit, costs, budget,
                                   lambda b: geometric_fractions(costs, b))[0]
            for name, t in (("search", t_search), ("geometric", t_geo)):
                won[name] += int(correct[held][rows[: held.size],
                                              apply_thresholds(scores[held], t)].sum())
    keep = won["search"] > won["geometric"]
    return keep, {"held_out_correct": won, "kept": "search" if keep else "geometric"}


def calibrate(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, budget: float, *,
              mode: CalibrationMode, fractions: np.ndarray | None = None, guard: bool = True,
              seed: int = 0, n_boot: int = 20, level: float = 0.9,
              cv_repeats: int = 2) -> Thresholds:
    """Per-exit thresholds on validation scores that meet an average-cost budget.

    Modes (see the module docstring):

    - ``"assignment"``: ``fractions`` (EENet's learned mean assignment) tilted
      to the target cost (:func:`tilt_fractions`), then quota thresholds. If
      the learned distribution leaves exits empty so that no tilt reaches the
      target, the empty exits get a tiny floor of mass (1e-9) and a warning.
    - ``"geometric"``: :func:`geometric_fractions` at the target, then quota
      thresholds.
    - ``"search"``: :func:`search_thresholds` at the target, kept where
      cross-validation confirms it beats the geometric rule out of sample.

    Quota thresholds are repaired so the realized validation cost never
    exceeds the target even when tied scores keep samples from leaving.

    With ``guard`` on, the target is :func:`guard_target`'s (bootstrap,
    ``n_boot`` refits of the same mode). A budget at or above the last exit's
    cost needs no guard: every mode sends everyone to the last exit, the full
    model (an early exit is sometimes right where the last is wrong on
    validation, but thresholds chosen for that did not hold on held-out
    data); a budget strictly above it also warns.

    Args:
        scores: [n_samples, n_exits] validation scores, higher = readier.
        correct: [n_samples, n_exits] bool, whether each exit is right.
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.
        mode: ``"assignment"``, ``"geometric"`` or ``"search"``.
        fractions: [n_exits] exit distribution; required for ``"assignment"``.
        guard: calibrate against the guarded target.
        seed: seed of the guard's resampling and of the search.
        n_boot: guard resamples.
        level: guard confidence (see :func:`guard_target`).
        cv_repeats: ``"search"`` only: repeats of the two-fold check that the
            searched thresholds beat the geometric rule on held-out samples;
            where they do not, the geometric rule's thresholds are used
            (:func:`_search_beats_geometric`). 0 turns the check off.

    Returns:
        :class:`Thresholds`.

    Raises:
        EenetError: bad input, an unknown mode, ``"assignment"`` without
            ``fractions``, or a budget below the cheapest exit.

    Warns:
        UserWarning: the budget exceeds the full model's cost; the learned
            distribution cannot reach the target without a floor.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> s = rng.random((1000, 3)); ok = rng.random((1000, 3)) < 0.5 + 0.4 * s
        >>> th = calibrate(s, ok, np.array([1.0, 2.0, 3.0]), 2.0, mode="geometric")
        >>> th.val_cost <= th.target <= 2.0
        True
    """
    scores = _as_scores(scores)
    n, k_exits = scores.shape
    correct = _as_correct(correct, scores.shape)
    costs = check_costs(costs, k_exits)
    budget = check_budget(budget, costs)
    check_choice("calibration mode", mode, MODES)
    if guard:
        _check_guard_args(n_boot, level)
    if mode == "assignment":
        if fractions is None:
            raise EenetError("mode 'assignment' needs fractions (the learned exit "
                             "distribution, e.g. scorer.exit_distribution())")
        fractions = _as_fractions(fractions, k_exits)
    diagnostics: dict[str, Any] = {"seed": seed}
    full = budget >= costs[-1] * (1 - 1e-12)
    if budget > costs[-1] * (1 + _BUDGET_RTOL):
        warnings.warn(f"budget {budget:g} is above the last exit's cost {costs[-1]:g}; "
                      f"every policy fits", stacklevel=2)

    dist_fn: Callable[[float], np.ndarray] | None = None
    if mode == "geometric":
        def dist_fn(b: float) -> np.ndarray:
            return geometric_fractions(costs, b)
    elif mode == "assignment":
        assert fractions is not None
        support = fractions > 0
        lo_cost, hi_cost = float(costs[support].min()), float(costs[support].max())
        floored = (fractions + _FRACTION_FLOOR) / (1 + k_exits * _FRACTION_FLOOR)

        def unreachable(b: float) -> bool:
            return not lo_cost * (1 - 1e-12) <= b <= hi_cost * (1 + 1e-12)

        def dist_fn(b: float) -> np.ndarray:
            return tilt_fractions(floored if unreachable(b) else fractions, costs, b)

    def fit(s: np.ndarray, c: np.ndarray | None, _costs: np.ndarray, b: float) -> np.ndarray:
        if dist_fn is None:
            assert c is not None
            return search_thresholds(s, c, costs, b, seed=seed)
        return _quota_fit(s, costs, b, dist_fn)[0]

    target = budget
    if k_exits == 1:
        values, dist, dist_budget = np.array([-np.inf]), np.ones(1), budget
    elif full:
        values = np.full(k_exits, np.inf)
        values[-1] = -np.inf
        dist, dist_budget = np.eye(k_exits)[-1], float(costs[-1])
    else:
        if guard and not full:
            info = _guard(scores, correct, costs, budget, fit, apply_thresholds, seed=seed,
                          n_boot=n_boot, level=level, n_eval=None)
            target = float(info.pop("target"))
            diagnostics["guard"] = info
        if mode == "search":
            b = min(target, float(costs[-1]))
            values = search_thresholds(scores, correct, costs, b, seed=seed)
            dist, dist_budget = None, None
            if cv_repeats > 0:
                keep, info = _search_beats_geometric(scores, correct, costs, b, seed=seed,
                                                     repeats=cv_repeats)
                diagnostics["search_cv"] = info
                if not keep:
                    values = _quota_fit(scores, costs, b,
                                        lambda x: geometric_fractions(costs, x))[0]
        else:
            assert dist_fn is not None
            values, dist, dist_budget = _quota_fit(scores, costs, target, dist_fn)
    if mode == "assignment" and k_exits > 1 and not full and unreachable(target):
        warnings.warn(f"the exit distribution {np.round(fractions, 4).tolist()} spends "
                      f"between {lo_cost:g} and {hi_cost:g} whatever the tilt, so it "
                      f"cannot meet the target {target:g}; its empty exits got a "
                      f"{_FRACTION_FLOOR:g} floor of mass", stacklevel=2)
        diagnostics["fraction_floor"] = _FRACTION_FLOOR
    exits = apply_thresholds(scores, values)
    val_cost = float(costs[exits].mean())
    val_accuracy = float(correct[np.arange(n), exits].mean())
    predicted = None if dist is None else _dist_cost(dist, costs)
    if dist is not None:
        diagnostics["target_fractions"] = dist
        diagnostics["distribution_budget"] = dist_budget
    if not _fits(val_cost, target):
        warnings.warn(f"the calibrated thresholds spend {val_cost:g} on validation, above "
                      f"the target {target:g}", stacklevel=2)
    return Thresholds(values=values, mode=mode, budget=budget, target=target,
                      fractions=exit_fractions(exits, k_exits), val_cost=val_cost,
                      val_accuracy=val_accuracy, predicted_cost=predicted,
                      diagnostics=_plain(diagnostics))
