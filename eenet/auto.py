"""``--method auto``: the most accurate policy a user can deploy at a budget.

Every deployable method is a candidate, each with its own default calibration
and each charged its own cost (``overhead``, as the policy would be served).
The candidates are compared by their **out-of-fold** accuracy on the
calibration cache: the cache is cut into ``folds`` stratified parts, every
method is fitted (scorer and thresholds) on all parts but one and applied to
the part left out, so every sample is predicted once by a policy that never
saw it. The most accurate candidate wins. When the policies' own costs are
charged, a cheaper decision within the comparison's own noise (one standard
error of the paired difference of out-of-fold correctness) wins the tie: it
spends less of the budget on deciding and drifts less when the machine does.
When they are not charged (costs given by hand, FLOPs of the network alone)
nothing is known to be cheaper, and the most accurate wins outright. The
winner is then fitted on the whole cache, and the policy records every
candidate's evidence.

The policy's own cost of each method is measured once, on its fit to the
whole cache, and charged as a fixed vector inside the folds: timing is a
property of the method and the network, not of the fold.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from eenet._validation import EenetError, check_budget
from eenet.cache import ExitCache
from eenet.policy import ExitPolicy
from eenet.scores import get_method

__all__ = ["AUTO_METHODS", "AutoCandidate", "fit_auto", "stratified_folds"]

#: The candidates, cheapest decision first (the order that breaks a tie when the policies'
#: own costs are not measured): one threshold per exit, a softmax, an entropy, a running
#: vote, a small MLP per exit.
AUTO_METHODS: tuple[str, ...] = ("static", "maxprob", "entropy", "patience", "eenet")
#: How much work each decision is: breaks exact ties of accuracy.
DECISION_RANK = {name: rank for rank, name in enumerate((*AUTO_METHODS, "eenet-paper"))}
#: Standard errors of the paired difference inside which two candidates tie.
TIE_Z = 1.0


@dataclass(frozen=True)
class AutoCandidate:
    """One method's evidence: out-of-fold accuracy and cost at the budget, or why it is out."""

    method: str
    accuracy: float
    cost: float
    overhead: float
    status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint index sets covering ``range(n_samples)``, each class spread evenly.

    Each sample gets a random rank within its class; the samples of rank r go to
    fold ``(r + offset) % folds``, with a random offset per class so the small
    classes do not all start in fold 0.

    Example:
        >>> [f.tolist() for f in stratified_folds(np.array([0, 0, 1, 1]), 2, seed=0)]
        [[1, 2], [0, 3]]
    """
    labels = np.asarray(labels)
    if folds < 2 or folds > labels.size:
        raise EenetError(f"folds must be between 2 and the sample count {labels.size}, "
                         f"got {folds}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(labels.size, dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        ranks = rng.permutation(members.size)
        fold_of[members] = (ranks + rng.integers(folds)) % folds
    return [np.flatnonzero(fold_of == f) for f in range(folds)]


def _make(method: str, policy_kwargs: dict[str, Any], hparams: dict[str, Any]) -> ExitPolicy:
    learned = get_method(method).learned
    return ExitPolicy(method, **policy_kwargs, **(hparams if learned else {}))


def _out_of_fold(method: str, cache: ExitCache, budget: float, folds: list[np.ndarray],
                 overhead: np.ndarray | None, policy_kwargs: dict[str, Any],
                 hparams: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Correctness and charged cost of every sample under ``method`` fitted without its fold."""
    correct = np.zeros(cache.n_samples, dtype=bool)
    cost = np.zeros(cache.n_samples)
    everyone = np.arange(cache.n_samples)
    for held in folds:
        train, test = cache.subset(np.setdiff1d(everyone, held)), cache.subset(held)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy = _make(method, policy_kwargs, hparams).fit(train, budget, overhead=overhead)
            exits = policy.exits(test)
        correct[held] = test.correct()[np.arange(held.size), exits]
        cost[held] = policy.costs_for(test)[exits]
    return correct, cost


