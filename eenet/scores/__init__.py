"""Exit caches -> [n_samples, n_exits] readiness scores, and THE method table.

The scorer protocol
-------------------
A scorer says how ready each sample is to leave at each exit (higher =
readier). It computes exit k's score from the outputs of exits 0..k only,
exit by exit, so a runtime can call it on the samples still running without
the rest of the network's outputs:

    state = scorer.start(batch, n_classes, device)   # the samples' running state
    for k in range(n_exits):
        s_k = scorer.score_exit(k, logits_k, state)   # [batch]; updates state

``state`` is a dict of tensors whose first dimension is the batch; a runtime
keeps the samples still running with :func:`eenet.scores.features.select_rows`.
:func:`score_cache` runs the same protocol over a whole exit cache, so the
scores a policy is calibrated on are the scores its runtime computes.

The method table
----------------
:data:`METHODS` is the one place that names the exit policies: the command
line's choices, the sweep's names and aliases, plot labels and every "unknown
method" message come from it. Each :class:`Method` names its scorer, its
calibrations (the first is the default) and whether it takes hyperparameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from eenet._validation import EenetError
from eenet.cache import ExitCache
from eenet.scores.confidence import ConstantScorer, EntropyScorer, MaxProbScorer, PatienceScorer
from eenet.scores.eenet import EENetScorer

__all__ = ["METHODS", "Method", "Scorer", "get_method", "score_cache", "scorer_from_state"]

_SCORE_ROWS_BYTES = 32 << 20  # logits per block in score_cache


@runtime_checkable
class Scorer(Protocol):
    """What every exit scorer provides (see the module docstring)."""

    name: str

    def fit(self, cache: ExitCache, costs: np.ndarray, budget: float, *, seed: int = 0,
            verbose: bool = False) -> "Scorer":
        """Learn what the scores need from a validation cache; returns self."""
        ...

    def start(self, batch: int, n_classes: int, device: torch.device | str = "cpu"
              ) -> dict[str, Tensor]:
        """The running state of ``batch`` samples that have seen no exit."""
        ...

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's scores ``[batch]`` from its logits ``[batch, n_classes]``; updates state."""
        ...

    def exit_distribution(self) -> np.ndarray | None:
        """A learned exit distribution [n_exits], or None."""
        ...

    def to_state(self) -> dict[str, Any]:
        """Plain containers that the scorer class's ``from_state`` rebuilds it from."""
        ...


