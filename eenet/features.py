"""Per-exit confidence features computed from class probabilities.

These are the confidence summaries ``a_k`` of EENet (Ilhan et al., "EENet:
Learning to Early Exit for Adaptive Inference", WACV 2024, Sec. 3.1) and the
scores of the classic baselines (MSDNet's max probability, BranchyNet's
entropy). Every function works on all exits at once:
``probs: [n_samples, n_exits, n_classes] -> [n_samples, n_exits]``.

Each function takes a NumPy array (float16, float32 or float64; the result is
float64) or a ``torch.Tensor`` (the result is a tensor on the same device,
float32 or wider). Large NumPy inputs are processed in blocks of samples, so
the working memory stays a small multiple of one block.
"""
from __future__ import annotations

import math
from typing import Callable, TypeVar, Union

import numpy as np
import torch

from eenet._validation import EenetError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
ArrayLike = Union[np.ndarray, torch.Tensor]

_BLOCK_ELEMENTS = 1 << 22  # ~4M probabilities (16 MiB in float32) per block
_PROB_TOLERANCE = 1e-3  # float16 rounding can push a probability a little past 1

__all__ = [
    "max_prob",
    "one_minus_entropy",
    "vote_ratio",
    "confidence_features",
    "top_probs",
    "margin",
    "agreement_features",
    "N_CONFIDENCE_FEATURES",
    "N_AGREEMENT_FEATURES",
]

#: Number of confidence summaries returned per exit by :func:`confidence_features`.
N_CONFIDENCE_FEATURES = 3
#: Number of summaries returned per exit by :func:`agreement_features`.
N_AGREEMENT_FEATURES = 4


# ---------------------------------------------------------------------------
# validation and dispatch
# ---------------------------------------------------------------------------
def _check_probs(probs: ArrayLike, name: str = "probs") -> ArrayLike:
    """Return ``probs`` as a 3-D float array/tensor after checking shape and range."""
    if isinstance(probs, torch.Tensor):
        if not probs.is_floating_point():
            raise EenetError(f"{name} must be a floating-point tensor of probabilities, "
                             f"got dtype {probs.dtype}")
        arr: ArrayLike = probs
    else:
        arr = np.asarray(probs)
        if not np.issubdtype(arr.dtype, np.floating):
            raise EenetError(f"{name} must be a floating-point array of probabilities, "
                             f"got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise EenetError(f"{name} must have shape [n_samples, n_exits, n_classes], got "
                         f"shape {tuple(arr.shape)}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise EenetError(f"{name} needs at least one exit and one class, got shape "
                         f"{tuple(arr.shape)}")
    if arr.shape[0] == 0:
        return arr
    values = arr.detach() if isinstance(arr, torch.Tensor) else arr
    lo, hi = float(values.min()), float(values.max())
    # NaN fails both comparisons, +-inf fails one of them.
    if not (lo >= -_PROB_TOLERANCE and hi <= 1 + _PROB_TOLERANCE):
        raise EenetError(f"{name} must hold finite probabilities in [0, 1], got values in "
                         f"[{lo:g}, {hi:g}]; pass softmax outputs, not logits")
    return arr


