"""Certify one policy of an ordered family on held-out data: a budget, or a risk level.

The caller builds a one-parameter family of candidate exit policies (for
instance the calibrated thresholds for targets swept down from the budget,
or a grid of score thresholds), orders it, and evaluates every candidate on
the same ``n_samples`` certification samples: ``costs[j, i]`` is the cost
sample ``i`` spends under candidate ``j``, ``risks[j, i]`` its risk (against
the full model, say). Two questions are then answered with stated
confidence:

- :func:`certify_budget`: the most accurate candidate whose **expected cost**
  is at most the budget, with probability at least ``1 - delta``;
- :func:`certify_risk`: the cheapest candidate whose **risk** is at most
  ``epsilon``, in expectation (conformal risk control) or with probability
  at least ``1 - delta`` (upper confidence bounds, Learn-then-Test).

Both test the candidates in a fixed sequence, from the safe end, and stop at
the first that fails, so the guarantee holds for the candidate selected and
not only for each one alone; they return a :class:`Certificate` that records
what was certified.

What the guarantees need:

- the certification samples are i.i.d. (exchangeable for conformal risk
  control) draws from the population the policy will meet;
- the family and its order are fixed **before** these samples are seen: a
  family whose thresholds were fitted on the same samples is not covered,
  so fit the family on one part of the validation data and certify on the
  other;
- ``cost_range`` / ``risk_range`` is known in advance (the cheapest and
  dearest exit's cost; ``[-1, 1]`` for an accuracy gap), not read off the
  data.

The bounds themselves live in :mod:`eenet.rules.bounds`; conformal risk
control's statistic (:func:`crc_risks`, :func:`crc_select`) and Learn-then-Test's
fixed-sequence test (:func:`fixed_sequence_test`) are here, with the
certification they serve (about 560 lines, most of it the guarantees in the
docstrings). Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from eenet._validation import EenetError, check_choice, check_number
from eenet.rules.bounds import hb_pvalue, ucb

__all__ = [
    "crc_risks",
    "crc_select",
    "fixed_sequence_test",
    "COST_BOUNDS",
    "RISK_BOUNDS",
    "Certificate",
    "CostBound",
    "RiskBound",
    "certify_budget",
    "certify_risk",
]

CostBound = Literal["wsr", "hb", "hoeffding"]
RiskBound = Literal["crc", "ucb-hb", "ucb-wsr", "ucb-hoeffding", "ltt"]

#: cost bounds: name -> what it is
COST_BOUNDS: dict[str, str] = {
    "wsr": "Waudby-Smith-Ramdas betting upper confidence bound",
    "hb": "Hoeffding-Bentkus upper confidence bound",
    "hoeffding": "Hoeffding upper confidence bound",
}
#: risk bounds: name -> what it is
RISK_BOUNDS: dict[str, str] = {
    "crc": "conformal risk control (in expectation)",
    "ucb-hb": "Hoeffding-Bentkus upper confidence bounds, scanned from the safe end",
    "ucb-wsr": "Waudby-Smith-Ramdas betting upper confidence bounds, scanned from the safe end",
    "ucb-hoeffding": "Hoeffding upper confidence bounds, scanned from the safe end",
    "ltt": "Learn-then-Test, fixed-sequence testing of Hoeffding-Bentkus p-values",
}
#: losses may stray this far above their bound (relative), through float rounding
_RANGE_RTOL = 1e-9
#: candidates bounded per call while scanning: a few first, then more (the scan stops at
#: the first failure, and the betting bound handles many rows at once cheaply)
_CHUNKS = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Certificate:
    """What a fixed-sequence certification tested and what it certified.

    Attributes:
        kind: ``"budget"`` or ``"risk"``.
        bound: the bound's name (a key of :data:`COST_BOUNDS` or :data:`RISK_BOUNDS`).
        index: the row certified (the last that passed, in testing order), or
            ``None`` when the first candidate tested already failed.
        target: the budget, or the risk level ``epsilon``.
        delta: the miss probability ``delta`` (the confidence is ``1 - delta``);
            ``None`` for conformal risk control, whose guarantee is in expectation.
        n_samples: certification samples per candidate.
        tested: the rows tested, in order: the certified prefix and then the
            first that failed (absent when every candidate passed).
        values: the statistic of each tested row, compared with ``target``
            (``"ucb"``, ``"crc-risk"``) or with ``delta`` (``"p-value"``).
        statistic: ``"ucb"``, ``"crc-risk"`` or ``"p-value"``.
        value_range: the declared ``(low, high)`` range of the per-sample values.
        seed: seed of the sample order used by the betting bound (``None``:
            the given order, or a bound that does not depend on it).
    """

    kind: Literal["budget", "risk"]
    bound: str
    index: int | None
    target: float
    delta: float | None
    n_samples: int
    tested: tuple[int, ...]
    values: tuple[float, ...]
    statistic: str
    value_range: tuple[float, float]
    seed: int | None = None

    @property
    def certified(self) -> bool:
        """Whether any candidate was certified."""
        return self.index is not None

    @property
    def confidence(self) -> float | None:
        """``1 - delta``, or ``None`` for a guarantee in expectation."""
        return None if self.delta is None else 1.0 - self.delta

    @property
    def guarantee(self) -> str:
        """The promise made for the selected row, in one sentence."""
        if self.index is None:
            return (f"nothing certified: the first candidate tested (row {self.tested[0]}) "
                    f"failed the {self.bound} test at {self._level()}")
        quantity = "expected cost" if self.kind == "budget" else "risk"
        if self.delta is None:
            return (f"E[{quantity} of row {self.index} on a new sample] <= {self.target:g} "
                    f"({self.bound}, n = {self.n_samples})")
        return (f"P({quantity} of row {self.index} > {self.target:g}) <= {self.delta:g} "
                f"({self.bound}, n = {self.n_samples})")

    def _level(self) -> str:
        target = f"{'budget' if self.kind == 'budget' else 'epsilon'} {self.target:g}"
        return target if self.delta is None else f"{target}, delta {self.delta:g}"

    def to_row(self) -> dict[str, Any]:
        """One CSV row of plain values; tested rows and values joined with ``;``."""
        return {
            "kind": self.kind,
            "bound": self.bound,
            "index": self.index,
            "target": self.target,
            "delta": self.delta,
            "n_samples": self.n_samples,
            "statistic": self.statistic,
            "tested": ";".join(str(i) for i in self.tested),
            "values": ";".join(f"{v:.6g}" for v in self.values),
            "low": self.value_range[0],
            "high": self.value_range[1],
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _check_matrix(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise EenetError(f"{name} must be an array of numbers, got "
                         f"{type(values).__name__}") from None
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise EenetError(f"{name} must have shape [n_candidates, n_samples] with at least one "
                         f"candidate, got shape {arr.shape}")
    return arr


def _check_value_range(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EenetError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise EenetError(f"{name} must be a pair of finite numbers with low < high, got "
                         f"{value!r}")
    return low, high


def _check_order(order: Sequence[int] | None, n_candidates: int) -> np.ndarray:
    if order is None:
        return np.arange(n_candidates)
    arr = np.asarray(order)
    if (arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer)
            or arr.min() < 0 or arr.max() >= n_candidates or np.unique(arr).size != arr.size):
        raise EenetError(f"order must list distinct row indices in [0, {n_candidates}), "
                         f"safest first, got {np.asarray(order).tolist()!r}")
    return arr.astype(np.int64)


def _check_delta(delta: Any) -> float:
    return check_number("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise EenetError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _scan(order: np.ndarray, statistic: Callable[[np.ndarray], Any],
          passes: Callable[[np.ndarray], np.ndarray]) -> tuple[int | None, list[int], list[float]]:
    """Test rows in ``order`` a chunk at a time until the first failure.

    ``statistic(rows) -> [len(rows)]``; ``passes(values) -> bool array``.
    Returns the last row that passed (or ``None``), the rows tested and their values.
    """
    tested: list[int] = []
    values: list[float] = []
    last = None
    start = 0
    for step in range(order.size):
        size = _CHUNKS[min(step, len(_CHUNKS) - 1)]
        rows = order[start:start + size]
        start += size
        if rows.size == 0:
            break
        stats = np.atleast_1d(np.asarray(statistic(rows), dtype=np.float64))
        ok = passes(stats)
        failed = np.flatnonzero(~ok)
        stop = int(failed[0]) + 1 if failed.size else rows.size
        tested.extend(int(r) for r in rows[:stop])
        values.extend(float(v) for v in stats[:stop])
        passed = stop - 1 if failed.size else stop
        if passed:
            last = int(rows[passed - 1])
        if failed.size:
            break
    return last, tested, values


# ---------------------------------------------------------------------------
# conformal risk control and fixed-sequence testing
# ---------------------------------------------------------------------------
def crc_risks(losses: Any, loss_bound: float) -> np.ndarray:
    """Conformal risk control's inflated empirical risk of each candidate.

    For candidates ordered from the safest (row 0) to the riskiest, each
    sample's loss is first made non-decreasing along the rows
    (``max`` over the safer candidates, the monotone envelope of Angelopoulos
    et al., which only raises losses), then::

        (n / (n + 1)) * R_hat + B / (n + 1)

    with ``R_hat`` the mean loss over the ``n`` samples and ``B`` =
    ``loss_bound`` the largest possible loss (Angelopoulos, Bates, Fisch,
    Lei, Schuster, "Conformal Risk Control", ICLR 2024, Theorem 1).

    Args:
        losses: ``[n_candidates, n_samples]``, at most ``loss_bound``; may be
            negative.
        loss_bound: ``B``, the largest loss any sample can have.

    Returns:
        ``[n_candidates]``, non-decreasing; ``B`` for every row when ``n_samples = 0``.

    Example:
        >>> crc_risks([[0, 0, 0], [0, 1, 0]], 1.0).tolist()
        [0.25, 0.5]
    """
    bound = check_number("loss_bound", loss_bound)
    arr = _loss_matrix(losses, bound)
    n = arr.shape[1]
    if n == 0:
        return np.full(arr.shape[0], bound)
    envelope = np.maximum.accumulate(arr, axis=0)  # [n_candidates, n_samples]
    return (envelope.sum(axis=1) + bound) / (n + 1)  # = (n/(n+1)) R_hat + B/(n+1)


def _loss_matrix(losses: Any, bound: float) -> np.ndarray:
    arr = _check_matrix("losses", losses)
    if not np.all(np.isfinite(arr)):
        raise EenetError(f"losses contains {int(np.sum(~np.isfinite(arr)))} non-finite "
                         f"values; every loss must be a finite number <= {bound:g}")
    if arr.size and arr.max() > bound + _RANGE_RTOL * max(1.0, abs(bound)):
        raise EenetError(f"losses has a largest value {arr.max():g} above loss_bound "
                         f"{bound:g}; every loss must be <= loss_bound")
    return np.minimum(arr, bound)


def crc_select(losses: Any, epsilon: float, loss_bound: float) -> int | None:
    """The riskiest candidate that conformal risk control admits at level ``epsilon``.

    Candidates are ordered from the safest (row 0) to the riskiest, so that
    each sample's loss is non-decreasing along the rows (where it is not, the
    monotone envelope of :func:`crc_risks` is used, which keeps the
    guarantee). The selected row is the last of the leading rows with
    ``(n/(n+1)) R_hat + B/(n+1) <= epsilon`` (Angelopoulos, Bates, Fisch, Lei,
    Schuster, "Conformal Risk Control", ICLR 2024, Theorem 1).

    Guarantee: for exchangeable samples, ``E[loss of a new sample under the
    selected candidate] <= epsilon`` (in expectation over the calibration data
    and the new sample, not with high probability). ``None`` means not even
    row 0 passes; the theorem then selects row 0, which keeps the guarantee
    only when row 0's loss is at most ``epsilon`` on every sample (as for
    everyone at the last exit with a risk measured against it).

    Args:
        losses: ``[n_candidates, n_samples]``, at most ``loss_bound``; may be
            negative.
        epsilon: the risk level.
        loss_bound: ``B``, the largest loss any sample can have.

    Returns:
        The selected row, or ``None``.

    Example:
        >>> crc_select([[0] * 9, [0] * 8 + [1], [1] * 9], 0.2, 1.0)
        1
    """
    epsilon = check_number("epsilon", epsilon)
    failed = np.flatnonzero(crc_risks(losses, loss_bound) > epsilon)
    count = int(failed[0]) if failed.size else None
    if count is None:
        return len(np.asarray(losses)) - 1
    return count - 1 if count else None


def fixed_sequence_test(pvalues: Any, delta: float) -> int:
    """How many hypotheses, taken in their fixed order, a fixed-sequence test rejects.

    Reject ``H_0``, ``H_1``, ... while their p-values are ``<= delta`` and stop
    at the first that is not. Learn-then-Test uses it with the candidates in
    an order fixed before the data are seen, safest first (Angelopoulos,
    Bates, Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive
    Algorithms to Achieve Risk Control", 2021).

    Guarantee: if every p-value is valid, the family-wise error rate (the
    chance of rejecting any true null) is at most ``delta``, without any
    correction for the number of hypotheses: a true null can only be rejected
    after every hypothesis before it was, and the first true null is rejected
    with probability at most ``delta``.

    Args:
        pvalues: ``[n_hypotheses]`` in testing order.
        delta: the family-wise error rate, in (0, 1).

    Returns:
        ``k``: the hypotheses ``0 .. k-1`` are rejected (0 when the first is not).

    Example:
        >>> fixed_sequence_test([0.01, 0.04, 0.2, 0.01], 0.05)
        2
    """
    delta = _check_delta(delta)
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or np.any(np.isnan(p)):
        raise EenetError(f"pvalues must be a 1-D array of numbers without NaN, got shape "
                         f"{p.shape}")
    failed = np.flatnonzero(~(p <= delta))
    return int(failed[0]) if failed.size else int(p.size)


# ---------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------
def certify_budget(costs: Any, budget: float, delta: float, *,
                   cost_range: tuple[float, float], bound: CostBound = "wsr",
                   order: Sequence[int] | None = None, seed: int | None = 0) -> Certificate:
    """The most accurate candidate whose expected cost is certified at most ``budget``.

    Candidates are tested from the cheapest (row 0, or ``order[0]``) to the
    most expensive; the family is ordered by cost and so by accuracy. The
    null ``H0_j: E[cost_j] > budget`` is rejected when an upper confidence
    bound on the mean cost (:mod:`eenet.rules.bounds`: ``"wsr"``
    Waudby-Smith-Ramdas betting, ``"hb"`` Hoeffding-Bentkus, ``"hoeffding"``)
    is at most ``budget``; the scan stops at the first candidate that is not
    rejected (fixed-sequence testing, Angelopoulos, Bates, Candes, Jordan,
    Lei, "Learn then Test", 2021).

    Guarantee: if the ``n_samples`` columns are i.i.d. draws from the
    population and the family and its order were fixed without them,
    ``P(E[cost of the selected candidate] > budget) <= delta``, whether or not
    the expected cost really increases along the order. Where it does not,
    the scan just stops earlier.

    A larger ``budget`` never selects a cheaper candidate (the bounds do not
    depend on it). For ``"hb"`` and ``"hoeffding"`` a smaller ``delta`` never
    selects a costlier one; for ``"wsr"`` that holds in practice but not by
    construction (see :func:`eenet.rules.bounds.wsr_ucb`).

    Args:
        costs: ``[n_candidates, n_samples]``, the cost of each certification
            sample under each candidate, in ``cost_range``.
        budget: the average-cost budget, in the units of ``costs``.
        delta: miss probability, in (0, 1); the confidence is ``1 - delta``.
        cost_range: ``(c_min, c_max)``, the cheapest and dearest possible cost
            of one sample (the first and last exit's cumulative cost), known in
            advance.
        bound: ``"wsr"``, ``"hb"`` or ``"hoeffding"``.
        order: rows in testing order, cheapest first; ``None`` means row order.
        seed: seed of the random sample order the betting bound uses
            (``None``: the given order, valid only if it is random).

    Returns:
        A :class:`Certificate`; its ``index`` is ``None`` when even the first
        candidate fails (callers then fall back and warn).

    Raises:
        EenetError: a bad shape, costs outside ``cost_range`` or not finite, an
            unknown ``bound``, ``delta`` outside (0, 1), or a bad ``order``.

    Example:
        >>> costs = [[1.0] * 50 + [4.0] * 50, [4.0] * 100]   # mean 2.5, then 4
        >>> cert = certify_budget(costs, 3.5, 0.1, cost_range=(1, 4), bound="hoeffding")
        >>> cert.index, round(cert.values[0], 3)
        (0, 2.822)
    """
    check_choice("bound", bound, COST_BOUNDS)
    arr = _check_matrix("costs", costs)
    budget = check_number("budget", budget)
    delta = _check_delta(delta)
    low, high = _check_value_range("cost_range", cost_range)
    rows = _check_order(order, arr.shape[0])
    seed = _check_seed(seed)
    _check_inside("costs", arr, low, high)

    def statistic(chunk: np.ndarray) -> np.ndarray:
        return ucb(arr[chunk], delta, bound=bound, low=low, high=high, seed=seed)

    index, tested, values = _scan(rows, statistic, lambda v: v <= budget)
    return Certificate(kind="budget", bound=bound, index=index, target=budget, delta=delta,
                       n_samples=arr.shape[1], tested=tuple(tested), values=tuple(values),
                       statistic="ucb", value_range=(low, high),
                       seed=seed if bound == "wsr" else None)


# ---------------------------------------------------------------------------
# the risk
# ---------------------------------------------------------------------------
def certify_risk(risks: Any, epsilon: float, delta: float | None = 0.1, *,
                 risk_range: tuple[float, float], bound: RiskBound = "crc",
                 order: Sequence[int] | None = None, seed: int | None = 0) -> Certificate:
    """The cheapest candidate whose risk is certified at most ``epsilon``.

    Candidates are tested from the safest (row 0, or ``order[0]``; e.g.
    everyone at the last exit, risk 0) to the cheapest, and the scan stops at
    the first that fails. The bounds:

    - ``"crc"``, conformal risk control (Angelopoulos, Bates, Fisch, Lei,
      Schuster, "Conformal Risk Control", ICLR 2024): a candidate passes when
      ``(n/(n+1)) R_hat + r_max/(n+1) <= epsilon``, on per-sample losses made
      non-decreasing along the order (:func:`crc_risks`).
      Guarantee: ``E[risk of the selected candidate on a new sample] <=
      epsilon``, in expectation over the certification data, for
      exchangeable samples. Only the upper end ``r_max`` of ``risk_range``
      enters; negative risks are used as they are. ``delta`` is ignored.
    - ``"ucb-hb"``, ``"ucb-wsr"``, ``"ucb-hoeffding"``, the scan of Bates et
      al., "Distribution-Free, Risk-Controlling Prediction Sets" (JACM 2021):
      a candidate passes when the upper confidence bound on its mean risk is
      at most ``epsilon``. RCPS states it for risks that decrease towards the
      safe end; as a fixed-sequence test it is valid without that.
    - ``"ltt"``, Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei,
      "Learn then Test", 2021): fixed-sequence testing of the
      Hoeffding-Bentkus p-values of ``H0_j: risk_j > epsilon``, passing while
      ``p <= delta``; valid without monotonicity. It selects the same row as
      ``"ucb-hb"`` up to the ``1e-12`` rounding of the bound.

    Guarantee of the last three: for i.i.d. samples,
    ``P(risk of the selected candidate > epsilon) <= delta``. Their bounds
    rescale ``risk_range`` to [0, 1], so a signed risk such as an accuracy
    gap in ``[-1, 1]`` has its mean near the middle of the range, where the
    Bentkus term of HB helps little and the variance-adaptive WSR bound is
    much tighter.

    All need the family and its order fixed without the certification
    samples. A larger ``epsilon`` never selects a safer (costlier) candidate;
    a smaller ``delta`` never a riskier one (for ``"ucb-wsr"`` in practice,
    not by construction: see :func:`eenet.rules.bounds.wsr_ucb`).

    Args:
        risks: ``[n_candidates, n_samples]``, the risk of each certification
            sample under each candidate, in ``risk_range``.
        epsilon: the risk level, in the units of ``risks``.
        delta: miss probability, in (0, 1), for the high-probability bounds;
            ignored by ``"crc"``.
        risk_range: ``(r_min, r_max)``, the smallest and largest possible risk
            of one sample, known in advance (``(0, 1)`` for a disagreement,
            ``(-1, 1)`` for an accuracy gap).
        bound: ``"crc"``, ``"ucb-hb"``, ``"ucb-wsr"``, ``"ucb-hoeffding"`` or ``"ltt"``.
        order: rows in testing order, safest first; ``None`` means row order.
        seed: seed of the random sample order ``"ucb-wsr"`` uses.

    Returns:
        A :class:`Certificate`; its ``index`` is ``None`` when even the first
        candidate fails (callers then fall back to the full model and warn).

    Raises:
        EenetError: a bad shape, risks outside ``risk_range`` or not finite, an
            unknown ``bound``, ``delta`` outside (0, 1), or a bad ``order``.

    Example:
        >>> risks = [[0] * 99, [0] * 95 + [1] * 4, [0] * 80 + [1] * 19]
        >>> certify_risk(risks, 0.06, risk_range=(0, 1), bound="crc").index
        1
    """
    check_choice("bound", bound, RISK_BOUNDS)
    arr = _check_matrix("risks", risks)
    epsilon = check_number("epsilon", epsilon)
    low, high = _check_value_range("risk_range", risk_range)
    rows = _check_order(order, arr.shape[0])
    seed = _check_seed(seed)
    if bound == "crc":
        delta = None
    else:
        delta = _check_delta(delta)
    _check_inside("risks", arr, low, high)

    if bound == "crc":
        crc = np.full(arr.shape[0], np.nan)  # [n_candidates], rows left out of order stay NaN
        crc[rows] = crc_risks(arr[rows], high)  # the envelope follows the testing order
        index, tested, values = _scan(rows, lambda chunk: crc[chunk], lambda v: v <= epsilon)
        statistic = "crc-risk"
    elif bound == "ltt":
        index, tested, values = _scan(
            rows, lambda chunk: hb_pvalue(arr[chunk], epsilon, low=low, high=high),
            lambda v: v <= delta)
        statistic = "p-value"
    else:
        name = bound.split("-", 1)[1]
        index, tested, values = _scan(
            rows, lambda chunk: ucb(arr[chunk], delta, bound=name, low=low, high=high,
                                    seed=seed),
            lambda v: v <= epsilon)
        statistic = "ucb"
    return Certificate(kind="risk", bound=bound, index=index, target=epsilon, delta=delta,
                       n_samples=arr.shape[1], tested=tuple(tested), values=tuple(values),
                       statistic=statistic, value_range=(low, high),
                       seed=seed if bound == "ucb-wsr" else None)


def _check_inside(name: str, arr: np.ndarray, low: float, high: float) -> None:
    if not np.all(np.isfinite(arr)):
        raise EenetError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} non-finite "
                         f"values; every value must lie in [{low:g}, {high:g}]")
    slack = 1e-9 * (high - low)
    if arr.size and (arr.min() < low - slack or arr.max() > high + slack):
        raise EenetError(f"{name} has values in [{arr.min():g}, {arr.max():g}], outside the "
                         f"declared range [{low:g}, {high:g}]; every value must lie in it")
