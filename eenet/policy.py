"""A deployable exit policy: a scorer plus one fitted rule.

:class:`ExitPolicy` ties the pipeline together. ``fit`` trains the method's
scorer on a validation cache (a no-op for the fixed scores) and calibrates a
:class:`~eenet.rules.thresholds.Thresholds` rule that meets the budget;
``calibrate`` redoes the rule for another cache or budget; ``exits`` and
``evaluate`` apply the policy to any cache of the same network; ``save`` and
``load`` round-trip it through a ``torch.save`` file of plain containers
(loads with ``weights_only=True``).

The policy's own work is a cost like the network's: with ``overhead`` (per
exit, in the cache's cost unit; :mod:`eenet.scores.overhead` measures it) the
rule is calibrated on, and evaluation charges, the costs the deployed policy
really spends (:meth:`ExitPolicy.costs_for`).
"""
from __future__ import annotations

import copy
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from eenet import __version__
from eenet._validation import (EenetError, atomic_output, check_budget, check_choice,
                               check_costs, check_int, first_line,
                               torch_load_problem)
from eenet.cache import ExitCache
from eenet.evaluate import EvalResult, evaluate_exits, risk_table
from eenet.rules import Calibrator, Thresholds
from eenet.rules.certified import Guarantee, certified_rule
from eenet.scores import Method, get_method, score_cache, scorer_from_state

__all__ = ["ExitPolicy", "POLICY_FORMAT", "POLICY_VERSION", "sample_fingerprints"]

POLICY_FORMAT = "eenet-policy"
POLICY_VERSION = 2
#: Test caches whose costs differ from the policy's by more than this (relative) get a warning.
COST_RTOL = 0.05


