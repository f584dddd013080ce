"""The one exit rule: per-exit thresholds on the scores, optionally mixed by sample.

A sample leaves at the first exit ``k`` whose score reaches ``values[k]``; the
last exit takes everyone left, so every sample leaves exactly once. A rule
may carry a second vector ``alt`` used by a share ``mix`` of the samples: that
is how PABEE's patience lands on a budget between two patience values, and it
is the only randomness a rule has. Which samples use ``alt`` is a fixed
function of the sample id (:func:`mix_draws`), so the same sample gets the
same exit in a simulation, a second run, and the runtime.

Every calibration (:mod:`eenet.rules`) returns a :class:`Thresholds`; the
policy and the runtime apply it without asking which calibration made it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from eenet._validation import EenetError, check_finite, plain

__all__ = ["Thresholds", "apply_thresholds", "mix_draws"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def mix_draws(sample_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per sample, a fixed function of its id and the seed.

    The additive recurrence ``frac(0.5 + id * (sqrt 5 - 1)/2 + seed * sqrt 2)``
    (Weyl's equidistributed sequence): consecutive ids spread evenly over
    [0, 1), so a share ``mix`` of any run of samples draws below ``mix`` to
    within a sample or two. Written by hand: the draw must be computable for
    one sample at a time, in any order, in the runtime.

    Example:
        >>> mix_draws(np.arange(4)).round(3).tolist()
        [0.5, 0.118, 0.736, 0.354]
    """
    ids = np.asarray(sample_ids, dtype=np.float64)
    return np.modf(0.5 + ids * _GOLDEN + seed * math.sqrt(2.0))[0] % 1.0


