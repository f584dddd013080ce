"""Classic exit policies on the same calibration path as EENet, and the oracle.

Score baselines turn each exit's class probabilities into a score (higher =
readier to exit) and share EENet's scorer protocol (:class:`ScoreMethod`), so
:func:`eenet.calibrate.calibrate` turns any of them into thresholds:

========== ====================== =========================================
method     score at exit k        where from
========== ====================== =========================================
maxprob    ``max_c p_k,c``        MSDNet (Huang et al., ICLR 2018)
entropy    ``1 - H(p_k)/log C``   BranchyNet (Teerapittayanon et al., ICPR 2016)
patience   run length / K         PABEE (Zhou et al., NeurIPS 2020)
========== ====================== =========================================

Aliases: ``msdnet`` = maxprob, ``branchynet`` = entropy, ``pabee`` =
patience (:data:`SCORERS`, :func:`canonical_method`).

Two policies need no scores: ``static`` (everyone leaves at the deepest exit
whose cost fits, :func:`static_exit`) and the label-aware ``oracle``
(:func:`oracle_exits`), an upper bound rather than a deployable policy.
PABEE's own rule, a patience shared by all exits with two neighbouring
patience values mixed by sample to meet the budget, is
:func:`calibrate_patience` / :func:`apply_patience`.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from eenet._validation import EenetError, check_budget, check_costs
from eenet.calibrate import _BUDGET_RTOL, _as_correct, _check_guard_args, _guard
from eenet.features import max_prob, one_minus_entropy

__all__ = [
    "SCORERS",
    "EntropyScorer",
    "MaxProbScorer",
    "PatienceScorer",
    "ScoreMethod",
    "apply_patience",
    "calibrate_patience",
    "canonical_method",
    "oracle_exits",
    "patience_exits",
    "run_lengths",
    "static_exit",
    "static_thresholds",
]


@runtime_checkable
class ScoreMethod(Protocol):
    """What a score-based exit method provides (EENet's scorer has the same)."""

    name: str
    default_calibration: str

    def fit(self, probs: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget: float, *,
            seed: int = 0, verbose: bool = False) -> "ScoreMethod":
        """Learn whatever the scores need from a validation split; returns self."""
        ...

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """[n_samples, n_exits, n_classes] probabilities -> [n_samples, n_exits] in [0, 1]."""
        ...

    def exit_distribution(self) -> np.ndarray | None:
        """The learned exit distribution [n_exits], or None when there is none."""
        ...

    def state(self) -> dict[str, Any]:
        """Plain containers that :meth:`from_state` rebuilds the method from."""
        ...


# ---------------------------------------------------------------------------
# fixed-score baselines
# ---------------------------------------------------------------------------
def _check_probs3(probs: Any) -> np.ndarray:
    arr = np.asarray(probs)
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise EenetError(f"probs must have shape [n_samples, n_exits, n_classes], got "
                         f"shape {arr.shape}")
    return arr


class _FixedScorer:
    """Shared plumbing of the scorers that learn nothing."""

    name: ClassVar[str] = ""
    default_calibration: ClassVar[str] = "geometric"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def fit(self, probs: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget: float, *,
            seed: int = 0, verbose: bool = False) -> "_FixedScorer":
        """Check the inputs; fixed scores learn nothing. Returns self.

        Args:
            probs: [n_samples, n_exits, n_classes] validation probabilities.
            labels: [n_samples] class indices.
            costs: [n_exits] cumulative exit costs.
            budget: average cost per sample.
            seed: unused (recorded for a uniform interface).
            verbose: unused.

        Raises:
            EenetError: shapes disagree or the budget is below the cheapest exit.
        """
        probs = _check_probs3(probs)
        labels = np.asarray(labels)
        if labels.shape != (probs.shape[0],):
            raise EenetError(f"labels must have shape ({probs.shape[0]},) to match probs, "
                             f"got {labels.shape}")
        costs = check_costs(costs, probs.shape[1])
        check_budget(budget, costs)
        return self

    def exit_distribution(self) -> None:
        """Fixed scorers have no learned exit distribution."""
        return None

    def state(self) -> dict[str, Any]:
        """``{"method": name}``: nothing else to keep."""
        return {"method": self.name}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_FixedScorer":
        """Rebuild from :meth:`state`.

        Raises:
            EenetError: the state belongs to another method.
        """
        got = state.get("method") if isinstance(state, dict) else type(state).__name__
        if got != cls.name:
            raise EenetError(f"state must be a {cls.__name__} state (method {cls.name!r}), "
                             f"got {got!r}")
        return cls()


class MaxProbScorer(_FixedScorer):
    """MSDNet's confidence: the largest class probability of each exit.

    Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
    Classification", ICLR 2018. Default calibration: MSDNet's geometric rule.

    Example:
        >>> import numpy as np
        >>> MaxProbScorer().scores(np.array([[[0.2, 0.8], [0.5, 0.5]]])).tolist()
        [[0.8, 0.5]]
    """

    name: ClassVar[str] = "maxprob"
    default_calibration: ClassVar[str] = "geometric"

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """[n_samples, n_exits, n_classes] -> [n_samples, n_exits] float64 in [0, 1]."""
        return np.asarray(max_prob(_check_probs3(probs)), dtype=np.float64)


class EntropyScorer(_FixedScorer):
    """BranchyNet's confidence: one minus the normalised entropy, ``1 - H(p)/log C``.

    Teerapittayanon et al., "BranchyNet: Fast Inference via Early Exiting from
    Deep Neural Networks", ICPR 2016. Default calibration: the geometric rule.

    Example:
        >>> import numpy as np
        >>> EntropyScorer().scores(np.array([[[1.0, 0.0], [0.5, 0.5]]])).round(6).tolist()
        [[1.0, 0.0]]
    """

    name: ClassVar[str] = "entropy"
    default_calibration: ClassVar[str] = "geometric"

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """[n_samples, n_exits, n_classes] -> [n_samples, n_exits] float64 in [0, 1]."""
        return np.clip(np.asarray(one_minus_entropy(_check_probs3(probs)), dtype=np.float64),
                       0.0, 1.0)


# ---------------------------------------------------------------------------
# patience (PABEE)
# ---------------------------------------------------------------------------
def _check_preds(preds: Any) -> np.ndarray:
    arr = np.asarray(preds)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise EenetError(f"preds must have shape [n_samples, n_exits] (arg-max classes), "
                         f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise EenetError(f"preds must hold integer class indices, got dtype {arr.dtype}")
    return arr


def run_lengths(preds: np.ndarray) -> np.ndarray:
    """Length of the run of identical predictions ending at each exit.

    ``run[n, 0] = 1``; ``run[n, k] = run[n, k-1] + 1`` when exit k predicts
    the same class as exit k-1, else 1.

    Args:
        preds: [n_samples, n_exits] arg-max class of every exit.

    Returns:
        int64 [n_samples, n_exits], values in ``[1, k+1]`` at exit k.

    Example:
        >>> import numpy as np
        >>> run_lengths(np.array([[3, 3, 1, 1, 1]])).tolist()
        [[1, 2, 1, 2, 3]]
    """
    preds = _check_preds(preds)
    runs = np.ones(preds.shape, dtype=np.int64)
    same = preds[:, 1:] == preds[:, :-1]  # [n_samples, n_exits - 1]
    for k in range(1, preds.shape[1]):
        runs[:, k] = np.where(same[:, k - 1], runs[:, k - 1] + 1, 1)
    return runs


def patience_exits(preds: np.ndarray, patience: int) -> np.ndarray:
    """PABEE's exits for one patience: the first exit whose prediction has
    stayed the same for ``patience + 1`` consecutive exits (the last exit
    answers otherwise).

    Args:
        preds: [n_samples, n_exits] arg-max classes.
        patience: t >= 0; t = 0 exits at exit 0, t >= n_exits - 1 at the last.

    Returns:
        int64 [n_samples].
    """
    runs = run_lengths(preds)
    if patience < 0:
        raise EenetError(f"patience must be a non-negative integer, got {patience}")
    passed = runs >= patience + 1
    passed[:, -1] = True
    return np.argmax(passed, axis=1).astype(np.int64)


class PatienceScorer(_FixedScorer):
    """PABEE's patience as a score: the run length of identical arg-max
    predictions ending at exit k, divided by ``n_exits`` (so scores lie in
    (0, 1]; a uniform threshold ``(t + 0.5) / n_exits`` is patience t).

    Zhou et al., "BERT Loses Patience: Fast and Robust Inference with Early
    Exit", NeurIPS 2020. Default calibration: ``"patience"`` (one patience for
    every exit, :func:`calibrate_patience`); the generic threshold modes work
    on these scores too.

    Example:
        >>> import numpy as np
        >>> p = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]])
        >>> PatienceScorer().scores(p).round(3).tolist()
        [[0.333, 0.667, 0.333]]
    """

    name: ClassVar[str] = "patience"
    default_calibration: ClassVar[str] = "patience"

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """[n_samples, n_exits, n_classes] -> [n_samples, n_exits] float64 in (0, 1]."""
        probs = _check_probs3(probs)
        runs = run_lengths(np.argmax(probs, axis=2))
        return runs.astype(np.float64) / probs.shape[1]


def _patience_fit(preds: np.ndarray, costs: np.ndarray, budget: float, seed: int
                  ) -> dict[str, Any]:
    """Largest patience that fits, mixed with the next one to spend the budget."""
    k_exits = preds.shape[1]
    by_t = [float(costs[patience_exits(preds, t)].mean()) for t in range(k_exits)]
    fits = [t for t in range(k_exits) if by_t[t] <= budget * (1 + _BUDGET_RTOL)]
    t = max(fits) if fits else 0
    mix, expected = 0.0, by_t[t]
    if t < k_exits - 1 and by_t[t + 1] > by_t[t]:
        mix = float(np.clip((budget - by_t[t]) / (by_t[t + 1] - by_t[t]), 0.0, 1.0))
        expected = (1 - mix) * by_t[t] + mix * by_t[t + 1]
    return {"method": "patience", "patience": int(t), "mix": mix, "seed": int(seed),
            "budget": float(budget), "expected_cost": float(expected),
            "cost_by_patience": by_t}


def apply_patience(preds: np.ndarray, calib: dict[str, Any], *,
                   seed: int | None = None) -> np.ndarray:
    """Exits under a calibrated patience rule (:func:`calibrate_patience`).

    Each sample uses patience ``calib["patience"] + 1`` with probability
    ``calib["mix"]`` and ``calib["patience"]`` otherwise; the per-sample
    draws come from ``numpy.random.default_rng(seed)`` in sample order, so
    the same data and seed give the same exits.

    Args:
        preds: [n_samples, n_exits] arg-max classes.
        calib: the dict returned by :func:`calibrate_patience`.
        seed: seed of the per-sample draws; default ``calib["seed"]``.

    Returns:
        int64 [n_samples].

    Raises:
        EenetError: ``calib`` lacks ``patience`` or ``mix``.
    """
    preds = _check_preds(preds)
    try:
        t, mix = int(calib["patience"]), float(calib["mix"])
    except (KeyError, TypeError, ValueError):
        raise EenetError("calib must be calibrate_patience()'s dict with 'patience' and "
                         "'mix'") from None
    seed = int(calib.get("seed", 0)) if seed is None else int(seed)
    exits = patience_exits(preds, t)
    if mix > 0 and t < preds.shape[1] - 1:
        use_next = np.random.default_rng(seed).random(preds.shape[0]) < mix
        exits = np.where(use_next, patience_exits(preds, t + 1), exits)
    return exits


def calibrate_patience(preds: np.ndarray, costs: np.ndarray, budget: float, *, seed: int = 0,
                       guard: bool = True, correct: np.ndarray | None = None,
                       n_boot: int = 20, level: float = 0.9) -> dict[str, Any]:
    """PABEE's patience for a budget, on validation predictions.

    One patience t serves every exit (Zhou et al., NeurIPS 2020). The cost
    ``cost(t)`` of patience t never decreases with t, so the rule takes the
    largest t with ``cost(t) <= target`` and, when ``cost(t) < target <
    cost(t+1)``, sends each sample to patience t+1 with probability
    ``mix = (target - cost(t)) / (cost(t+1) - cost(t))`` (a seeded
    per-sample draw, :func:`apply_patience`), so the expected validation
    cost equals the target. With ``guard`` on, the target is lowered by the
    bootstrap guard of :func:`eenet.calibrate.guard_target`.

    Args:
        preds: [n_samples, n_exits] validation arg-max classes.
        costs: [n_exits] cumulative exit costs.
        budget: average cost per sample.
        seed: seed of the per-sample draws and of the guard.
        guard: calibrate against the guarded target.
        correct: optional [n_samples, n_exits] bool, for ``val_accuracy``
            (NaN without it).
        n_boot: guard resamples.
        level: guard confidence.

    Returns:
        A dict of plain values: ``patience``, ``mix``, ``seed``, ``budget``,
        ``target``, ``expected_cost`` (on validation), ``cost_by_patience``
        (one per t = 0..n_exits-1), ``val_cost`` and ``val_accuracy``
        (realized with the draws), ``fractions`` (realized exit
        distribution) and ``guard`` (diagnostics, or None).

    Raises:
        EenetError: bad shapes or a budget below the cheapest exit.

    Example:
        >>> import numpy as np
        >>> preds = np.array([[0, 0, 0], [0, 1, 1], [1, 0, 2], [2, 2, 2]])
        >>> c = calibrate_patience(preds, np.array([1.0, 2.0, 3.0]), 2.0, guard=False)
        >>> c["patience"], round(c["mix"], 4), c["cost_by_patience"]
        (0, 0.6667, [1.0, 2.5, 3.0])
    """
    preds = _check_preds(preds)
    n, k_exits = preds.shape
    costs = check_costs(costs, k_exits)
    budget = check_budget(budget, costs)
    if correct is not None:
        correct = _as_correct(correct, preds.shape)
    target, info = budget, None
    if guard:
        _check_guard_args(n_boot, level)
    if guard and k_exits > 1 and budget < costs[-1]:
        info = _guard(preds, None, costs, budget,
                      lambda p, _c, _costs, b: _patience_fit(p, costs, b, seed),
                      lambda p, calib: apply_patience(p, calib), seed=seed, n_boot=n_boot,
                      level=level, n_eval=None)
        target = float(info.pop("target"))
    calib = _patience_fit(preds, costs, target, seed)
    exits = apply_patience(preds, calib)
    calib.update(
        budget=float(budget), target=float(target), guard=info,
        val_cost=float(costs[exits].mean()),
        val_accuracy=math.nan if correct is None else float(correct[np.arange(n), exits].mean()),
        fractions=(np.bincount(exits, minlength=k_exits) / n).tolist())
    return calib


# ---------------------------------------------------------------------------
# static and oracle
# ---------------------------------------------------------------------------
def static_exit(costs: np.ndarray, budget: float) -> int:
    """The deepest exit whose cost fits the budget; everyone leaves there.

    Args:
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.

    Returns:
        The exit index.

    Raises:
        EenetError: the budget is below the cheapest exit.

    Example:
        >>> import numpy as np
        >>> static_exit(np.array([1.0, 2.0, 3.0]), 2.5)
        1
    """
    costs = check_costs(costs)
    budget = check_budget(budget, costs)
    return int(np.flatnonzero(costs <= budget * (1 + _BUDGET_RTOL)).max())


def static_thresholds(costs: np.ndarray, budget: float) -> np.ndarray:
    """:func:`static_exit` as thresholds: ``+inf`` before it, ``-inf`` from it on.

    With :func:`eenet.calibrate.apply_thresholds` and any finite scores (for
    example zeros), every sample leaves at ``static_exit(costs, budget)``.

    Returns:
        float64 [n_exits].
    """
    k = static_exit(costs, budget)
    out = np.full(np.asarray(costs).size, np.inf)
    out[k:] = -np.inf
    return out


def oracle_exits(correct: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """Label-aware exits with the most correct answers at average cost <= budget.

    Samples no exit gets right leave at exit 0. Every other sample has a
    cheapest correct exit e_n; moving it there from exit 0 gains one correct
    answer for ``d_n = c_{e_n} - c_0`` extra cost. Samples are upgraded in
    order of increasing ``d_n`` while the total cost stays within
    ``n_samples * budget``; the rest leave at exit 0.

    Why this is optimal: any assignment's correct answers come from a set S of
    samples each sent to some correct exit, costing at least
    ``n c_0 + sum_{n in S} d_n`` (every exit costs at least c_0, and a
    correct exit at least c_{e_n}). So a feasible S needs
    ``sum_S d_n <= n (B - c_0)``, and the largest such S is a prefix of the
    samples sorted by d_n (swapping any member for a cheaper non-member keeps
    it feasible). Greedy by cost is exact here because every item has the
    same value (one correct answer); it is the unit-value case of the
    knapsack problem.

    Args:
        correct: [n_samples, n_exits] bool, whether each exit is right.
        costs: [n_exits] cumulative, non-decreasing exit costs.
        budget: average cost per sample.

    Returns:
        int64 [n_samples], average cost at most the budget.

    Raises:
        EenetError: bad shapes or a budget below the cheapest exit.

    Example:
        >>> import numpy as np
        >>> ok = np.array([[False, True], [True, True], [False, False], [False, True]])
        >>> oracle_exits(ok, np.array([1.0, 3.0]), 1.5).tolist()
        [1, 0, 0, 0]
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[1] == 0:
        raise EenetError(f"correct must have shape [n_samples, n_exits], got {correct.shape}")
    correct = _as_correct(correct, correct.shape)
    n, k_exits = correct.shape
    costs = check_costs(costs, k_exits)
    budget = check_budget(budget, costs)
    exits = np.zeros(n, dtype=np.int64)
    any_right = correct.any(axis=1)
    cheapest = np.argmax(correct, axis=1)  # first correct exit = cheapest (costs ascend)
    extra = costs[cheapest] - costs[0]
    cand = np.flatnonzero(any_right)
    order = cand[np.argsort(extra[cand], kind="stable")]
    spent = np.cumsum(extra[order])
    room = n * (budget - costs[0]) + n * budget * _BUDGET_RTOL
    take = int(np.searchsorted(spent, room, side="right"))
    exits[order[:take]] = cheapest[order[:take]]
    return exits


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
#: Score methods by name and alias. The EENet scorer is added by the code that
#: builds policies; :func:`canonical_method` sees whatever is registered here.
SCORERS: dict[str, type] = {
    "maxprob": MaxProbScorer,
    "msdnet": MaxProbScorer,
    "entropy": EntropyScorer,
    "branchynet": EntropyScorer,
    "patience": PatienceScorer,
    "pabee": PatienceScorer,
}


def canonical_method(name: str) -> str:
    """The canonical name of a registered score method or alias.

    Args:
        name: a method name or alias, any case (``"MSDNet"`` -> ``"maxprob"``).

    Returns:
        The class's ``name``.

    Raises:
        EenetError: unknown name; the message lists the valid ones.

    Example:
        >>> canonical_method("pabee")
        'patience'
    """
    key = str(name).strip().lower()
    cls = SCORERS.get(key)
    if cls is None:
        raise EenetError(f"unknown method {name!r}; choose one of: {', '.join(sorted(SCORERS))}")
    return str(getattr(cls, "name", key))