def sample_fingerprints(cache: ExitCache) -> np.ndarray:
    """A 64-bit fingerprint per sample of its exit outputs, int64 [n_samples].

    The same input through the same network gives the same fingerprint, so a
    policy can tell when it is evaluated on samples it was fitted on, whatever
    their ids. Logits are rounded to float16 first, so float16 and float32
    caches of one run agree. Computed in blocks of samples (a few MiB each).
    """
    n, k_exits, c = cache.logits.shape
    width = k_exits * c
    mult = np.random.default_rng(0x5EED).integers(1, 2**62, size=width, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    rows = max(1, (8 << 20) // (8 * width))
    with np.errstate(over="ignore"):
        for start in range(0, n, rows):
            block = np.asarray(cache.logits[start:start + rows], dtype=np.float16)
            bits = block.view(np.int16).reshape(block.shape[0], width).astype(np.int64)
            out[start:start + rows] = (bits * mult).sum(axis=1) ^ (bits[:, 0] << 40)
    return out


def _ids(cache: ExitCache) -> np.ndarray:
    return np.arange(cache.n_samples) if cache.sample_ids is None else cache.sample_ids


class ExitPolicy:
    """Which exit each sample leaves at, under an average cost budget.

    Args:
        method: a name or alias from :data:`eenet.scores.METHODS` (``"eenet"``,
            ``"eenet-paper"``, ``"maxprob"``/``"msdnet"``, ``"entropy"``/
            ``"branchynet"``, ``"patience"``/``"pabee"``, ``"static"``).
        calibration: a calibration the method accepts (:data:`eenet.rules.CALIBRATIONS`);
            ``None`` picks the method's default.
        guard: calibrate to a slightly lower target so the realized cost on
            unseen data stays within the budget (:mod:`eenet.rules.guard`).
        seed: seed of every stochastic step.
        device: where a learned scorer trains (``"auto"`` uses CUDA when present).
        **hparams: the learned scorer's hyperparameters (EENet: ``epochs``,
            ``lr``, ``hidden``, ``alpha_ce``, ``alpha_budget``, ...).

    Example:
        >>> from eenet import ExitPolicy, synthetic_example
        >>> val, test = synthetic_example(seed=0)
        >>> policy = ExitPolicy("maxprob").fit(val, budget=4.0)
        >>> policy.evaluate(test).avg_cost <= 4.0 * 1.01
        True
    """

    def __init__(self, method: str = "eenet", *, calibration: str | None = None,
                 guard: bool = True, seed: int = 0, device: str = "cpu",
                 **hparams: Any) -> None:
        self.method: Method = get_method(method)
        if not self.method.deployable:
            self.method.scorer()  # raises the explanation
        self.calibration = self._check_calibration(calibration)
        self.guard = bool(guard)
        self.seed = int(seed)
        self.hparams = dict(hparams)
        if self.method.learned:
            from eenet._validation import resolve_device

            hparams = {**hparams, "device": str(resolve_device(device))}
        self.scorer = self.method.scorer(**hparams)
        self.rule: Thresholds | None = None
        self.overhead: np.ndarray | None = None
        self.reference: dict[str, Any] | None = None
        self.provenance: dict[str, Any] = {}
        self._fit_fingerprints: np.ndarray | None = None
        self._calibrator: tuple[tuple, Calibrator] | None = None

    def _check_calibration(self, calibration: str | None) -> str:
        if calibration is None:
            return str(self.method.default_calibration)
        return check_choice(f"calibration for {self.method.name}", calibration,
                            self.method.calibrations)

    # ---- costs ----------------------------------------------------------------
    def costs_for(self, cache: ExitCache) -> np.ndarray:
        """The costs this policy spends on ``cache``'s network: the cache's costs plus the
        policy's own cost for a sample leaving at each exit (``overhead``, measured by
        :func:`eenet.runtime.overhead.policy_overhead`), when it is counted."""
        return cache.costs if self.overhead is None else cache.costs + self.overhead

    # ---- fitting ---------------------------------------------------------------
    def fit(self, cache: ExitCache, budget: float | None, *,
            overhead: np.ndarray | Callable[["ExitPolicy", ExitCache], Any] | None = None,
            guarantee: Guarantee | None = None, certify_fraction: float = 0.5,
            verbose: bool = False) -> "ExitPolicy":
        """Fit the scorer on ``cache`` and calibrate the rule for ``budget``; returns self.

        Args:
            cache: the validation split.
            budget: average cost per sample, in the cache's cost unit.
            overhead: the policy's own cost ``O_k`` [n_exits] for a sample leaving
                at exit k, in the cache's unit, or a function ``f(policy, cache)``
                returning it (or ``None``) once the scorer is fitted, such as
                :func:`eenet.runtime.overhead.policy_overhead`. Calibration and
                evaluation then charge ``c_k + O_k``. ``None`` charges the
                network's costs alone, as the published methods do.
            guarantee: certify the budget with confidence and/or bound a risk
                (:mod:`eenet.rules.certified`): the scorer and the family of
                rules are fitted on a seeded stratified part of ``cache``, and
                the rest (``certify_fraction`` of it) certifies the choice.
                ``budget`` may be ``None`` for risk control alone.
            certify_fraction: the share of ``cache`` kept for certification.
            verbose: progress bar on stderr.
        """
        _check_exit_count(cache)
        if budget is not None:
            budget = check_budget(budget, cache.costs, unit=cache.cost_unit)
        elif guarantee is None or guarantee.confidence is not None:
            raise EenetError("fit needs a budget (or a risk guarantee alone)")
        self.reference = network_reference(cache)
        fit_part, certify = cache, None
        if guarantee is not None:
            fit_part, certify = cache.holdout_split(certify_fraction, seed=self.seed)
        self._fit_fingerprints = np.unique(sample_fingerprints(fit_part))
        self.provenance["fit_sample_ids"] = _ids(fit_part).tolist()
        self._calibrator = None
        self.overhead = None
        if overhead is not None and not callable(overhead):
            self.overhead = _check_overhead(overhead, cache.n_exits)
        fit_budget = budget if budget is not None else float(cache.costs[-1])
        self.scorer.fit(fit_part, self.costs_for(fit_part), fit_budget, seed=self.seed,
                        verbose=verbose)
        if callable(overhead):
            measured = overhead(self, fit_part)
            self.overhead = None if measured is None else _check_overhead(measured,
                                                                          cache.n_exits)
        if budget is not None:
            budget = check_budget(budget, self.costs_for(cache), unit=cache.cost_unit)
        self.rule = self._new_rule(fit_part, certify, budget, guarantee)
        return self

    def _new_rule(self, cache: ExitCache, certify: ExitCache | None, budget: float | None,
                  guarantee: Guarantee | None) -> Thresholds:
        """The rule for ``budget`` calibrated on ``cache``, certified on ``certify``."""
        calibrator = self.calibrator(cache)
        if guarantee is None or certify is None:
            assert budget is not None
            return calibrator.rule(budget)
        risks = None if guarantee.risk is None else risk_table(certify)[guarantee.risk]
        costs = self.costs_for(certify)
        rule = certified_rule(calibrator.candidates(budget=budget),
                              score_cache(self.scorer, certify), costs,
                              _ids(certify), guarantee, budget=budget, risk_table=risks,
                              seed=self.seed)
        exits = rule.exits(score_cache(self.scorer, certify), _ids(certify))
        return rule.with_record(
            mode=self.calibration, budget=math.nan if budget is None else budget,
            target=math.nan if budget is None else budget, val_cost=float(costs[exits].mean()),
            val_accuracy=float(certify.correct()[np.arange(exits.size), exits].mean()),
            fractions=np.bincount(exits, minlength=certify.n_exits) / exits.size)

    def calibrator(self, cache: ExitCache) -> Calibrator:
        """The calibration of this policy's scores on ``cache``, for any budget.

        The last one is kept, so asking again for the same cache (a sweep over
        budgets) reuses its scores, search staircase and guard margins.
        """
        self._require("calibrate", fitted=False)
        key = (cache, self.calibration, self.guard, self.scorer)
        kept = self._calibrator
        if kept is None or any(a is not b and a != b for a, b in zip(kept[0], key)):
            self._calibrator = (key, Calibrator(
                score_cache(self.scorer, cache), cache.correct(), self.costs_for(cache),
                mode=self.calibration, fractions=self.scorer.exit_distribution(),
                guard=self.guard, seed=self.seed, sample_ids=_ids(cache),
                select_from=self.method.select_from))
        return self._calibrator[1]

    def calibrate(self, cache: ExitCache, budget: float | None = None, *,
                  mode: str | None = None, guard: bool | None = None,
                  guarantee: Guarantee | None = None,
                  certify_fraction: float = 0.5) -> "ExitPolicy":
        """Recompute the rule on ``cache`` for ``budget`` (default: the current one).

        With ``guarantee`` the rule family is fitted on a seeded stratified part
        of ``cache`` and certified on the rest (``certify_fraction``); those
        samples must be new to a learned scorer.
        """
        self._require("calibrate", fitted=False)
        self._check_compatible(cache)
        if mode is not None:
            self.calibration = self._check_calibration(mode)
        if guard is not None:
            self.guard = bool(guard)
        keeps_budget = guarantee is None or guarantee.confidence is not None
        if budget is None and keeps_budget and self.rule is not None \
                and math.isfinite(self.rule.budget):
            budget = self.rule.budget
        if budget is None and (guarantee is None or guarantee.confidence is not None):
            raise EenetError("no budget: pass one to calibrate()")
        if budget is not None:
            budget = check_budget(budget, self.costs_for(cache), unit=cache.cost_unit)
        certify = None
        if guarantee is not None:
            if self.method.learned and self._seen(cache):
                raise EenetError(f"{self._seen(cache)} samples of this cache trained the "
                                 f"scorer, so they cannot certify it; certify on a cache the "
                                 f"policy has not seen (or fit with the guarantee)")
            cache, certify = cache.holdout_split(certify_fraction, seed=self.seed)
        self.rule = self._new_rule(cache, certify, budget, guarantee)
        return self

    # ---- applying --------------------------------------------------------------
    def exits(self, cache: ExitCache) -> np.ndarray:
        """The exit of every sample of ``cache``, int64 [n_samples]."""
        rule = self._require("exits")
        self._check_compatible(cache)
        return rule.exits(score_cache(self.scorer, cache), _ids(cache))

    def evaluate(self, cache: ExitCache) -> EvalResult:
        """Accuracy, realized cost (the policy's overhead included), exit distribution
        and risk of the policy on ``cache``."""
        exits = self.exits(cache)
        self._warn_if_seen(cache)
        return evaluate_exits(exits, cache, method=self.method.name, budget=self.budget,
                              costs=self.costs_for(cache))

    @property
    def budget(self) -> float | None:
        """The budget the rule was calibrated for (``None`` for risk control alone)."""
        if self.rule is None or not math.isfinite(self.rule.budget):
            return None
        return float(self.rule.budget)

    @property
    def val_accuracy(self) -> float:
        """Accuracy on the calibration cache (in-sample for a scorer trained on it)."""
        return float(self._require("val_accuracy").val_accuracy)

    @property
    def val_cost(self) -> float:
        return float(self._require("val_cost").val_cost)

    def describe(self) -> str:
        """A one-line summary for the command line."""
        if self.rule is None or self.reference is None:
            return f"{self.method.name} (not fitted)"
        unit = self.reference["cost_unit"]
        certified = self.rule.diagnostics.get("certified")
        label = "held-out " if certified else ("in-sample " if self.method.learned else "")
        budget = "no budget" if self.budget is None else f"budget {self.rule.budget:.4g} {unit}"
        guard = " + guard" if self.guard and not certified else ""
        auto = self.provenance.get("auto")
        parts = [f"{self.method.name}, {budget}",
                 f"calibration {_describe_selection(self.calibration, self.rule)}{guard}",
                 f"{label}validation accuracy {self.rule.val_accuracy:.4f} at cost "
                 f"{self.rule.val_cost:.4g}"]
        if certified:
            parts += [c["guarantee"] for c in (certified.get("budget"), certified.get("risk"))
                      if c] + (["nothing certified: the full model"]
                               if certified.get("fallback") else [])
        if self.overhead is not None:
            parts.append(f"policy's own cost included: {self.overhead[0]:.3g} {unit} by the "
                         f"first exit to {self.overhead[-1]:.3g} by the last")
        if auto:
            parts.append(_describe_auto(auto))
        return "; ".join(parts)

    # ---- checks ----------------------------------------------------------------
    def _require(self, step: str, *, fitted: bool = True) -> Thresholds:
        if self.reference is None or (fitted and self.rule is None):
            raise EenetError(f"{step}() needs a fitted policy; call fit() first")
        return self.rule  # type: ignore[return-value]

    def _check_compatible(self, cache: ExitCache) -> None:
        ref = self.reference
        assert ref is not None
        where = f"{cache.path}: " if cache.path else ""
        if cache.n_exits != ref["n_exits"] or cache.n_classes != ref["n_classes"]:
            raise EenetError(f"{where}the cache has {cache.n_exits} exits x {cache.n_classes} "
                             f"classes but the policy was fitted on {ref['n_exits']} x "
                             f"{ref['n_classes']}; use a cache of the same network")
        self.check_network(network_of(cache), where=where)
        if cache.cost_unit != ref["cost_unit"]:
            raise EenetError(f"{where}costs are in {cache.cost_unit!r} but the policy's budget "
                             f"is in {ref['cost_unit']!r}; use caches with the same cost unit")
        fitted = np.asarray(ref["costs"])
        worst = float(np.max(np.abs(cache.costs - fitted) / np.maximum(fitted, 1e-300)))
        if worst > COST_RTOL:
            warnings.warn(f"{where}the cache's costs {np.round(cache.costs, 4).tolist()} differ "
                          f"from those the policy was fitted with "
                          f"{np.round(fitted, 4).tolist()} by up to {100 * worst:.0f}%, so the "
                          f"cost is not comparable with the budget; cache this split with "
                          f"`eenet cache ... --costs-from VAL.h5` (or `eenet import ... "
                          f"--costs-from VAL.h5`) to reuse the validation costs", stacklevel=3)

    def check_network(self, fingerprint: str, *, where: str = "") -> None:
        """Refuse a network whose parameters are not those of the network the policy was
        fitted on (its ``network_sha256``, see :func:`eenet._validation.network_fingerprint`).

        Nothing is compared when either side has no fingerprint (a cache made by
        ``eenet import`` or by an older eenet, or a policy fitted on one).

        Raises:
            EenetError: both fingerprints are known and differ.
        """
        self._require("check_network", fitted=False)
        ref: dict[str, Any] = self.reference  # type: ignore[assignment]
        mine = str(ref.get("network_sha256") or "")
        if mine and fingerprint and fingerprint != mine:
            raise EenetError(f"{where}the network's parameters (fingerprint {fingerprint[:12]}) "
                             f"are not those of the network the policy was fitted on "
                             f"({mine[:12]}, model {ref['model']!r}): another "
                             f"network, or the same one trained again; fit a policy on a "
                             f"cache of this network")

    def _seen(self, cache: ExitCache) -> int:
        """How many samples of ``cache`` the policy was fitted on."""
        if self._fit_fingerprints is None or self._fit_fingerprints.size == 0:
            return 0
        return int(np.isin(sample_fingerprints(cache), self._fit_fingerprints).sum())

    def _warn_if_seen(self, cache: ExitCache) -> None:
        seen = self._seen(cache)
        if seen:
            where = f"{cache.path}: " if cache.path else ""
            warnings.warn(f"{where}{seen} of the {cache.n_samples} samples evaluated were used "
                          f"to fit the policy, so the result is optimistic; evaluate on "
                          f"another split (or the part `fit --holdout` kept out)", stacklevel=3)

    # ---- persistence -----------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """The policy as plain containers (tensors, numbers, strings, lists, dicts)."""
        rule = self._require("save")
        return {"format": POLICY_FORMAT, "format_version": POLICY_VERSION,
                "eenet_version": __version__, "method": self.method.name,
                "calibration": self.calibration, "guard": self.guard, "seed": self.seed,
                "hparams": copy.deepcopy(self.hparams), "reference": copy.deepcopy(self.reference),
                "scorer": self.scorer.to_state(), "rule": rule.to_dict(),
                "overhead": None if self.overhead is None else self.overhead.tolist(),
                "fit_fingerprints": torch.from_numpy(self._fit_fingerprints.copy())
                if self._fit_fingerprints is not None else None,
                "provenance": copy.deepcopy(self.provenance)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy atomically (a temporary file, then a rename)."""
        buffer = io.BytesIO()
        # serialised in memory first: torch.save reports a full disk as a RuntimeError from
        # its zip writer, a plain file write as the OSError it is
        torch.save(self.to_state(), buffer)
        with atomic_output(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
        return Path(path)

    @classmethod
    def from_state(cls, state: Any, *, source: str = "policy") -> "ExitPolicy":
        """Rebuild a policy from :meth:`to_state`'s output.

        Raises:
            EenetError: not a policy, a policy of another format version, or damaged.
        """
        if not isinstance(state, dict) or state.get("format") != POLICY_FORMAT:
            raise EenetError(f"{source}: not an eenet policy file; create one with `eenet fit`")
        version = state.get("format_version")
        if version != POLICY_VERSION:
            raise EenetError(f"{source}: policy format version {version} is not the version "
                             f"this eenet reads ({POLICY_VERSION}); fit the policy again with "
                             f"`eenet fit`")
        try:
            policy = cls(state["method"], calibration=state["calibration"],
                         guard=state["guard"], seed=state["seed"], **state["hparams"])
            policy.scorer = scorer_from_state(state["scorer"])
            policy.reference = _check_reference(state["reference"], source)
            policy.rule = Thresholds.from_dict(state["rule"])
            n_exits = policy.reference["n_exits"]
            if policy.rule.n_exits != n_exits:
                raise EenetError(f"{source}: the policy's thresholds are for "
                                 f"{policy.rule.n_exits} exits but its network has {n_exits}; "
                                 f"the file is damaged or edited by hand: fit it again")
            policy.overhead = None if state["overhead"] is None else _check_overhead(
                state["overhead"], n_exits)
            fps = state.get("fit_fingerprints")
            policy._fit_fingerprints = None if fps is None else fps.numpy()
            policy.provenance = dict(state.get("provenance") or {})
        except EenetError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise EenetError(f"{source}: the policy file is incomplete or damaged "
                             f"({type(err).__name__}: {err}); fit it again") from None
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
            raise EenetError(f"{path}: not a readable policy file "
                             f"({torch_load_problem(err, path)}); it is corrupt or not made by "
                             f"`eenet fit`") from None
        return cls.from_state(state, source=str(path))


def network_reference(cache: ExitCache) -> dict[str, Any]:
    """What a policy records of the network it is fitted on: shape, costs, fingerprint."""
    return {"n_exits": cache.n_exits, "n_classes": cache.n_classes,
            "cost_unit": cache.cost_unit, "model": cache.model, "dataset": cache.dataset,
            "costs": cache.costs.tolist(), "cost_source": cache.cost_source,
            "network_sha256": network_of(cache)}


def network_of(cache: ExitCache) -> str:
    """The fingerprint of the network ``cache`` was made with (``""`` when it records none)."""
    return str(cache.attrs.get("network_sha256", "") or "")


def _check_reference(reference: Any, source: str) -> dict[str, Any]:
    """A policy file's record of its network, checked field by field.

    Raises:
        EenetError: a field is missing or of the wrong kind (a hand-edited or damaged file).
    """
    if not isinstance(reference, dict):
        raise EenetError(f"{source}: the policy's record of its network is missing or "
                         f"damaged; fit it again")
    ref = dict(reference)
    key = "n_exits"
    try:
        ref[key] = check_int(key, ref.get(key), minimum=2)
        key = "n_classes"
        ref[key] = check_int(key, ref.get(key), minimum=1)
        key = "costs"
        ref[key] = check_costs(ref.get(key), ref["n_exits"]).tolist()
        for key in ("cost_unit", "model", "dataset", "cost_source", "network_sha256"):
            if not isinstance(ref.get(key, ""), str):
                raise EenetError(f"{key} must be a string, got {ref[key]!r}")
    except (EenetError, TypeError, ValueError) as err:
        why = first_line(err) if first_line(err).startswith(key) else f"{key}: {first_line(err)}"
        raise EenetError(f"{source}: the policy file is damaged or edited by hand (its "
                         f"network record: {why}); fit it again") from None
    return ref


def _describe_selection(calibration: str, rule: Thresholds) -> str:
    """``select (search: held-out accuracy search 0.8522, geometric 0.8204, 2 folds)``."""
    chosen = rule.diagnostics.get("selected")
    if not chosen:
        return calibration
    held_out = rule.diagnostics.get("held_out_accuracy") or {}
    if not held_out:
        return f"{calibration} ({chosen}: {rule.diagnostics.get('reason', 'by default')})"
    why = "the most accurate" if chosen == rule.diagnostics.get("leader") else \
        f"within {rule.diagnostics.get('tie_z', 0):g} se of {rule.diagnostics.get('leader')}"
    ranked = sorted(held_out, key=lambda m: -held_out[m])
    accuracies = ", ".join(f"{m} {held_out[m]:.4f}" for m in ranked)
    return (f"{calibration} ({chosen}, {why} on held-out folds: accuracy {accuracies}, "
            f"{rule.diagnostics.get('folds')} folds)")


def _check_overhead(overhead: Any, n_exits: int) -> np.ndarray:
    arr = np.asarray(overhead, dtype=np.float64)
    if arr.shape != (n_exits,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise EenetError(f"overhead must be {n_exits} finite non-negative costs, one per exit, "
                         f"got {arr.tolist()}")
    return arr


def _check_exit_count(cache: ExitCache) -> None:
    if cache.n_exits < 2:
        where = f"{cache.path}: " if cache.path else ""
        raise EenetError(f"{where}the cache has a single exit; an exit policy needs a network "
                         f"with at least two exits")


def _describe_auto(record: dict[str, Any]) -> str:
    """The winner of ``--method auto``, why, and the runners-up's out-of-fold accuracies."""
    def accuracy(c: dict[str, Any]) -> float:
        return c["accuracy"] if math.isfinite(c["accuracy"]) else -math.inf

    chosen = next(c for c in record["candidates"] if c["status"] == "chosen")
    others = sorted((c for c in record["candidates"] if c["status"] != "chosen"),
                    key=accuracy, reverse=True)
    listed = ", ".join(f"{c['method']} {c['accuracy']:.4f}" if math.isfinite(c["accuracy"])
                       else f"{c['method']} cannot serve the budget" for c in others)
    return (f"auto chose {record['chosen']}, {record['reason']} (out-of-fold accuracy "
            f"{chosen['accuracy']:.4f} over {record['folds']} folds; {listed})")
