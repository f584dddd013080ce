"""Per-exit features, computed exit by exit from the outputs of exits 0..k only.

Every function here works on torch tensors of ONE exit for a batch of samples,
``logits: [batch, n_classes]``, plus a small running *history* of the earlier
exits (a dict of tensors whose first dimension is the batch). The same code
scores a whole exit cache (blocks of samples, exit after exit) and the samples
still running inside :mod:`eenet.runtime`, so a simulated policy and a served
one compute the same numbers. A runtime drops the samples that left by
indexing every history tensor with the same rows (:func:`select_rows`).

The summaries are EENet's confidence features ``a_k`` (Ilhan et al., "EENet:
Learning to Early Exit for Adaptive Inference", WACV 2024, Sec. 3.1: max
probability, one minus the normalised entropy, the vote ratio), the scores of
the classic baselines (MSDNet's max probability, BranchyNet's entropy, PABEE's
run length) and eenet's agreement features (how the earlier exits rate exit
k's answer).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "History",
    "N_AGREEMENT_FEATURES",
    "N_CONFIDENCE_FEATURES",
    "advance_history",
    "max_prob",
    "new_history",
    "one_minus_entropy",
    "probabilities",
    "select_rows",
    "top_probs",
]

#: What later exits need to know about the earlier ones, one row per sample.
History = dict[str, Tensor]

#: Confidence summaries per exit: max probability, 1 - normalised entropy, vote ratio.
N_CONFIDENCE_FEATURES = 3
#: Agreement summaries per exit: margin, previous exit's probability of this answer,
#: the earlier exits' mean probability of it, agreement with the previous exit.
N_AGREEMENT_FEATURES = 4


def probabilities(logits: Tensor) -> Tensor:
    """Softmax of one exit's logits (or log-probabilities), float32 ``[batch, n_classes]``."""
    return torch.softmax(logits.float(), dim=1)


def max_prob(p: Tensor) -> Tensor:
    """Largest class probability, ``[batch]`` in [0, 1] (MSDNet's confidence).

    Example:
        >>> max_prob(torch.tensor([[0.2, 0.8], [0.5, 0.5]])).tolist()
        [0.800000011920929, 0.5]
    """
    return p.amax(dim=1)


def one_minus_entropy(p: Tensor) -> Tensor:
    """``1 + sum_c p_c log p_c / log C`` with ``0 log 0 = 0``, ``[batch]`` in [0, 1].

    1 for a one-hot vector, 0 for the uniform one (BranchyNet's score, EENet's
    second confidence summary).

    Example:
        >>> one_minus_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist()
        [1.0, 0.0]
    """
    n_classes = p.shape[1]
    entropy = torch.special.entr(p).sum(dim=1)  # entr(0) = 0
    return (1.0 - entropy / math.log(n_classes)).clamp(0.0, 1.0)


def top_probs(p: Tensor, m: int) -> Tensor:
    """The ``m`` largest probabilities in decreasing order, zero-padded to ``m``: ``[batch, m]``.

    A compact, class-agnostic stand-in for the probability vector when there
    are many classes.
    """
    keep = min(m, p.shape[1])
    top = p.topk(keep, dim=1, sorted=True).values
    if keep < m:
        top = torch.nn.functional.pad(top, (0, m - keep))
    return top


def new_history(batch: int, n_classes: int, device: torch.device | str = "cpu", *,
                probs: bool = True) -> History:
    """An empty history for ``batch`` samples that have seen no exit yet.

    Args:
        batch: number of samples.
        n_classes: classes per exit.
        device: where the tensors live.
        probs: keep the earlier exits' probabilities (needed by the agreement
            features; the run length and vote ratio need only predictions).
    """
    hist: History = {
        "pred": torch.full((batch,), -1, dtype=torch.long, device=device),
        "run": torch.zeros(batch, dtype=torch.float32, device=device),
        "votes": torch.zeros(batch, n_classes, dtype=torch.float32, device=device),
    }
    if probs:
        hist["prev_probs"] = torch.zeros(batch, n_classes, dtype=torch.float32, device=device)
        hist["sum_probs"] = torch.zeros(batch, n_classes, dtype=torch.float32, device=device)
    return hist


def advance_history(hist: History, k: int, p: Tensor) -> dict[str, Tensor]:
    """Take exit ``k``'s probabilities into the history; return its history features.

    Exits are numbered from 0 and must come in order. Returns, each ``[batch]``:

    - ``pred``: arg-max class of exit k (ties go to the lowest index);
    - ``run``: how many consecutive exits up to k predict the same class
      (PABEE's patience counter; 1 at exit 0);
    - ``vote``: ``(1 / (k + 1)) max_c #{k' <= k : argmax p_k' = c}`` (EENet);
    - and, when the history keeps probabilities, ``prev_at_pred`` (the
      previous exit's probability of exit k's answer), ``mean_at_pred`` (the
      mean of the earlier exits' probabilities of it) and ``agree`` (1 when
      the previous exit gave the same answer); at exit 0, which has no
      earlier exit, the first two are its own max probability and ``agree``
      is 1.
    """
    pred = p.argmax(dim=1)
    rows = torch.arange(p.shape[0], device=p.device)
    same = (pred == hist["pred"]).float()
    run = hist["run"] * same + 1.0
    votes = hist["votes"]
    votes[rows, pred] += 1.0
    out = {"pred": pred, "run": run, "vote": votes.amax(dim=1) / (k + 1)}
    if "prev_probs" in hist:
        own = p[rows, pred]
        if k == 0:
            out.update(prev_at_pred=own, mean_at_pred=own, agree=torch.ones_like(own))
        else:
            out.update(prev_at_pred=hist["prev_probs"][rows, pred],
                       mean_at_pred=hist["sum_probs"][rows, pred] / k, agree=same)
        hist["prev_probs"] = p
        hist["sum_probs"] = hist["sum_probs"] + p
    hist["pred"], hist["run"] = pred, run
    return out


def select_rows(state: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """Keep only ``rows`` (indices or a boolean mask) of every tensor in ``state``."""
    return {name: value[rows] for name, value in state.items()}
