"""A deployable exit policy: a per-exit score plus per-exit thresholds.

:class:`ExitPolicy` ties the pieces together. ``fit`` trains the method's
scorer on a validation cache (a no-op for the fixed-score baselines) and
calibrates thresholds that meet the budget; ``calibrate`` redoes the
thresholds for another cache or budget; ``exits`` and ``evaluate`` apply the
policy to any cache of the same network; ``save``/``load`` round-trip it
through a ``torch.save`` file of plain containers (loads with
``weights_only=True``).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from eenet import __version__
from eenet._validation import EenetError, check_budget, check_choice
from eenet.baselines import SCORERS, apply_patience, calibrate_patience, canonical_method, \
    oracle_exits, static_exit
from eenet.cache import ExitCache
from eenet.calibrate import Thresholds, apply_thresholds, calibrate as calibrate_scores
from eenet.evaluate import EvalResult, evaluate_exits
from eenet.policy import EENetScorer

POLICY_FORMAT = "eenet-policy"
POLICY_VERSION = 1
CalibrationMode = Literal["assignment", "geometric", "search", "patience"]

#: Every method a policy can be fitted with; aliases resolve through ``canonical_method``.
METHODS: dict[str, Any] = {"eenet": EENetScorer, "eenet-paper": EENetScorer, **SCORERS,
                           "static": None}
#: Methods whose scores are learned, and the scorer settings each one fixes.
#: ``eenet-paper`` is the recipe as published: the paper's scoring target
#: (exit k is right) and features, calibrated by the learned assignment.
LEARNED: dict[str, dict[str, Any]] = {
    "eenet": {},
    "eenet-paper": {"target": "correct", "features": "paper"},
}

#: The calibration each method uses unless told otherwise. Chosen on held-out
#: data (benchmarks/RESULTS.md): the published baselines keep their published
#: rules; EENet uses validation-optimal thresholds on its learned scores.
DEFAULT_CALIBRATION: dict[str, str] = {
    "eenet": "search",
    "eenet-paper": "assignment",
    "maxprob": "geometric",
    "entropy": "geometric",
    "patience": "patience",
    "static": "static",
}
_MODES_FOR = {
    "eenet": ("assignment", "geometric", "search"),
    "eenet-paper": ("assignment", "geometric", "search"),
    "maxprob": ("geometric", "search"),
    "entropy": ("geometric", "search"),
    "patience": ("patience", "geometric", "search"),
    "static": ("static",),
}


def resolve_method(name: str) -> str:
    """Canonical method name for ``name`` or an alias; lists the valid names otherwise."""
    key = str(name).strip().lower()
    if key in LEARNED or key == "static":
        return key
    if key == "oracle":
        raise EenetError("'oracle' uses the labels, so it is an upper bound and not a "
                         "deployable policy; use `eenet sweep --methods oracle` to report it")
    try:
        return canonical_method(key)
    except EenetError:
        valid = sorted(set(METHODS) | {"msdnet", "branchynet", "pabee"})
        raise EenetError(f"unknown method {name!r}; choose one of: {', '.join(valid)}") from None


class ExitPolicy:
    """Which exit each sample leaves at, under an average cost budget.

    Args:
        method: ``"eenet"`` (learned scores, Ilhan et al. WACV 2024, with
            eenet's scoring target and features; see :mod:`eenet.policy`),
            ``"eenet-paper"`` (the published recipe),
            ``"maxprob"``/``"msdnet"``, ``"entropy"``/``"branchynet"``,
            ``"patience"``/``"pabee"`` or ``"static"``.
        calibration: how scores become thresholds: ``"assignment"`` (EENet's
            learned exit distribution, tilted to the budget), ``"geometric"``
            (MSDNet's rule), ``"search"`` (validation-optimal thresholds) or
            ``"patience"``; ``None`` picks the method's default
            (:data:`DEFAULT_CALIBRATION`).
        guard: calibrate against a slightly lower target so the realized cost
            on unseen data stays within the budget.
        seed: seed of every stochastic step.
        device: where EENet trains (``"auto"`` uses CUDA when present).
        **hparams: passed to the method's scorer (EENet: ``epochs``, ``lr``,
            ``hidden``, ``alpha_ce``, ``alpha_budget``, ...).

    Example:
        >>> from eenet import ExitPolicy, synthetic_example
        >>> val, test = synthetic_example(seed=0)
        >>> policy = ExitPolicy("maxprob").fit(val, budget=4.0)
        >>> result = policy.evaluate(test)
        >>> result.avg_cost <= 4.0 * 1.01
        True
    """

    def __init__(self, method: str = "eenet", *, calibration: CalibrationMode | None = None,
                 guard: bool = True, seed: int = 0, device: str = "cpu",
                 **hparams: Any) -> None:
        self.method = resolve_method(method)
        self.calibration = calibration or DEFAULT_CALIBRATION[self.method]
        check_choice(f"calibration for {self.method}", self.calibration,
                      _MODES_FOR[self.method])
        self.guard = bool(guard)
        self.seed = int(seed)
        self.hparams = dict(hparams)
        if self.method in LEARNED:
            dev = "cuda" if device == "auto" and torch.cuda.is_available() else (
                "cpu" if device == "auto" else device)
            self.scorer: Any = EENetScorer(device=dev, **{**hparams,
                                                          **LEARNED[self.method]})
        elif self.method == "static":
            if hparams:
                raise EenetError(f"static takes no hyperparameters, got {sorted(hparams)}")
            self.scorer = None
        else:
            if hparams:
                raise EenetError(f"{self.method} takes no hyperparameters, got "
                                 f"{sorted(hparams)}")
            self.scorer = SCORERS[self.method]()
        self.budget: float | None = None
        self.thresholds: Thresholds | None = None
        self.patience: dict[str, Any] | None = None
        self.static_exit: int | None = None
        self.reference: dict[str, Any] | None = None
        self.provenance: dict[str, Any] = {}
        self._scorer_fitted = self.scorer is None or self.method not in LEARNED

    # ------------------------------------------------------------------ fit
    def fit(self, cache: ExitCache, budget: float, *, verbose: bool = False) -> "ExitPolicy":
        """Fit the scorer on ``cache`` and calibrate thresholds for ``budget``; returns self."""
        _check_exits(cache)
        budget = check_budget(budget, cache.costs, unit=cache.cost_unit)
        self.reference = {"n_exits": cache.n_exits, "n_classes": cache.n_classes,
                          "cost_unit": cache.cost_unit, "model": cache.model,
                          "dataset": cache.dataset,
                          "costs": [float(c) for c in cache.costs]}
        probs = cache.probs() if self.scorer is not None else None
        fit_scores = None
        if self.scorer is not None:
            self.scorer.fit(probs, cache.labels, cache.costs, budget, seed=self.seed,
                            verbose=verbose)
            self._scorer_fitted = True
            # a scorer trained on this very cache scores it too kindly; where it can, it
            # gives out-of-sample scores for calibration instead
            out_of_sample = getattr(self.scorer, "calibration_scores", None)
            fit_scores = out_of_sample() if callable(out_of_sample) else None
        self._calibrate(cache, budget, probs, scores=fit_scores)
        return self

    def calibrate(self, cache: ExitCache, budget: float | None = None, *,
                  mode: CalibrationMode | None = None,
                  guard: bool | None = None) -> "ExitPolicy":
        """Recompute the thresholds on ``cache`` for ``budget`` (default: the current one)."""
        self._require("calibrate", fitted_scorer=True)
        self._check_compatible(cache)
        if mode is not None:
            check_choice(f"calibration for {self.method}", mode, _MODES_FOR[self.method])
            self.calibration = mode
        if guard is not None:
            self.guard = bool(guard)
        budget = self.budget if budget is None else budget
        if budget is None:
            raise EenetError("no budget: pass one to calibrate()")
        budget = check_budget(budget, cache.costs, unit=cache.cost_unit)
        self._calibrate(cache, budget, cache.probs() if self.scorer is not None else None)
        return self

    def _calibrate(self, cache: ExitCache, budget: float, probs: np.ndarray | None,
                   scores: np.ndarray | None = None) -> None:
        self.budget = budget
        self.thresholds = self.patience = self.static_exit = None
        if budget > cache.costs[-1] * (1 + 1e-9) and self.calibration in ("static", "patience"):
            # the score calibrations (eenet.calibrate.calibrate) warn about this themselves
            warnings.warn(f"budget {budget:g} {cache.cost_unit} is above the last exit's cost "
                          f"{cache.costs[-1]:g}; every exit is affordable", stacklevel=3)
        if self.calibration == "static":
            self.static_exit = static_exit(cache.costs, budget)
            return
        if self.calibration == "patience":
            self.patience = calibrate_patience(cache.predictions(), cache.costs, budget,
                                               seed=self.seed, guard=self.guard,
                                               correct=cache.correct())
            return
        if scores is None:
            scores = self.scorer.scores(probs)
        fractions = self.scorer.exit_distribution() if self.calibration == "assignment" \
            else None
        self.thresholds = calibrate_scores(scores, cache.correct(), cache.costs, budget,
                                           mode=self.calibration, fractions=fractions,
                                           guard=self.guard, seed=self.seed)

    # ---------------------------------------------------------------- apply
    def exits(self, cache: ExitCache) -> np.ndarray:
        """The exit of every sample of ``cache``, int64 [n_samples]."""
        self._require("exits")
        self._check_compatible(cache)
        if self.static_exit is not None:
            return np.full(cache.n_samples, self.static_exit, dtype=np.int64)
        if self.patience is not None:
            return apply_patience(cache.predictions(), self.patience, seed=self.seed)
        assert self.thresholds is not None
        return apply_thresholds(self.scorer.scores(cache.probs()), self.thresholds.values)

    def evaluate(self, cache: ExitCache) -> EvalResult:
        """Accuracy, realized cost and exit distribution of the policy on ``cache``."""
        exits = self.exits(cache)
        return evaluate_exits(exits, cache.correct(), cache.costs, method=self.method,
                              budget=self.budget, cost_unit=cache.cost_unit)

    # ----------------------------------------------------------- reporting
    def describe(self) -> str:
        """A one-line summary for the CLI."""
        if self.budget is None:
            return f"{self.method} (not fitted)"
        unit = (self.reference or {}).get("cost_unit", "")
        parts = [f"{self.method}, budget {self.budget:.4g} {unit}",
                 f"calibration {self.calibration}{' + guard' if self.guard else ''}"]
        if self.thresholds is not None:
            t = self.thresholds
            parts.append(f"validation accuracy {t.val_accuracy:.4f} at cost {t.val_cost:.4g}")
        elif self.static_exit is not None:
            parts.append(f"everyone leaves at exit {self.static_exit}")
        elif self.patience is not None:
            parts.append(f"validation accuracy {self.patience['val_accuracy']:.4f} at cost "
                         f"{self.patience['val_cost']:.4g}")
        return "; ".join(parts)

    @property
    def val_accuracy(self) -> float:
        self._require("val_accuracy")
        if self.thresholds is not None:
            return float(self.thresholds.val_accuracy)
        if self.patience is not None:
            return float(self.patience["val_accuracy"])
        return math.nan

    @property
    def val_cost(self) -> float:
        self._require("val_cost")
        if self.thresholds is not None:
            return float(self.thresholds.val_cost)
        if self.patience is not None:
            return float(self.patience["val_cost"])
        assert self.reference is not None and self.static_exit is not None
        return float(self.reference["costs"][self.static_exit])

    # ------------------------------------------------------------ checks
    def _require(self, step: str, *, fitted_scorer: bool = False) -> None:
        if fitted_scorer:
            if not self._scorer_fitted or self.reference is None:
                raise EenetError(f"{step}() needs a fitted policy; call fit() first")
            return
        if self.budget is None or self.reference is None:
            raise EenetError(f"{step}() needs a fitted and calibrated policy; call fit() "
                             f"first")

    def _check_compatible(self, cache: ExitCache) -> None:
        ref = self.reference
        if ref is None:
            return
        where = f"{cache.path}: " if cache.path else ""
        if cache.n_exits != ref["n_exits"]:
            raise EenetError(f"{where}the cache has {cache.n_exits} exits but the policy was "
                             f"fitted on a network with {ref['n_exits']}; fit a policy on a "
                             f"cache of this network")
        if cache.cost_unit != ref["cost_unit"]:
            raise EenetError(f"{where}costs are in {cache.cost_unit!r} but the policy's budget "
                             f"is in {ref['cost_unit']!r}; use caches with the same cost unit")
        if self.method in LEARNED and cache.n_classes != ref["n_classes"]:
            raise EenetError(f"{where}the cache has {cache.n_classes} classes but the policy "
                             f"was fitted with {ref['n_classes']}")

    # -------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        """The policy as plain containers (tensors, numbers, strings, lists, dicts)."""
        self._require("save")
        return {
            "format": POLICY_FORMAT,
            "format_version": POLICY_VERSION,
            "eenet_version": __version__,
            "method": self.method,
            "calibration": self.calibration,
            "guard": self.guard,
            "seed": self.seed,
            "hparams": copy.deepcopy(self.hparams),
            "budget": self.budget,
            "reference": copy.deepcopy(self.reference),
            "scorer": None if self.scorer is None else self.scorer.state(),
            "thresholds": None if self.thresholds is None else self.thresholds.to_dict(),
            "patience": copy.deepcopy(self.patience),
            "static_exit": self.static_exit,
            "provenance": copy.deepcopy(self.provenance),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy atomically (temporary file, then rename)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise EenetError(f"output directory {path.parent} does not exist; create it first")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(self.state(), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_state(cls, state: dict[str, Any], *, source: str = "policy") -> "ExitPolicy":
        """Rebuild a policy from :meth:`state`."""
        if not isinstance(state, dict) or state.get("format") != POLICY_FORMAT:
            raise EenetError(f"{source}: not an eenet policy file (no format "
                             f"{POLICY_FORMAT!r}); create one with `eenet fit`")
        if int(state.get("format_version", 0)) > POLICY_VERSION:
            raise EenetError(f"{source}: policy format_version {state['format_version']} is "
                             f"newer than this eenet reads; upgrade eenet")
        try:
            policy = cls(state["method"], calibration=state["calibration"],
                         guard=state["guard"], seed=state["seed"], **state["hparams"])
            if state["scorer"] is not None:
                policy.scorer = type(policy.scorer).from_state(state["scorer"])
            policy._scorer_fitted = True
            policy.budget = state["budget"]
            policy.reference = state["reference"]
            policy.thresholds = None if state["thresholds"] is None else \
                Thresholds.from_dict(state["thresholds"])
            policy.patience = state["patience"]
            policy.static_exit = state["static_exit"]
            policy.provenance = dict(state.get("provenance") or {})
        except (KeyError, TypeError, ValueError) as err:
            raise EenetError(f"{source}: the policy file is incomplete or damaged ({err}); "
                             f"fit it again") from None
        return policy

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExitPolicy":
        """Read a policy written by :meth:`save` (with ``weights_only=True``)."""
        path = Path(path)
        if not path.is_file():
            raise EenetError(f"{path}: no such policy file; create one with `eenet fit`")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for damaged files
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise EenetError(f"{path}: not a readable policy file ({first[:120]}); it is "
                             f"corrupt or not made by `eenet fit`") from None
        return cls.from_state(state, source=str(path))


def _check_exits(cache: ExitCache) -> None:
    if cache.n_exits < 2:
        where = f"{cache.path}: " if cache.path else ""
        raise EenetError(f"{where}the cache has a single exit; an exit policy needs a network "
                         f"with at least two exits")


def evaluate_oracle(cache: ExitCache, budget: float) -> EvalResult:
    """The label-aware upper bound at ``budget`` (not a deployable policy)."""
    budget = check_budget(budget, cache.costs, unit=cache.cost_unit)
    exits = oracle_exits(cache.correct(), cache.costs, budget)
    return evaluate_exits(exits, cache.correct(), cache.costs, method="oracle", budget=budget,
                          cost_unit=cache.cost_unit)
