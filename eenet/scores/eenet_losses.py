"""The EENet training losses, as pure torch functions.

Ilhan et al., "EENet: Learning to Early Exit for Adaptive Inference",
WACV 2024, Sec. 3.2. Notation (exits numbered from 0): ``N`` samples
(n_samples), ``K`` exits (n_exits), exit costs ``c_k``, budget ``B``,
correctness targets ``q*_n,k`` (1 when exit k's arg-max is the label),
scores ``q_n,k`` and the soft assignment ``r_n,k`` (each row sums to 1).

Every function is differentiable where training needs it and free of NaN
for any finite input, including assignments with exact zeros and samples
that no exit gets right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eenet._validation import EenetError

__all__ = [
    "SCORE_TARGETS",
    "score_targets",
    "assignment_targets",
    "assignment_loss",
    "budget_loss",
    "scoring_weights",
    "scoring_loss",
    "loss_terms",
    "total_loss",
]

_DENOMINATOR_FLOOR = 1e-12

#: Scoring targets :func:`score_targets` knows.
SCORE_TARGETS: tuple[str, ...] = ("correct", "no_regret", "no_regret_last")


def _check_2d(name: str, x: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(x, Tensor):
        raise EenetError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise EenetError(f"{name} must have shape [n_samples, n_exits], got "
                         f"{tuple(x.shape)}")
    if like is not None and x.shape != like.shape:
        raise EenetError(f"{name} has shape {tuple(x.shape)} but must match "
                         f"{tuple(like.shape)}")


def score_targets(correct: Tensor, kind: str = "correct", *,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Targets ``q*`` of the scoring heads.

    - ``"correct"`` (the paper): ``q*_n,k = 1[exit k is right]``.
    - ``"no_regret"``: ``q*_n,k = 0`` only when exit k is wrong and some later
      exit is right; leaving at k then loses nothing that going on could win.
      A sample every exit gets wrong counts as ready everywhere (no exit can
      save it, so it should leave at the cheapest), and one that exit k gets
      right is ready at k whatever later exits do.
    - ``"no_regret_last"``: ``q*_n,k = 0`` only when exit k is wrong and the
      last exit is right.

    The last exit's target is its correctness under every kind (the policy
    never thresholds it; the score is kept for completeness).

    Args:
        correct: [n_samples, n_exits] bool (or 0/1) correctness.
        kind: one of :data:`SCORE_TARGETS`.
        dtype: float dtype of the result (default float32).

    Returns:
        [n_samples, n_exits] targets in {0, 1}.

    Example:
        >>> import torch
        >>> ok = torch.tensor([[False, True, False], [False, False, False]])
        >>> score_targets(ok, "no_regret")
        tensor([[0., 1., 0.],
                [1., 1., 0.]])
    """
    _check_2d("correct", correct)
    if kind not in SCORE_TARGETS:
        raise EenetError(f"unknown score target {kind!r}; choose one of: "
                         f"{', '.join(SCORE_TARGETS)}")
    dtype = torch.float32 if dtype is None else dtype
    ok = correct != 0
    if kind == "correct" or ok.shape[1] < 2:
        return ok.to(dtype)
    if kind == "no_regret":
        # later_right[n, k] = some exit after k is right
        flipped = ok.flip(1).to(torch.int64).cumsum(dim=1).flip(1)  # right at k or later
        later_right = torch.cat([flipped[:, 1:] > 0, torch.zeros_like(ok[:, :1])], dim=1)
    else:
        later_right = ok[:, -1:].expand_as(ok)
    target = ok | ~later_right
    target[:, -1] = ok[:, -1]
    return target.to(dtype)