def apply_thresholds(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Exit of every sample: the first exit whose score reaches its threshold.

    Args:
        scores: [n_samples, n_exits] finite scores, higher = readier to exit.
        thresholds: [n_exits] (or per sample, [n_samples, n_exits]); ``+inf``
            closes an exit, the last column is ignored so every sample exits.

    Returns:
        int64 [n_samples], exits in ``[0, n_exits)``.

    Example:
        >>> apply_thresholds(np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([0.5, 0.99]))
        array([0, 1])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise EenetError(f"scores must have shape [n_samples, n_exits], got {scores.shape}")
    check_finite("scores", scores)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape not in ((scores.shape[1],), scores.shape):
        raise EenetError(f"thresholds must have shape ({scores.shape[1]},) or {scores.shape} "
                         f"to match scores, got {thresholds.shape}")
    passed = scores >= thresholds
    passed[:, -1] = True
    return np.argmax(passed, axis=1).astype(np.int64)


def _vector(values: Any, name: str, n_exits: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or (n_exits is not None and arr.size != n_exits):
        want = "one per exit" if n_exits is None else f"{n_exits} values"
        raise EenetError(f"{name} must be a 1-D vector of thresholds ({want}), got shape "
                         f"{arr.shape}")
    if np.isnan(arr).any():
        raise EenetError(f"{name} must not hold NaN, got {arr.tolist()}")
    return arr


@dataclass(frozen=True, eq=False)
class Thresholds:
    """Per-exit thresholds and what they did on the data they were calibrated on.

    Attributes:
        values: [n_exits] thresholds (``+inf`` closes an exit; the last is ignored).
        alt: optional second [n_exits] vector, used by a share ``mix`` of the samples.
        mix: share of the samples that use ``alt``, in [0, 1].
        mix_seed: seed of :func:`mix_draws`.
        mode: the calibration that made the rule.
        budget: the budget asked for.
        target: the cost the rule was calibrated to (below ``budget`` with a guard).
        val_cost: realized average cost on the calibration data.
        val_accuracy: realized accuracy there (for a policy whose scorer was
            trained on the same data, an in-sample figure).
        fractions: [n_exits] realized exit distribution there.
        diagnostics: plain containers (guard, certification, ...).

    Example:
        >>> t = Thresholds(np.array([0.5, -np.inf]))
        >>> t.exits(np.array([[0.7, 0.0], [0.1, 0.0]])).tolist()
        [0, 1]
    """

    values: np.ndarray
    alt: np.ndarray | None = None
    mix: float = 0.0
    mix_seed: int = 0
    mode: str = ""
    budget: float = math.nan
    target: float = math.nan
    val_cost: float = math.nan
    val_accuracy: float = math.nan
    fractions: np.ndarray | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = _vector(self.values, "thresholds")
        object.__setattr__(self, "values", values)
        if self.alt is not None:
            object.__setattr__(self, "alt", _vector(self.alt, "alt thresholds", values.size))
        if not 0.0 <= float(self.mix) <= 1.0:
            raise EenetError(f"mix must lie in [0, 1], got {self.mix}")
        if self.mix > 0 and self.alt is None:
            raise EenetError("a rule with mix > 0 needs alt thresholds")

    @property
    def n_exits(self) -> int:
        return int(self.values.size)

    def uses_alt(self, sample_ids: np.ndarray) -> np.ndarray:
        """Which samples use ``alt``: bool [n_samples]."""
        ids = np.asarray(sample_ids)
        if self.alt is None or self.mix <= 0:
            return np.zeros(ids.shape[0], dtype=bool)
        return mix_draws(ids, self.mix_seed) < self.mix

    def per_sample(self, sample_ids: np.ndarray) -> np.ndarray:
        """The thresholds each sample uses, float64 [n_samples, n_exits]."""
        ids = np.asarray(sample_ids)
        out = np.broadcast_to(self.values, (ids.shape[0], self.n_exits))
        if self.alt is None or self.mix <= 0:
            return out
        return np.where(self.uses_alt(ids)[:, None], self.alt, out)

    def exits(self, scores: np.ndarray, sample_ids: np.ndarray | None = None) -> np.ndarray:
        """Exit of every sample, int64 [n_samples].

        Args:
            scores: [n_samples, n_exits] scores.
            sample_ids: [n_samples] ids deciding who uses ``alt``; default
                ``0..n_samples-1``.
        """
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] != self.n_exits:
            raise EenetError(f"scores must have shape [n_samples, {self.n_exits}], got "
                             f"{scores.shape}")
        ids = np.arange(scores.shape[0]) if sample_ids is None else sample_ids
        return apply_thresholds(scores, self.per_sample(ids))

    def with_record(self, **fields: Any) -> "Thresholds":
        """A copy with some record fields (``mode``, ``val_cost``, ...) set."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data.update(fields)
        return Thresholds(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (infinities stay floats)."""
        return {"values": self.values.tolist(),
                "alt": None if self.alt is None else self.alt.tolist(),
                "mix": float(self.mix), "mix_seed": int(self.mix_seed), "mode": self.mode,
                "budget": float(self.budget), "target": float(self.target),
                "val_cost": float(self.val_cost), "val_accuracy": float(self.val_accuracy),
                "fractions": None if self.fractions is None else plain(self.fractions),
                "diagnostics": plain(self.diagnostics)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Thresholds":
        """Rebuild from :meth:`to_dict`.

        Raises:
            EenetError: keys are missing or values have the wrong form.
        """
        if not isinstance(data, Mapping) or "values" not in data:
            raise EenetError("the policy's thresholds are missing or damaged; fit it again")
        try:
            return cls(values=np.asarray(data["values"], dtype=np.float64),
                       alt=None if data.get("alt") is None else np.asarray(data["alt"], float),
                       mix=float(data.get("mix", 0.0)), mix_seed=int(data.get("mix_seed", 0)),
                       mode=str(data.get("mode", "")), budget=float(data.get("budget", math.nan)),
                       target=float(data.get("target", math.nan)),
                       val_cost=float(data.get("val_cost", math.nan)),
                       val_accuracy=float(data.get("val_accuracy", math.nan)),
                       fractions=None if data.get("fractions") is None
                       else np.asarray(data["fractions"], float),
                       diagnostics=dict(data.get("diagnostics") or {}))
        except (TypeError, ValueError) as err:
            raise EenetError(f"the policy's thresholds are damaged ({err}); fit it again") \
                from None