def _winner(names: list[str], correct: dict[str, np.ndarray],
            decision_cost: dict[str, float] | None) -> tuple[str, str]:
    """The most accurate name and why; with the decisions' own costs known, the cheapest
    decision whose accuracy is within the noise of the most accurate one."""
    best = max(names, key=lambda m: (correct[m].mean(), -DECISION_RANK[m]))
    if decision_cost is None:
        return best, "the most accurate out of fold"
    tied = []
    for m in names:
        diff = correct[best].astype(float) - correct[m]
        noise = TIE_Z * diff.std(ddof=1) / math.sqrt(diff.size) if diff.size > 1 else 0.0
        if diff.mean() <= noise:
            tied.append(m)
    chosen = min(tied, key=lambda m: (decision_cost[m], DECISION_RANK[m]))
    if chosen == best:
        return chosen, "the most accurate out of fold"
    return chosen, (f"within the folds' noise of {best} (the most accurate) and cheaper to "
                    f"decide")


def fit_auto(cache: ExitCache, budget: float, *, methods: Sequence[str] = AUTO_METHODS,
             overhead: np.ndarray | Callable[[ExitPolicy, ExitCache], Any] | None = None,
             folds: int = 3, seed: int = 0, guard: bool = True, device: str = "cpu",
             verbose: bool = False, **hparams: Any) -> ExitPolicy:
    """Fit every candidate method and keep the one most accurate out of fold at ``budget``.

    Args:
        cache: the validation (calibration) cache.
        budget: average cost per sample, in the cache's cost unit, the policy's own
            cost included when ``overhead`` counts it.
        methods: the candidates (names of deployable methods).
        overhead: as for :meth:`ExitPolicy.fit`: a fixed vector, a function that
            measures a fitted policy (called once per method), or ``None``.
        folds: stratified folds for the out-of-fold comparison.
        seed: seeds the folds and every fit.
        guard, device: as for :class:`ExitPolicy`.
        verbose: progress of the learned fits on stderr.
        **hparams: hyperparameters of the learned methods.

    Returns:
        The winner, fitted on the whole cache; ``policy.provenance["auto"]`` holds
        the chosen method, the reason and every candidate's out-of-fold evidence.

    Raises:
        EenetError: no candidate can serve the budget, or an unknown method.

    Example:
        >>> from eenet import synthetic_example
        >>> val, _ = synthetic_example(seed=0)
        >>> policy = fit_auto(val, 4.0, methods=("maxprob", "entropy", "static"))
        >>> policy.method.name in ("maxprob", "entropy", "static")
        True
    """
    budget = check_budget(budget, cache.costs, unit=cache.cost_unit)
    names = [get_method(m).name for m in methods]
    if len(set(names)) != len(names) or not names:
        raise EenetError(f"auto needs distinct candidate methods, got {list(methods)}")
    for name in names:
        if not get_method(name).deployable:
            raise EenetError(f"{name!r} is not a deployable policy, so auto cannot choose it")
    policy_kwargs = {"guard": guard, "seed": seed, "device": device}
    full: dict[str, ExitPolicy] = {}
    out: dict[str, str] = {}
    for name in names:
        try:
            full[name] = _make(name, policy_kwargs, hparams).fit(cache, budget,
                                                                  overhead=overhead,
                                                                  verbose=verbose)
        except EenetError as err:  # e.g. its own cost puts the budget below its first exit
            out[name] = str(err)
    if not full:
        raise EenetError(f"no candidate can serve budget {budget:g} {cache.cost_unit}: "
                         + "; ".join(f"{m}: {why}" for m, why in out.items()))
    parts = stratified_folds(cache.labels, folds, seed)
    correct, cost, decision = {}, {}, {}
    for name, policy in full.items():
        correct[name], cost[name] = _out_of_fold(name, cache, budget, parts, policy.overhead,
                                                 policy_kwargs, hparams)
        decision[name] = 0.0 if policy.overhead is None else float(policy.overhead[-1])
    charged = any(p.overhead is not None for p in full.values())
    chosen, reason = _winner(list(full), correct, decision if charged else None)
    evidence = [AutoCandidate(m, float(correct[m].mean()), float(cost[m].mean()),
                              decision[m] if full[m].overhead is not None else math.nan,
                              "chosen" if m == chosen else "candidate").to_dict()
                for m in full]
    evidence += [AutoCandidate(m, math.nan, math.nan, math.nan, f"out: {why}").to_dict()
                 for m, why in out.items()]
    winner = full[chosen]
    winner.provenance["auto"] = {"chosen": chosen, "reason": reason, "folds": folds,
                                 "tie_z": TIE_Z, "candidates": evidence}
    return winner