def _blockwise(probs: np.ndarray, fn: Callable[[np.ndarray], np.ndarray],
               width: int | None = None) -> np.ndarray:
    """Apply ``fn`` to blocks of samples of a [N, K, C] array and concatenate.

    ``fn`` maps a float32/float64 block [n, K, C] to [n, K] (or [n, K, width]).
    """
    n, k, c = probs.shape
    shape = (n, k) if width is None else (n, k, width)
    out = np.empty(shape, dtype=np.float64)
    rows = max(1, _BLOCK_ELEMENTS // max(1, k * c))
    for start in range(0, n, rows):
        block = probs[start:start + rows]
        if block.dtype == np.float16:
            block = block.astype(np.float32)
        out[start:start + rows] = fn(block)
    return out


def _torch_float(probs: torch.Tensor) -> torch.Tensor:
    return probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs


# ---------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------
def max_prob(probs: ArrayT) -> ArrayT:
    """Largest class probability of every exit (MSDNet's confidence score).

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.

    Returns:
        [n_samples, n_exits] ``max_c p_k,c``, in [0, 1].

    Raises:
        EenetError: ``probs`` is not 3-D or holds values outside [0, 1].

    Example:
        >>> import numpy as np
        >>> max_prob(np.array([[[0.2, 0.8], [0.5, 0.5]]], np.float32)).round(3)
        array([[0.8, 0.5]])
    """
    probs = _check_probs(probs)
    if isinstance(probs, torch.Tensor):
        return _torch_float(probs).amax(dim=2).clamp(0.0, 1.0)
    return _blockwise(probs, lambda b: np.clip(b.max(axis=2), 0.0, 1.0))


def _neg_entropy_ratio_np(block: np.ndarray) -> np.ndarray:
    """1 + sum_c p log p / log C for a NumPy block, with 0 log 0 = 0."""
    n_classes = block.shape[2]
    if n_classes == 1:
        return np.ones(block.shape[:2])
    p = np.clip(block, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    value = 1.0 + plogp.sum(axis=2, dtype=np.float64) / math.log(n_classes)
    return np.clip(value, 0.0, 1.0)


def one_minus_entropy(probs: ArrayT) -> ArrayT:
    """One minus the normalised entropy of every exit (BranchyNet's score, EENet's a_k,2).

    ``1 + sum_c p_k,c log p_k,c / log C`` with ``0 log 0 = 0``: 1 for a one-hot
    vector, 0 for the uniform one. With a single class it is 1.

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.

    Returns:
        [n_samples, n_exits] values in [0, 1].

    Raises:
        EenetError: ``probs`` is not 3-D or holds values outside [0, 1].

    Example:
        >>> import numpy as np
        >>> one_minus_entropy(np.array([[[1.0, 0.0], [0.5, 0.5]]])).round(6)
        array([[1., 0.]])
    """
    probs = _check_probs(probs)
    if isinstance(probs, torch.Tensor):
        p = _torch_float(probs).clamp(0.0, 1.0)
        if p.shape[2] == 1:
            return torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)
        # 0 log 0 = 0; the inner where keeps the gradient finite at p = 0 (xlogy's is not)
        positive = p > 0
        plogp = torch.where(positive, p * torch.log(torch.where(positive, p, 1.0)), 0.0)
        return (1.0 + plogp.sum(dim=2) / math.log(p.shape[2])).clamp(0.0, 1.0)
    return _blockwise(probs, _neg_entropy_ratio_np)


def _vote_from_predictions(pred: np.ndarray) -> np.ndarray:
    """Vote ratio from arg-max predictions [n, K] (NumPy)."""
    n_exits = pred.shape[1]
    # same[n, k', j] = exit k' predicts what exit j predicts     [n, K, K]
    same = pred[:, :, None] == pred[:, None, :]
    # agree[n, k, j] = #{k' <= k : pred_k' == pred_j}             [n, K, K]
    agree = np.cumsum(same, axis=1)
    # only exits j <= k may name the majority class at exit k
    allowed = np.tril(np.ones((n_exits, n_exits), dtype=bool))
    best = np.where(allowed[None], agree, 0).max(axis=2)
    return best / np.arange(1, n_exits + 1, dtype=np.float64)


def vote_ratio(probs: ArrayT) -> ArrayT:
    """Share of the exits so far that agree with their most common prediction.

    ``vote_k = (1 / (k + 1)) max_c #{k' <= k : argmax p_k' = c}`` (exits from 0;
    EENet's third confidence summary). Exit 0 always has vote 1. Ties between
    classes in an arg-max go to the lowest class index.

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.

    Returns:
        [n_samples, n_exits] values in [1 / (k + 1), 1].

    Raises:
        EenetError: ``probs`` is not 3-D or holds values outside [0, 1].

    Example:
        >>> import numpy as np
        >>> p = np.array([[[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]])
        >>> vote_ratio(p).round(3)
        array([[1.   , 0.5  , 0.667]])
    """
    probs = _check_probs(probs)
    if isinstance(probs, torch.Tensor):
        pred = probs.argmax(dim=2)
        n_exits = pred.shape[1]
        same = pred[:, :, None] == pred[:, None, :]  # [n, K, K]
        agree = same.to(torch.int64).cumsum(dim=1)  # [n, K, K]
        allowed = torch.ones(n_exits, n_exits, dtype=torch.bool, device=pred.device).tril()
        best = torch.where(allowed[None], agree, torch.zeros_like(agree)).amax(dim=2)
        dtype = torch.float32 if probs.dtype in (torch.float16, torch.bfloat16) else probs.dtype
        steps = torch.arange(1, n_exits + 1, device=pred.device, dtype=dtype)
        return best.to(dtype) / steps
    return _blockwise(probs, lambda b: _vote_from_predictions(b.argmax(axis=2)))


def confidence_features(probs: ArrayT) -> ArrayT:
    """EENet's confidence summaries ``a_k`` for every exit, stacked.

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.

    Returns:
        [n_samples, n_exits, 3]: ``[max_prob, one_minus_entropy, vote_ratio]``,
        each in [0, 1].

    Raises:
        EenetError: ``probs`` is not 3-D or holds values outside [0, 1].

    Example:
        >>> import numpy as np
        >>> confidence_features(np.full((2, 3, 4), 0.25)).shape
        (2, 3, 3)
    """
    probs = _check_probs(probs)
    if isinstance(probs, torch.Tensor):
        return torch.stack([max_prob(probs), one_minus_entropy(probs), vote_ratio(probs)],
                           dim=2)

    def block_features(b: np.ndarray) -> np.ndarray:
        return np.stack([np.clip(b.max(axis=2), 0.0, 1.0), _neg_entropy_ratio_np(b),
                         _vote_from_predictions(b.argmax(axis=2))], axis=2)

    return _blockwise(probs, block_features, width=N_CONFIDENCE_FEATURES)


def top_probs(probs: ArrayT, m: int) -> ArrayT:
    """The ``m`` largest class probabilities of every exit, sorted in decreasing order.

    A compact, class-agnostic stand-in for the full probability vector when
    there are many classes. With ``m >= n_classes`` the whole sorted vector is
    returned, padded with zeros up to ``m``.

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.
        m: how many probabilities to keep, at least 1.

    Returns:
        [n_samples, n_exits, m], decreasing along the last axis.

    Raises:
        EenetError: bad ``probs`` or ``m < 1``.

    Example:
        >>> import numpy as np
        >>> top_probs(np.array([[[0.1, 0.6, 0.3]]]), 2).round(3)
        array([[[0.6, 0.3]]])
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise EenetError(f"m must be a positive integer, got {m!r}")
    m = int(m)
    probs = _check_probs(probs)
    n_classes = probs.shape[2]
    keep = min(m, n_classes)
    if isinstance(probs, torch.Tensor):
        top = _torch_float(probs).topk(keep, dim=2, sorted=True).values
        if keep < m:
            top = torch.nn.functional.pad(top, (0, m - keep))
        return top.clamp(0.0, 1.0)

    def block_top(b: np.ndarray) -> np.ndarray:
        part = np.partition(b, n_classes - keep, axis=2)[:, :, n_classes - keep:]
        top = -np.sort(-part, axis=2)  # decreasing
        if keep < m:
            top = np.concatenate([top, np.zeros(top.shape[:2] + (m - keep,), top.dtype)],
                                 axis=2)
        return np.clip(top, 0.0, 1.0)

    return _blockwise(probs, block_top, width=m)


def margin(probs: ArrayT) -> ArrayT:
    """Gap between the largest and the second largest class probability of every exit.

    With a single class the margin is 1.

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.

    Returns:
        [n_samples, n_exits] values in [0, 1].

    Example:
        >>> import numpy as np
        >>> margin(np.array([[[0.1, 0.6, 0.3]]])).round(3)
        array([[0.3]])
    """
    probs = _check_probs(probs)
    if probs.shape[2] == 1:
        if isinstance(probs, torch.Tensor):
            return torch.ones(probs.shape[:2], dtype=_torch_float(probs).dtype,
                              device=probs.device)
        return np.ones(probs.shape[:2])
    if isinstance(probs, torch.Tensor):
        top = _torch_float(probs).topk(2, dim=2).values
        return (top[..., 0] - top[..., 1]).clamp(0.0, 1.0)

    def block_margin(b: np.ndarray) -> np.ndarray:
        top = np.partition(b, b.shape[2] - 2, axis=2)[:, :, -2:]
        return np.clip(top[..., 1] - top[..., 0], 0.0, 1.0)

    return _blockwise(probs, block_margin)


def _agreement_np(b: np.ndarray) -> np.ndarray:
    n, k, _ = b.shape
    pred = b.argmax(axis=2)  # [n, K]
    # at_pred[n, j, k] = p_j[argmax p_k]: what exit j gives exit k's prediction   [n, K, K]
    at_pred = np.take_along_axis(b, np.broadcast_to(pred[:, None, :], (n, k, k)), axis=2)
    own = np.diagonal(at_pred, axis1=1, axis2=2)  # [n, K] max prob
    out = np.empty((n, k, N_AGREEMENT_FEATURES), dtype=np.float64)
    top2 = np.sort(np.partition(b, max(b.shape[2] - 2, 0), axis=2)[:, :, -2:], axis=2)
    out[..., 0] = top2[..., -1] - top2[..., 0] if b.shape[2] > 1 else 1.0
    prev = np.concatenate([own[:, :1], np.diagonal(at_pred, offset=1, axis1=1, axis2=2)],
                          axis=1)  # p_{k-1}[pred_k]
    out[..., 1] = prev
    lower = np.triu(np.ones((k, k)), 1)  # lower[j, k] = 1 for j < k
    n_before = np.maximum(lower.sum(axis=0), 1.0)
    mean_before = (at_pred * lower[None]).sum(axis=1) / n_before
    mean_before[:, 0] = own[:, 0]
    out[..., 2] = mean_before
    agree = np.concatenate([np.ones((n, 1)), pred[:, 1:] == pred[:, :-1]], axis=1)
    out[..., 3] = agree
    return np.clip(out, 0.0, 1.0)


def agreement_features(probs: ArrayT) -> ArrayT:
    """How exit k's prediction fares at the earlier exits, and its margin.

    For every exit k (from 0), with ``y_k = argmax p_k``:
    ``[margin_k, p_{k-1}[y_k], mean_{j<k} p_j[y_k], 1[y_{k-1} = y_k]]``. At
    exit 0, which has no earlier exit, the second and third are its own max
    probability and the fourth is 1.

    Args:
        probs: [n_samples, n_exits, n_classes] class probabilities.

    Returns:
        [n_samples, n_exits, N_AGREEMENT_FEATURES], each in [0, 1].

    Example:
        >>> import numpy as np
        >>> p = np.array([[[0.7, 0.3], [0.4, 0.6]]])
        >>> agreement_features(p).round(3)
        array([[[0.4, 0.7, 0.7, 1. ],
                [0.2, 0.3, 0.3, 0. ]]])
    """
    probs = _check_probs(probs)
    if isinstance(probs, torch.Tensor):
        out = _agreement_np(_torch_float(probs).detach().cpu().numpy().astype(np.float64))
        return torch.from_numpy(out).to(device=probs.device, dtype=_torch_float(probs).dtype)
    return _blockwise(probs, _agreement_np, width=N_AGREEMENT_FEATURES)
