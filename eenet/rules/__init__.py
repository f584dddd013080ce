"""Scores -> one exit per sample under a budget.

A calibration turns the scores of a calibration cache into a
:class:`~eenet.rules.thresholds.Thresholds` rule that meets an average cost
budget. The modes, in :data:`CALIBRATIONS`:

- ``search`` (eenet's): the most accurate thresholds on the calibration data
  whose cost fits, chosen from a budget-independent staircase
  (:class:`~eenet.rules.search.SearchFamily`); a larger budget never gets a
  less accurate rule there.
- ``assignment``: EENet's learned exit distribution (Ilhan et al., WACV 2024),
  tilted so its cost meets the budget (:func:`~eenet.rules.distributions.tilt_fractions`),
  as sequential quotas.
- ``geometric``: MSDNet's exit distribution (Huang et al., ICLR 2018) as quotas.
- ``patience``: PABEE's patience (Zhou et al., NeurIPS 2020), two values mixed by sample.
- ``static``: everyone at the most accurate single exit that fits.
- ``select`` (the default of every score-based method): the candidate
  calibrations (``geometric`` and ``search``, and the method's own published
  rule where it has one) are cross-validated at the budget on the
  calibration data, differences within the selection's own noise are ties
  that go to the smoother rule, and the winner is calibrated on all of it
  (:mod:`eenet.rules.select`). Neither geometric nor search wins under every
  network and cost profile (benchmarks/RESULTS.md), so the data in front of
  it decides, at the price of fitting each candidate once per fold. Switching
  between rules, it is not monotone in the budget (neither is ``geometric``).

With the guard on (:mod:`eenet.rules.guard`), the rule is calibrated to a cost
a little below the budget so unseen data stays within it. :class:`Calibrator`
keeps whatever a mode can reuse across budgets (the search staircase and its
guard margins), so a sweep fits many budgets for the price of one.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Sequence

import numpy as np

from eenet._validation import (BUDGET_RTOL, EenetError, check_budget, check_choice,
                               check_costs, check_finite)
from eenet.rules.distributions import (check_fractions, fit_quota, fits, geometric_fractions,
                                       tilt_fractions)
from eenet.rules.guard import check_guard_args, refit_margin, selection_margins
from eenet.rules.patience import patience_rule
from eenet.rules.search import SearchFamily
from eenet.rules.select import (SELECT_FOLDS, SELECT_REPEATS, TIE_Z, ambiguous, choose,
                                fold_splits)
from eenet.rules.static import static_rule
from eenet.rules.thresholds import Thresholds, apply_thresholds, mix_draws

__all__ = ["CALIBRATIONS", "SELECT_FROM", "Calibrator", "Thresholds", "apply_thresholds",
           "calibrate", "mix_draws"]

CalibrationMode = Literal["search", "assignment", "geometric", "patience", "static", "select"]

#: Every calibration, with the one line the command line's help shows.
CALIBRATIONS: dict[str, str] = {
    "search": "the most accurate thresholds on the calibration data that fit (eenet)",
    "assignment": "EENet's learned exit distribution, tilted to the budget, as quotas",
    "geometric": "MSDNet's geometric exit distribution as quotas",
    "patience": "PABEE's patience; two neighbouring values mixed by sample",
    "static": "everyone at the most accurate single exit that fits",
    "select": "the calibration most accurate at the budget on held-out folds of the "
              "calibration data (geometric or search; ties within noise: geometric)",
}
#: What ``select`` chooses between unless told otherwise; ties go to the first.
SELECT_FROM = ("geometric", "search")
_FRACTION_FLOOR = 1e-9  # mass given to empty exits when a tilt cannot reach the target
_LADDER = 33  # target costs at which the search family's guard margins are measured


class Calibrator:
    """A calibration mode fitted to one calibration cache's scores, for any budget.

    Args:
        scores: [n_samples, n_exits] calibration scores, higher = readier.
        correct: [n_samples, n_exits] bool, whether each exit is right.
        costs: [n_exits] cumulative, non-decreasing exit costs.
        mode: one of :data:`CALIBRATIONS`.
        fractions: [n_exits] learned exit distribution (``assignment`` only).
        guard: calibrate to the guard's lower target.
        seed: seed of the guard's resampling, the search and the mixing draws.
        sample_ids: [n_samples] ids (default ``0..n-1``); a mixed rule picks
            its samples by id.
        n_boot: guard resamples.
        level: guard confidence (see :mod:`eenet.rules.guard`).
        select_from: ``select``'s candidates in preference order (ties go to the
            first); default :data:`SELECT_FROM`.
        folds, repeats, tie_z: ``select``'s cross-validation: folds, the most
            repeats, the tie width (see :mod:`eenet.rules.select`).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.random((1000, 3)); ok = rng.random((1000, 3)) < 0.5 + 0.4 * s
        >>> cal = Calibrator(s, ok, np.array([1.0, 2.0, 3.0]), mode="geometric")
        >>> rule = cal.rule(2.0)
        >>> rule.val_cost <= rule.target <= 2.0
        True
    """

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, *,
                 mode: CalibrationMode, fractions: np.ndarray | None = None,
                 guard: bool = True, seed: int = 0, sample_ids: np.ndarray | None = None,
                 n_boot: int = 20, level: float = 0.9,
                 select_from: Sequence[str] | None = None, folds: int = SELECT_FOLDS,
                 repeats: int = SELECT_REPEATS, tie_z: float = TIE_Z) -> None:
        self.scores = np.asarray(scores, dtype=np.float64)
        if self.scores.ndim != 2 or self.scores.shape[1] == 0 or self.scores.shape[0] == 0:
            raise EenetError(f"scores must have shape [n_samples, n_exits], got "
                             f"{self.scores.shape}")
        check_finite("scores", self.scores)
        n, k_exits = self.scores.shape
        self.correct = np.asarray(correct, dtype=bool)
        if self.correct.shape != (n, k_exits):
            raise EenetError(f"correct must have shape {(n, k_exits)} like scores, got "
                             f"{self.correct.shape}")
        self.costs = check_costs(costs, k_exits)
        self.mode = check_choice("calibration", mode, CALIBRATIONS)
        self.fractions = None
        if mode == "assignment" and fractions is None:
            raise EenetError("calibration 'assignment' needs the learned exit "
                             "distribution; use a learned method such as eenet")
        if mode in ("assignment", "select") and fractions is not None:
            self.fractions = check_fractions(fractions, k_exits)
        self.guard, self.seed = bool(guard), int(seed)
        if self.guard:
            check_guard_args(n_boot, level)
        self.n_boot, self.level = n_boot, level
        self.ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        self._family: SearchFamily | None = None
        self._margins: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None
        self._select = self._check_select(select_from, folds, repeats, tie_z)
        self._parts: dict[Any, Calibrator] = {}  # ``select``: calibrators per mode and fold

    # ---- budget -> rule -----------------------------------------------------
    def rule(self, budget: float) -> Thresholds:
        """The rule for ``budget``, with its record on the calibration data.

        Raises:
            EenetError: a budget below the cheapest exit.
        """
        budget = check_budget(budget, self.costs)
        if self.mode == "select":
            return self._selected_rule(budget)
        if budget > self.costs[-1] * (1 + BUDGET_RTOL):
            warnings.warn(f"budget {budget:g} is above the last exit's cost "
                          f"{self.costs[-1]:g}; every exit is affordable", stacklevel=2)
        diagnostics: dict[str, Any] = {"seed": self.seed}
        target = budget
        if self.mode == "search":
            if self.guard:
                target, diagnostics["guard"] = self._search_target(budget)
            rule = Thresholds(self.family().at(target))
        elif self.mode == "static":
            rule = static_rule(self.correct, self.costs, budget)
        else:
            if self.guard and budget < self.costs[-1] and self.scores.shape[1] > 1:
                margin, info = refit_margin(
                    lambda s, c, ids: self._fit_at(budget, s, c, ids), self.scores,
                    self.correct, self.costs, self.ids, seed=self.seed, n_boot=self.n_boot,
                    level=self.level)
                target = max(float(self.costs[0]), budget - margin)
                diagnostics["guard"] = {"margin": margin, **info}
            rule = self._fit_at(target, self.scores, self.correct, self.ids, diagnostics)
        return self._record(rule, budget, target, diagnostics)

    def _record(self, rule: Thresholds, budget: float, target: float,
                diagnostics: dict[str, Any]) -> Thresholds:
        exits = rule.exits(self.scores, self.ids)
        val_cost = float(self.costs[exits].mean())
        if rule.alt is None and not fits(val_cost, target):
            warnings.warn(f"the calibrated thresholds spend {val_cost:g} on the calibration "
                          f"data, above the target {target:g}", stacklevel=3)
        k_exits = self.costs.size
        return rule.with_record(
            mode=self.mode, budget=budget, target=target, val_cost=val_cost,
            val_accuracy=float(self.correct[np.arange(exits.size), exits].mean()),
            fractions=np.bincount(exits, minlength=k_exits) / exits.size,
            diagnostics={**diagnostics, **rule.diagnostics}, mix_seed=self.seed)

    # ---- select: the candidate that is best on held-out folds ----------------------
    def _check_select(self, select_from: Sequence[str] | None, folds: int, repeats: int,
                      tie_z: float) -> dict[str, Any]:
        modes = tuple(SELECT_FROM if select_from is None else select_from)
        for m in modes:
            check_choice("a calibration to select from", m,
                         {k: v for k, v in CALIBRATIONS.items() if k != "select"})
        if not modes or len(set(modes)) != len(modes):
            raise EenetError(f"select_from must name distinct calibrations, got {list(modes)}")
        if "assignment" in modes and self.fractions is None and self.mode == "select":
            raise EenetError("selecting 'assignment' needs the learned exit distribution")
        if int(folds) != folds or folds < 2 or int(repeats) != repeats or repeats < 1:
            raise EenetError(f"select needs folds >= 2 and repeats >= 1 (integers), got "
                             f"{folds} and {repeats}")
        if not math.isfinite(tie_z) or tie_z < 0:
            raise EenetError(f"tie_z must be a non-negative number, got {tie_z}")
        return {"from": modes, "folds": int(folds), "repeats": int(repeats), "tie_z": tie_z}

    def _part(self, mode: str, split: tuple[int, int] | None) -> Calibrator:
        """``mode``'s calibrator on the fitting rows of split (repeat, fold), no guard; or
        on all rows (``None``) with the guard."""
        key = (mode, split)
        if key not in self._parts:
            if split is None:
                rows, guard = slice(None), self.guard
            else:
                rows, guard = self._splits(split[0])[split[1]][0], False
            self._parts[key] = Calibrator(
                self.scores[rows], self.correct[rows], self.costs, mode=mode,
                fractions=self.fractions, guard=guard, seed=self.seed,
                sample_ids=self.ids[rows], n_boot=self.n_boot, level=self.level)
        return self._parts[key]

    def _splits(self, repeat: int) -> list[tuple[np.ndarray, np.ndarray]]:
        splits = self._select.setdefault("splits", {})
        if repeat not in splits:
            splits[repeat] = fold_splits(self.scores.shape[0], self._select["folds"], repeat,
                                         self.seed)
        return splits[repeat]

    def _held_out_right(self, mode: str, budget: float, repeat: int) -> np.ndarray:
        """[n_samples] held-out correctness under ``mode`` at ``budget`` in one repeat."""
        right = np.zeros(self.scores.shape[0])
        for fold, (_, held) in enumerate(self._splits(repeat)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a fold may be too small for a clean fit
                rule = self._part(mode, (repeat, fold)).rule(budget)
            exits = rule.exits(self.scores[held], self.ids[held])
            right[held] = self.correct[held, exits]
        return right

    def _choice(self, budget: float) -> tuple[str, dict[str, Any]]:
        """The candidate ``select`` calibrates with at ``budget``, and why."""
        modes = self._select["from"]
        if self.scores.shape[0] < 2 * self._select["folds"] or len(modes) == 1:
            return modes[0], {"selected": modes[0], "held_out_accuracy": {},
                              "reason": "too few samples to compare"}
        total = {mode: np.zeros(self.scores.shape[0]) for mode in modes}
        for repeat in range(self._select["repeats"]):
            for mode in modes:
                total[mode] += self._held_out_right(mode, budget, repeat)
            chosen, record = choose({m: t / (repeat + 1) for m, t in total.items()}, modes,
                                    self._select["tie_z"])
            if not ambiguous(record):
                break
        record.update(folds=self._select["folds"], repeats=repeat + 1)
        return chosen, record

    def _selected_rule(self, budget: float) -> Thresholds:
        chosen, record = self._choice(budget)
        rule = self._part(chosen, None).rule(budget)
        return rule.with_record(mode="select", diagnostics={**rule.diagnostics, **record})

    # ---- the family, for certification ------------------------------------------
    def candidates(self, n_ladder: int = 64, budget: float | None = None
                   ) -> list[Thresholds]:
        """The mode's one-parameter family of rules, from the cheapest to the full model.

        ``search``: every step of its staircase; ``static``: the single exits;
        the other modes: the rule at each of ``n_ladder`` costs spaced evenly
        from the first exit's to the last's. Each is fitted on this
        calibrator's data without the guard, and the family ends with
        everyone at the last exit (the full model), the safest candidate. Each
        carries its cost and accuracy on this calibrator's data.

        ``select`` has no family of its own: it hands over the family of the
        candidate it selects at ``budget`` (its first candidate, the smoothest,
        without a budget), recording the choice.
        """
        costs = self.costs
        if self.mode == "select":
            chosen, record = (self._select["from"][0], {"selected": self._select["from"][0]}) \
                if budget is None else self._choice(check_budget(budget, costs))
            return [rule.with_record(diagnostics={**rule.diagnostics, **record})
                    for rule in self._part(chosen, None).candidates(n_ladder)]
        if self.mode == "search":
            fam = self.family()
            rules = [Thresholds(fam.step(i)) for i in range(fam.n_steps)]
        elif self.mode == "static":
            rules = [Thresholds(np.where(np.arange(costs.size) < k, np.inf, -np.inf))
                     for k in range(costs.size)]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rules = [self._fit_at(float(t), self.scores, self.correct, self.ids)
                         for t in np.linspace(costs[0], costs[-1], n_ladder)]
        rules.append(Thresholds(np.full(costs.size, np.inf)))
        rows = np.arange(self.scores.shape[0])
        recorded = []
        for rule in rules:
            rule = rule.with_record(mix_seed=self.seed)
            exits = rule.exits(self.scores, self.ids)
            recorded.append(rule.with_record(
                mode=self.mode, val_cost=float(costs[exits].mean()),
                val_accuracy=float(self.correct[rows, exits].mean())))
        return recorded

    # ---- search ----------------------------------------------------------------
    def family(self) -> SearchFamily:
        """The search staircase (built on first use)."""
        if self._family is None:
            self._family = SearchFamily(self.scores, self.correct, self.costs, seed=self.seed)
        return self._family

    def _search_target(self, budget: float) -> tuple[float, dict[str, Any]]:
        """The largest cost whose guarded cost (cost + margin) fits the budget.

        The margins are measured once on a budget-independent ladder, so the
        target never falls when the budget rises.
        """
        if self._margins is None:
            fam = self.family()
            step_exits = np.stack([apply_thresholds(self.scores, fam.step(i))
                                   for i in range(fam.n_steps)]).astype(np.int8)
            taus = np.linspace(self.costs[0], self.costs[-1], _LADDER)
            margins, info = selection_margins(step_exits, self.correct, self.costs, taus,
                                              seed=self.seed, n_boot=self.n_boot,
                                              level=self.level)
            self._margins = (taus, margins, info)
        taus, margins, info = self._margins
        dense = np.linspace(self.costs[0], self.costs[-1], 4097)
        guarded = dense + np.interp(dense, taus, margins)
        feasible = dense[guarded <= budget * (1 + BUDGET_RTOL)]
        target = float(feasible.max()) if feasible.size else float(self.costs[0])
        return target, {"margin": budget - target if target < budget else 0.0,
                        "ladder": taus.tolist(), "ladder_margins": margins.tolist(),
                        "n_boot": self.n_boot, "level": self.level}

    # ---- the published rules ---------------------------------------------------
    def _fit_at(self, target: float, scores: np.ndarray, correct: np.ndarray,
                ids: np.ndarray, diagnostics: dict[str, Any] | None = None) -> Thresholds:
        """The mode's rule for ``target`` on (a resample of) the calibration data."""
        if self.mode == "patience":
            return patience_rule(scores, self.costs, target, seed=self.seed, sample_ids=ids)
        dist_fn = self._distribution(diagnostics)
        values, dist, dist_budget = fit_quota(scores, self.costs, target, dist_fn)
        if diagnostics is not None:
            diagnostics.update(target_fractions=dist.tolist(), distribution_budget=dist_budget,
                               predicted_cost=float(dist @ self.costs))
        return Thresholds(values)

    def _distribution(self, diagnostics: dict[str, Any] | None):
        costs = self.costs
        if self.mode == "geometric":
            return lambda b: geometric_fractions(costs, b)
        fractions = self.fractions
        assert fractions is not None
        support = fractions > 0
        lo, hi = float(costs[support].min()), float(costs[support].max())
        floored = (fractions + _FRACTION_FLOOR) / (1 + costs.size * _FRACTION_FLOOR)

        def tilted(b: float) -> np.ndarray:
            if lo * (1 - 1e-12) <= b <= hi * (1 + 1e-12):
                return tilt_fractions(fractions, costs, b)
            if diagnostics is not None and "fraction_floor" not in diagnostics:
                diagnostics["fraction_floor"] = _FRACTION_FLOOR
                warnings.warn(f"the learned exit distribution {np.round(fractions, 4).tolist()} "
                              f"spends between {lo:g} and {hi:g} whatever the tilt, so it "
                              f"cannot meet {b:g}; its empty exits got a {_FRACTION_FLOOR:g} "
                              f"floor of mass", stacklevel=5)
            return tilt_fractions(floored, costs, b)
        return tilted


def calibrate(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, budget: float, *,
              mode: CalibrationMode, fractions: np.ndarray | None = None, guard: bool = True,
              seed: int = 0, sample_ids: np.ndarray | None = None, n_boot: int = 20,
              level: float = 0.9, **select: Any) -> Thresholds:
    """One budget's rule: ``Calibrator(...).rule(budget)`` (see :class:`Calibrator`).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.random((1000, 3)); ok = rng.random((1000, 3)) < 0.5 + 0.4 * s
        >>> rule = calibrate(s, ok, np.array([1.0, 2.0, 3.0]), 2.0, mode="search")
        >>> rule.val_cost <= 2.0
        True
    """
    return Calibrator(scores, correct, costs, mode=mode, fractions=fractions, guard=guard,
                      seed=seed, sample_ids=sample_ids, n_boot=n_boot,
                      level=level, **select).rule(budget)
