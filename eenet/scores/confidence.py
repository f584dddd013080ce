"""Scores that learn nothing: max probability, entropy, patience, and a constant.

========== =============================== =========================================
scorer     score at exit k                 where from
========== =============================== =========================================
maxprob    ``max_c p_k,c``                 MSDNet (Huang et al., ICLR 2018)
entropy    ``1 - H(p_k) / log C``          BranchyNet (Teerapittayanon et al., ICPR 2016)
patience   ``run_k / n_exits``             PABEE (Zhou et al., NeurIPS 2020)
constant   ``0``                           the ``static`` policy (thresholds alone decide)
========== =============================== =========================================

``run_k`` is the number of consecutive exits up to k that predict the same
class, so a uniform threshold ``(t + 0.5) / n_exits`` on the patience score is
PABEE's rule with patience t (leave once the answer has held for t + 1 exits).
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from eenet._validation import EenetError
from eenet.scores.features import max_prob, one_minus_entropy, probabilities

__all__ = ["ConstantScorer", "EntropyScorer", "MaxProbScorer", "PatienceScorer"]


class _FixedScorer:
    """Shared plumbing of the scorers that learn nothing."""

    name: ClassVar[str] = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def fit(self, cache: Any, costs: np.ndarray, budget: float, *, seed: int = 0,
            verbose: bool = False) -> "_FixedScorer":
        """Nothing to learn; returns self."""
        return self

    def start(self, batch: int, n_classes: int, device: torch.device | str = "cpu"
              ) -> dict[str, Tensor]:
        """No history needed."""
        return {}

    def exit_distribution(self) -> None:
        """Fixed scores come with no learned exit distribution."""
        return None

    def to_state(self) -> dict[str, Any]:
        """``{"method": name}``: nothing else to keep."""
        return {"scorer": self.name}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_FixedScorer":
        """Rebuild from :meth:`to_state`.

        Raises:
            EenetError: the state belongs to another scorer.
        """
        got = state.get("scorer") if isinstance(state, dict) else type(state).__name__
        if got != cls.name:
            raise EenetError(f"scorer state is for {got!r}, not {cls.name!r}; the policy file "
                             f"is damaged, fit it again")
        return cls()


class MaxProbScorer(_FixedScorer):
    """MSDNet's confidence: the largest class probability of each exit.

    Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
    Classification", ICLR 2018.

    Example:
        >>> s = MaxProbScorer()
        >>> round(float(s.score_exit(0, torch.tensor([[0.0, 2.0]]), s.start(1, 2))), 4)
        0.8808
    """

    name: ClassVar[str] = "maxprob"

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's score ``[batch]`` from its logits ``[batch, n_classes]``."""
        return max_prob(probabilities(logits))


class EntropyScorer(_FixedScorer):
    """BranchyNet's confidence: one minus the normalised entropy, ``1 - H(p)/log C``.

    Teerapittayanon et al., "BranchyNet: Fast Inference via Early Exiting from
    Deep Neural Networks", ICPR 2016.
    """

    name: ClassVar[str] = "entropy"

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's score ``[batch]`` from its logits ``[batch, n_classes]``."""
        return one_minus_entropy(probabilities(logits))


class PatienceScorer(_FixedScorer):
    """PABEE's patience as a score: the run of identical arg-max answers ending at exit k,
    divided by ``n_exits`` (a score in (0, 1]).

    Zhou et al., "BERT Loses Patience: Fast and Robust Inference with Early
    Exit", NeurIPS 2020. The run needs the earlier exits' answers, kept in
    the state.
    """

    name: ClassVar[str] = "patience"

    def __init__(self, n_exits: int | None = None) -> None:
        self.n_exits = n_exits

    def fit(self, cache: Any, costs: np.ndarray, budget: float, *, seed: int = 0,
            verbose: bool = False) -> "PatienceScorer":
        """Record the exit count that normalises the score; returns self."""
        self.n_exits = int(cache.n_exits)
        return self

    def start(self, batch: int, n_classes: int, device: torch.device | str = "cpu"
              ) -> dict[str, Tensor]:
        """The earlier exits' answers and the current run, per sample."""
        return {"pred": torch.full((batch,), -1, dtype=torch.long, device=device),
                "run": torch.zeros(batch, dtype=torch.float32, device=device)}

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Run length of exit k's answer over ``n_exits``, ``[batch]``."""
        if self.n_exits is None:
            raise EenetError("PatienceScorer needs fit() (or n_exits) before scoring")
        pred = logits.argmax(dim=1)
        run = state["run"] * (pred == state["pred"]).float() + 1.0
        state["pred"], state["run"] = pred, run
        return run / self.n_exits

    def to_state(self) -> dict[str, Any]:
        return {"scorer": self.name, "n_exits": self.n_exits}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "PatienceScorer":
        super().from_state(state)
        return cls(state.get("n_exits"))


class ConstantScorer(_FixedScorer):
    """Scores every exit 0: the thresholds alone decide (the ``static`` policy)."""

    name: ClassVar[str] = "constant"

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Zeros ``[batch]``."""
        return logits.new_zeros(logits.shape[0], dtype=torch.float32)