def assignment_targets(correct: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Target assignment ``r*``: share the sample equally among its correct exits.

    ``r*_n,k = q*_n,k / sum_k' q*_n,k'`` when some exit is correct, and
    ``r*_n,k = 1 / K`` for every exit when none is (EENet Sec. 3.2). Every row
    sums to 1.

    Args:
        correct: [n_samples, n_exits] bool (or 0/1) correctness ``q*``.
        dtype: float dtype of the result; by default that of ``correct`` when it
            is floating, else float32.

    Returns:
        [n_samples, n_exits] targets.

    Example:
        >>> import torch
        >>> assignment_targets(torch.tensor([[True, False, True], [False, False, False]]))
        tensor([[0.5000, 0.0000, 0.5000],
                [0.3333, 0.3333, 0.3333]])
    """
    _check_2d("correct", correct)
    if dtype is None:
        dtype = correct.dtype if correct.is_floating_point() else torch.float32
    q = (correct != 0).to(dtype)
    n_correct = q.sum(dim=1, keepdim=True)  # [N, 1]
    uniform = torch.full_like(q, 1.0 / q.shape[1])
    return torch.where(n_correct > 0, q / n_correct.clamp_min(1.0), uniform)


def assignment_loss(log_r: Tensor, r_star: Tensor) -> Tensor:
    """Cross-entropy between the target and the learned assignment.

    ``L_ce = -(1 / (N K)) sum_n sum_k r*_n,k log r_n,k`` (EENet Eq. for L_ce).
    Terms with ``r*_n,k = 0`` contribute exactly 0 even where ``log r`` is -inf.

    Args:
        log_r: [n_samples, n_exits] log of the assignment (``log_softmax`` of the
            assignment logits, which is stable).
        r_star: [n_samples, n_exits] targets from :func:`assignment_targets`.

    Returns:
        Scalar loss.
    """
    _check_2d("log_r", log_r)
    _check_2d("r_star", r_star, log_r)
    n, k = log_r.shape
    terms = torch.where(r_star > 0, r_star * log_r, torch.zeros_like(log_r))
    return -terms.sum() / (n * k)


def budget_loss(r: Tensor, costs: Tensor, budget: float | Tensor) -> Tensor:
    """Relative gap between the budget and the expected cost of the assignment.

    ``L_budget = | B - (1 / N) sum_n sum_k r_n,k c_k | / B`` (EENet Sec. 3.2).

    Args:
        r: [n_samples, n_exits] soft assignment (rows sum to 1).
        costs: [n_exits] cumulative cost of each exit.
        budget: the average budget ``B`` > 0, in the unit of ``costs``.

    Returns:
        Scalar loss; 0 when the expected cost equals ``B``.

    Raises:
        EenetError: ``budget`` is not positive or ``costs`` has the wrong length.
    """
    _check_2d("r", r)
    if costs.ndim != 1 or costs.shape[0] != r.shape[1]:
        raise EenetError(f"costs must have shape [{r.shape[1]}] (one per exit), got "
                         f"{tuple(costs.shape)}")
    b = float(budget)
    if not b > 0:
        raise EenetError(f"budget must be positive, got {b}")
    expected_cost = (r * costs.to(r.dtype)).sum(dim=1).mean()
    return (b - expected_cost).abs() / b


def scoring_weights(r: Tensor) -> Tensor:
    """Per-exit sample weights of the scoring loss: who is still running at exit k.

    ``w_n,k = (1 - sum_{k'<k} r_n,k') / sum_n' (1 - sum_{k'<k} r_n',k')``
    (EENet Sec. 3.2). The survival mass is clamped at 0 against rounding; an
    exit where no sample survives (all mass on earlier exits) falls back to
    uniform weights ``1 / N``. Every column sums to 1.

    Args:
        r: [n_samples, n_exits] soft assignment.

    Returns:
        [n_samples, n_exits] weights, differentiable in ``r``.
    """
    _check_2d("r", r)
    n = r.shape[0]
    # survive[n, k] = 1 - sum_{k' < k} r_n,k'                          [N, K]
    before = torch.cumsum(r, dim=1) - r
    survive = (1.0 - before).clamp_min(0.0)
    total = survive.sum(dim=0, keepdim=True)  # [1, K]
    uniform = torch.full_like(survive, 1.0 / max(n, 1))
    return torch.where(total > _DENOMINATOR_FLOOR,
                       survive / total.clamp_min(_DENOMINATOR_FLOOR), uniform)


def scoring_loss(q_logit: Tensor, q_star: Tensor, r: Tensor, *,
                 detach_weights: bool = True) -> Tensor:
    """Survival-weighted binary cross-entropy of the exit scores.

    ``L_g = (1 / K) sum_k sum_n w_n,k BCE(q_n,k, q*_n,k)`` with the weights of
    :func:`scoring_weights` (EENet Sec. 3.2): a sample that is likely to have
    left before exit k matters little for exit k's score. The scores enter as
    logits, ``q = sigmoid(q_logit)``, and the BCE is computed with
    ``binary_cross_entropy_with_logits``, which stays finite for any logit.

    Args:
        q_logit: [n_samples, n_exits] score logits.
        q_star: [n_samples, n_exits] correctness targets in [0, 1].
        r: [n_samples, n_exits] soft assignment.
        detach_weights: compute the weights from ``r.detach()`` (default). The
            weights say which samples the scores must be good on; letting the
            gradient flow into ``r`` instead rewards the assignment for sending
            hard-to-score samples away from an exit, which is not what the
            assignment is for.

    Returns:
        Scalar loss.
    """
    _check_2d("q_logit", q_logit)
    _check_2d("q_star", q_star, q_logit)
    _check_2d("r", r, q_logit)
    w = scoring_weights(r.detach() if detach_weights else r)
    bce = F.binary_cross_entropy_with_logits(q_logit, q_star.to(q_logit.dtype),
                                             reduction="none")  # [N, K]
    return (w * bce).sum() / q_logit.shape[1]


def loss_terms(q_logit: Tensor, z: Tensor, q_star: Tensor, r_star: Tensor, costs: Tensor,
               budget: float | Tensor, *, detach_weights: bool = True) -> dict[str, Tensor]:
    """The three terms of EENet's objective, each a scalar with its gradient.

    What training minimises (:mod:`eenet.scores.eenet`), as
    ``scoring + alpha_ce * assignment + alpha_budget * budget``.

    Args:
        q_logit: [n_samples, n_exits] score logits (``q = sigmoid(q_logit)``).
        z: [n_samples, n_exits] unbounded assignment logits (``r = softmax(z)``).
        q_star: [n_samples, n_exits] scoring targets (:func:`score_targets`).
        r_star: [n_samples, n_exits] assignment targets (:func:`assignment_targets`).
        costs: [n_exits] cumulative exit costs.
        budget: average budget ``B`` > 0, in the unit of ``costs``.
        detach_weights: see :func:`scoring_loss`.

    Returns:
        ``{"scoring": L_g, "assignment": L_ce, "budget": L_budget}``.
    """
    _check_2d("z", z, q_logit)
    log_r = F.log_softmax(z, dim=1)
    r = log_r.exp()
    return {"scoring": scoring_loss(q_logit, q_star, r, detach_weights=detach_weights),
            "assignment": assignment_loss(log_r, r_star),
            "budget": budget_loss(r, costs, budget)}


def total_loss(q_logit: Tensor, z: Tensor, correct: Tensor, costs: Tensor,
               budget: float | Tensor, *, alpha_ce: float = 1.0,
               alpha_budget: float = 1.0, detach_weights: bool = True,
               target: str = "correct") -> tuple[Tensor, dict[str, Tensor]]:
    """EENet's objective ``L = L_g + alpha_ce L_ce + alpha_budget L_budget``.

    Args:
        q_logit: [n_samples, n_exits] score logits (``q = sigmoid(q_logit)``).
        z: [n_samples, n_exits] unbounded assignment logits
            (``r = softmax(z, dim=1)``).
        correct: [n_samples, n_exits] bool correctness.
        costs: [n_exits] cumulative exit costs.
        budget: average budget ``B`` > 0, in the unit of ``costs``.
        alpha_ce: weight of the assignment loss.
        alpha_budget: weight of the budget loss.
        detach_weights: see :func:`scoring_loss`.
        target: the scoring target (:func:`score_targets`; the paper's is
            ``"correct"``).

    Returns:
        ``(total, parts)``: the scalar total (with gradient) and a dict of
        detached scalars ``scoring``, ``assignment``, ``budget``, ``total``.
    """
    q_star = score_targets(correct, target, dtype=q_logit.dtype)
    r_star = assignment_targets(correct, dtype=q_logit.dtype)
    terms = loss_terms(q_logit, z, q_star, r_star, costs, budget,
                       detach_weights=detach_weights)
    total = terms["scoring"] + alpha_ce * terms["assignment"] + alpha_budget * terms["budget"]
    parts = {key: value.detach() for key, value in terms.items()}
    parts["total"] = total.detach()
    return total, parts