def score_cache(scorer: Scorer, cache: ExitCache) -> np.ndarray:
    """Every sample's score at every exit, float64 ``[n_samples, n_exits]``.

    Runs the scorer's exit-by-exit protocol over blocks of samples on the CPU.

    Example:
        >>> from eenet.synthetic import synthetic_cache
        >>> score_cache(MaxProbScorer(), synthetic_cache(5, n_exits=2)).shape
        (5, 2)
    """
    n, k_exits, c = cache.logits.shape
    out = np.empty((n, k_exits), dtype=np.float64)
    rows = max(1, _SCORE_ROWS_BYTES // (k_exits * c * 4))
    with torch.inference_mode():
        for start in range(0, n, rows):
            block = torch.from_numpy(np.ascontiguousarray(cache.logits[start:start + rows]))
            state = scorer.start(block.shape[0], c, "cpu")
            for k in range(k_exits):
                out[start:start + rows, k] = scorer.score_exit(k, block[:, k], state).numpy()
    return out


# ---------------------------------------------------------------------------
# the method table
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One exit policy eenet knows.

    Attributes:
        name: canonical name (``--method``, sweep rows).
        label: legend label in plots.
        description: one line for help texts.
        make_scorer: ``make_scorer(**hparams) -> Scorer``; ``None`` for the oracle.
        calibrations: the calibrations this method accepts; the first is its
            default (:mod:`eenet.rules`).
        select_from: what its ``select`` calibration chooses between, in
            preference order (ties go to the first: the method's own published
            rule, then the smoother geometric rule, then the search).
        aliases: other names accepted for it.
        preset: hyperparameters the method fixes (``eenet-paper``).
        learned: the scorer is trained and accepts hyperparameters.
        deployable: a policy can be fitted (False for the label-aware oracle).
    """

    name: str
    label: str
    description: str
    make_scorer: Callable[..., Scorer] | None
    calibrations: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    preset: dict[str, Any] = field(default_factory=dict)
    select_from: tuple[str, ...] = ("geometric", "search")
    learned: bool = False
    deployable: bool = True

    @property
    def default_calibration(self) -> str | None:
        return self.calibrations[0] if self.calibrations else None

    def scorer(self, **hparams: Any) -> Scorer:
        """A fresh scorer; only learned methods take hyperparameters."""
        if self.make_scorer is None:
            raise EenetError(f"{self.name!r} uses the labels, so it is an upper bound and not a "
                             f"deployable policy; report it with `eenet sweep --methods oracle`")
        if hparams and not self.learned:
            raise EenetError(f"{self.name} takes no hyperparameters, got {sorted(hparams)}")
        return self.make_scorer(**{**hparams, **self.preset})


# Every score-based method calibrates by default with ``select``: the calibration that is most
# accurate at the budget on held-out folds of the validation data (eenet.rules.select). Neither
# geometric nor search wins on every network (benchmarks/suite.py), so the data decides.
_SCORE_CALIBRATIONS = ("select", "geometric", "search")
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("eenet", "EENet", "learned exit scores (EENet, WACV 2024) with eenet's target and "
           "features", EENetScorer, (*_SCORE_CALIBRATIONS, "assignment"), learned=True),
    Method("eenet-paper", "EENet, paper recipe",
           "EENet as published (the paper's scoring target and features, alternating "
           "training, the learned exit distribution as quotas), except that the "
           "distribution is tilted to meet the budget, the guard applies (--no-guard "
           "removes it) and, by default, held-out folds decide between its quotas and the "
           "geometric or searched thresholds (--calibration assignment forces the paper's)",
           EENetScorer, (*_SCORE_CALIBRATIONS, "assignment"),
           preset={"target": "correct", "features": "paper", "alternate": True},
           select_from=("assignment", "geometric", "search"), learned=True),
    Method("maxprob", "MSDNet max-prob", "max class probability over a threshold (MSDNet)",
           MaxProbScorer, _SCORE_CALIBRATIONS, aliases=("msdnet",)),
    Method("entropy", "BranchyNet entropy", "1 - normalised entropy over a threshold "
           "(BranchyNet)", EntropyScorer, _SCORE_CALIBRATIONS, aliases=("branchynet",)),
    Method("patience", "PABEE patience", "leave once the answer held for t+1 exits (PABEE)",
           PatienceScorer, (*_SCORE_CALIBRATIONS, "patience"), aliases=("pabee",),
           select_from=("patience", "geometric", "search")),
    Method("static", "static (one exit)", "everyone at the most accurate single exit that "
           "fits", ConstantScorer, ("static",)),
    Method("oracle", "oracle (uses labels)", "label-aware upper bound under the budget "
           "(reported, never deployed)", None, (), deployable=False),
)}
_BY_ALIAS = {alias: m for m in METHODS.values() for alias in (m.name, *m.aliases)}


def get_method(name: str) -> Method:
    """The :class:`Method` for a name or alias (any case).

    Raises:
        EenetError: unknown name; the message lists every name and alias.

    Example:
        >>> get_method("PABEE").name
        'patience'
    """
    method = _BY_ALIAS.get(str(name).strip().lower())
    if method is None:
        names = ", ".join(f"{m.name} ({', '.join(m.aliases)})" if m.aliases else m.name
                          for m in METHODS.values())
        raise EenetError(f"unknown method {name!r}; choose one of: {names}")
    return method


_SCORER_CLASSES = {cls.name: cls for cls in (EENetScorer, MaxProbScorer, EntropyScorer,
                                              PatienceScorer, ConstantScorer)}


def scorer_from_state(state: dict[str, Any]) -> Scorer:
    """Rebuild any scorer from its ``to_state()``.

    Raises:
        EenetError: the state names no known scorer.
    """
    cls = _SCORER_CLASSES.get(state.get("scorer") if isinstance(state, dict) else None)
    if cls is None:
        raise EenetError("the policy's scorer state names no known scorer; the policy file is "
                         "damaged, fit it again")
    return cls.from_state(state)
