"""Rules with a guarantee: a budget that holds with stated confidence, and bounded risk.

A :class:`~eenet.rules.Calibrator` fitted on one part of the validation data
offers a one-parameter family of rules (:meth:`~eenet.rules.Calibrator.candidates`),
ordered from the cheapest to the full model. :func:`certified_rule` evaluates
every candidate on the *other* part (samples the family never saw) and picks
one with :mod:`eenet.rules.certify`:

- a budget with confidence ``1 - delta`` (``Guarantee.confidence``): the most
  accurate candidate whose expected cost on new data from the same
  distribution is at most B with probability at least ``1 - delta``
  (Waudby-Smith-Ramdas or Hoeffding-Bentkus upper confidence bounds, tested
  in a fixed sequence from the cheapest candidate);
- a risk level ``epsilon`` against the full model (Jazbec et al., "Fast yet
  Safe: Early-Exiting with Risk Control", NeurIPS 2024): the cheapest
  candidate whose risk is at most epsilon, in expectation (conformal risk
  control) or with probability at least ``1 - delta`` (upper confidence
  bounds, Learn-then-Test), tested from the full model down.

Asked together, the candidate must pass both; both promises then hold
together with probability at least ``1 - delta_budget - delta_risk`` (a union
bound). When no candidate passes, everyone goes to the last exit (the full
model, risk 0) and a warning says so.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eenet._validation import EenetError, check_choice, check_number
from eenet.rules.certify import COST_BOUNDS, RISK_BOUNDS, certify_budget, certify_risk
from eenet.rules.thresholds import Thresholds

__all__ = ["Guarantee", "RISK_RANGES", "certified_rule"]

#: The range of one sample's risk against the full model, known in advance.
RISK_RANGES: dict[str, tuple[float, float]] = {"consistency": (0.0, 1.0), "gap": (-1.0, 1.0),
                                               "brier": (-2.0, 2.0)}


@dataclass(frozen=True)
class Guarantee:
    """What a certified rule must promise.

    Attributes:
        confidence: certify the budget with this probability (``None``: no
            budget guarantee; the guard or nothing keeps the cost).
        cost_bound: ``"wsr"``, ``"hb"`` or ``"hoeffding"``.
        risk: ``"consistency"``, ``"gap"`` or ``"brier"`` (``None``: no risk control).
        epsilon: the risk level.
        delta: miss probability of the risk guarantee (not used by ``"crc"``).
        risk_bound: ``"crc"``, ``"ucb-hb"``, ``"ucb-wsr"``, ``"ucb-hoeffding"`` or ``"ltt"``.
    """

    confidence: float | None = None
    cost_bound: str = "wsr"
    risk: str | None = None
    epsilon: float | None = None
    delta: float = 0.1
    risk_bound: str = "crc"

    def __post_init__(self) -> None:
        if self.confidence is not None:
            check_number("confidence", self.confidence, low=0, high=1, low_open=True,
                         high_open=True)
        check_choice("cost bound", self.cost_bound, COST_BOUNDS)
        check_choice("risk bound", self.risk_bound, RISK_BOUNDS)
        check_number("delta", self.delta, low=0, high=1, low_open=True, high_open=True)
        if self.risk is not None:
            check_choice("risk", self.risk, RISK_RANGES)
            if self.epsilon is None:
                raise EenetError(f"risk {self.risk!r} needs a level: give epsilon (e.g. 0.02)")
            low, high = RISK_RANGES[self.risk]
            check_number("epsilon", self.epsilon, low=low, high=high)
        elif self.epsilon is not None:
            raise EenetError("epsilon needs a risk to bound: give risk (consistency, gap or "
                             "brier)")
        if self.confidence is None and self.risk is None:
            raise EenetError("a guarantee needs a budget confidence, a risk, or both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def certified_rule(candidates: list[Thresholds], scores: np.ndarray, costs: np.ndarray,
                   sample_ids: np.ndarray, guarantee: Guarantee, *, budget: float | None,
                   risk_table: np.ndarray | None = None, seed: int = 0) -> Thresholds:
    """The candidate that meets ``guarantee``, certified on held-out samples.

    Args:
        candidates: rules ordered from the cheapest to the full model, fitted
            without the certification samples, with their accuracy there
            (``val_accuracy``) to choose among those certified for a budget.
        scores: [n_cert, n_exits] scores of the certification samples.
        costs: [n_exits] the costs charged (the policy's own included).
        sample_ids: [n_cert] their ids (mixed rules pick samples by id).
        guarantee: what to certify.
        budget: the budget (needed with ``guarantee.confidence``).
        risk_table: [n_cert, n_exits] per-sample risk of each exit against the
            last (:func:`eenet.evaluate.risk_table`), needed with a risk.
        seed: seed of the betting bounds' sample order.

    Returns:
        The selected candidate, its certificate(s) in ``diagnostics["certified"]``;
        the full model (everyone at the last exit) with a warning when none passes.
    """
    n = scores.shape[0]
    exits = np.stack([rule.exits(scores, sample_ids) for rule in candidates])  # [M, n]
    allowed = np.ones(len(candidates), dtype=bool)
    record: dict[str, Any] = {"guarantee": guarantee.to_dict(), "n_certify": n}
    if guarantee.confidence is not None:
        if budget is None:
            raise EenetError("a budget confidence needs a budget")
        cert = certify_budget(costs[exits], budget, 1.0 - guarantee.confidence,
                              cost_range=(float(costs[0]), float(costs[-1])),
                              bound=guarantee.cost_bound, seed=seed)  # type: ignore[arg-type]
        record["budget"] = cert.to_row() | {"guarantee": cert.guarantee}
        allowed &= np.arange(len(candidates)) <= (-1 if cert.index is None else cert.index)
    if guarantee.risk is not None:
        if risk_table is None:
            raise EenetError("risk control needs the per-sample risks of the certification "
                             "samples")
        risks = risk_table[np.arange(n)[None, :], exits]  # [M, n]
        cert = certify_risk(risks, float(guarantee.epsilon), guarantee.delta,  # type: ignore
                            risk_range=RISK_RANGES[guarantee.risk],
                            bound=guarantee.risk_bound,  # type: ignore[arg-type]
                            order=list(range(len(candidates) - 1, -1, -1)), seed=seed)
        record["risk"] = cert.to_row() | {"guarantee": cert.guarantee}
        allowed &= np.arange(len(candidates)) >= (len(candidates) if cert.index is None
                                                  else cert.index)
    passing = np.flatnonzero(allowed)
    if passing.size == 0:
        asked = []
        if guarantee.confidence is not None:
            asked.append(f"a budget of {budget:g} with confidence {guarantee.confidence:g}")
        if guarantee.risk is not None:
            asked.append(f"{guarantee.risk} risk <= {guarantee.epsilon:g}")
        warnings.warn(f"no thresholds of the family are certified for {' and '.join(asked)} "
                      f"on {n} held-out "
                      f"samples; everyone goes to the last exit (the full model)", stacklevel=3)
        values = np.full(candidates[0].n_exits, np.inf)
        record["fallback"] = "full model"
        return Thresholds(values, diagnostics={"certified": record})
    # with a budget, the most accurate on the family's own data that passes (the fixed
    # sequence certifies every candidate it passed, so any of them may be chosen; ties go
    # to the cheaper); with a risk alone, the cheapest that passes
    if guarantee.confidence is not None:
        accuracy = np.array([c.val_accuracy for c in candidates])[passing]
        pick = int(passing[np.argmax(np.nan_to_num(accuracy, nan=-1.0))])
    else:
        pick = int(passing.min())
    record["candidate"] = pick
    record["n_candidates"] = len(candidates)
    chosen = candidates[pick]
    return chosen.with_record(diagnostics={**chosen.diagnostics, "certified": record})
