"""EENet's learned exit scores and soft exit assignment.

Ilhan et al., "EENet: Learning to Early Exit for Adaptive Inference",
WACV 2024, Sec. 3. For every exit k (numbered from 0) two small MLPs read the
per-exit features

    x_k = [p_k (class probabilities), a_k (max prob, 1 - normalised entropy,
           vote ratio), q_0 .. q_{k-1} (scores of the earlier exits)]

- the scoring head g_k gives ``q_k = sigmoid(g_k(x_k))``, the predicted
  probability that exit k is correct (the paper's target, ``target="correct"``)
  or, by default, that leaving at k loses nothing a later exit would win
  (``target="no_regret"``, :func:`eenet.losses.score_targets`);
- the assignment head h_k gives an unbounded logit ``z_k``;
  ``r = softmax_k(z)`` is the soft assignment of the sample to the exits.

They are trained with ``L_g + alpha_ce L_ce + alpha_budget L_budget``
(:mod:`eenet.losses`). The mean assignment on the fit data, ``rbar``, is the
learned exit distribution; turning ``rbar`` and the scores into thresholds is
the job of :mod:`eenet.calibrate`.

Defaults that depart from the paper, chosen on held-out validation data
(benchmarks/RESULTS.md): the no-regret scoring target and the agreement
features (:func:`eenet.features.agreement_features`); ``target="correct",
features="paper"`` restores the published recipe.

Departures from the authors' released code, each deliberate:

- the assignment is a softmax over *unbounded* logits, not over sigmoid
  outputs (which confine every r_k to a narrow band, so low budgets are
  unreachable);
- gradients are zeroed every step, the best weights are deep-copied, and
  every loss is NaN-free for zeros, samples no exit gets right and one class;
- the scores fed forward to later exits and the scoring-loss weights are
  detached, so each score is trained only to predict its own exit's
  correctness and the assignment only by its own two terms;
- costs and budget are divided by the last exit's cost, so the learning rate
  does not depend on the cost unit;
- training stops early on the loss of a stratified, seeded held-out part of
  the data given to :meth:`EENetScorer.fit`.

Probability features: the paper feeds the full vector p_k. That is the
default up to ``FULL_PROBS_MAX_CLASSES`` classes; above it (ImageNet's 1000,
say) the heads read the ``top_m`` largest probabilities in decreasing order,
which keeps the heads small and class-agnostic and avoids fitting a weight
per class from a validation split with a handful of samples per class.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from eenet._validation import EenetError, check_budget, check_choice, check_costs
from eenet.features import N_AGREEMENT_FEATURES, N_CONFIDENCE_FEATURES, _check_probs, \
    agreement_features, confidence_features, top_probs
from eenet.losses import SCORE_TARGETS, assignment_loss, assignment_targets, budget_loss, \
    score_targets, scoring_loss

__all__ = ["EENetScorer", "fit_eenet", "FULL_PROBS_MAX_CLASSES"]

logger = logging.getLogger(__name__)

ProbFeatures = Literal["auto", "full", "top"]

#: Up to this many classes ``prob_features="auto"`` feeds the full probability vector.
FULL_PROBS_MAX_CLASSES = 128
_STATE_VERSION = 2
#: Hyperparameters added in state version 2, with the values version-1 states were fitted with.
_V1_HPARAMS = {"target": "correct", "features": "paper"}
_PREDICT_ROWS = 16384  # samples per block at inference


# ---------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------
class _EENetHeads(nn.Module):
    """Scoring heads g_0..g_{K-1} and assignment heads h_0..h_{K-1}, stored stacked.

    Head k (either kind) is an MLP with ``depth`` hidden ReLU layers of width
    ``hidden`` reading ``in_dim + k`` inputs: the static per-exit features and
    the (detached) scores of the k earlier exits. The weights of all exits and
    of both kinds are kept in a few stacked tensors so one batched matrix
    product serves every exit's static inputs; mathematically this is exactly
    2K independent MLPs (the blocks never mix), just with far fewer kernel
    launches per step.

    Parameters (W1 = 2 * hidden, or 2 when ``depth == 0``):
        in_w [K, in_dim, W1], in_b [K, W1]: first layer, static inputs;
        q_w [K, K - 1, W1]: first layer, scores of earlier exits (exit k uses
            the first k rows);
        hid_w [K, 2, depth - 1, hidden, hidden], hid_b [K, 2, depth - 1, hidden]:
            further hidden layers (index 0 of the second axis: scoring head,
            1: assignment head);
        out_w [K, 2, hidden], out_b [K, 2]: output layers (absent when depth == 0).
    """

    def __init__(self, n_exits: int, in_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.n_exits, self.in_dim, self.hidden, self.depth = n_exits, in_dim, hidden, depth
        first = 2 * hidden if depth > 0 else 2
        self.in_w = nn.Parameter(torch.empty(n_exits, in_dim, first))
        self.in_b = nn.Parameter(torch.empty(n_exits, first))
        self.q_w = nn.Parameter(torch.empty(n_exits, max(n_exits - 1, 0), first))
        n_extra = max(depth - 1, 0)
        self.hid_w = nn.Parameter(torch.empty(n_exits, 2, n_extra, hidden, hidden))
        self.hid_b = nn.Parameter(torch.empty(n_exits, 2, n_extra, hidden))
        n_out = 1 if depth > 0 else 0
        self.out_w = nn.Parameter(torch.empty(n_exits, 2, hidden * n_out))
        self.out_b = nn.Parameter(torch.empty(n_exits, 2 * n_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per head."""
        for k in range(self.n_exits):
            bound = 1.0 / math.sqrt(self.in_dim + k)
            for tensor in (self.in_w[k], self.in_b[k], self.q_w[k]):
                tensor.uniform_(-bound, bound)
        bound = 1.0 / math.sqrt(self.hidden)
        for tensor in (self.hid_w, self.hid_b, self.out_w, self.out_b):
            tensor.uniform_(-bound, bound)

    def forward(self, static: Tensor) -> tuple[Tensor, Tensor]:
        """Score logits and assignment logits.

        Args:
            static: [n_samples, n_exits, in_dim] probability and confidence features.

        Returns:
            ``(q_logit, z)``, each [n_samples, n_exits].
        """
        n = static.shape[0]
        # static part of every exit's first layer at once: [K, N, in_dim] @ [K, in_dim, W1]
        pre = torch.baddbmm(self.in_b[:, None, :], static.transpose(0, 1), self.in_w)
        # unbind, not pre[k]: indexing would allocate and fill a [K, N, W1] gradient per exit
        pre_k = pre.unbind(0)
        q_w_k = self.q_w.unbind(0)
        outputs: list[Tensor] = []
        earlier = static.new_zeros(n, 0)  # sigmoid(q_0..q_{k-1}), detached, [N, k]
        for k in range(self.n_exits):
            h = pre_k[k]  # [N, W1]
            if k > 0:
                h = h + earlier @ q_w_k[k][:k]
            if self.depth > 0:
                h = torch.relu(h).view(n, 2, self.hidden)  # [N, 2 (g, h), hidden]
                for layer in range(self.depth - 1):
                    h = torch.relu(torch.einsum("nai,aij->naj", h, self.hid_w[k, :, layer])
                                   + self.hid_b[k, :, layer])
                h = (h * self.out_w[k]).sum(dim=2) + self.out_b[k]  # [N, 2]
            outputs.append(h)  # [N, 2]: score logit, assignment logit
            if k + 1 < self.n_exits:
                earlier = torch.cat([earlier, torch.sigmoid(h[:, :1]).detach()], dim=1)
        both = torch.stack(outputs, dim=1)  # [N, K, 2]
        return both[..., 0], both[..., 1]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _local_torch_state(seed: int, device: torch.device,
                       num_threads: int | None) -> Iterator[None]:
    """Seed torch inside the block; restore the global RNG state and thread count after."""
    accelerator = device.type if device.type != "cpu" else "cuda"
    devices = [device] if device.type != "cpu" else []
    old_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=devices, device_type=accelerator):
        torch.manual_seed(seed)
        try:
            if num_threads is not None and num_threads != old_threads:
                torch.set_num_threads(num_threads)
            yield
        finally:
            if torch.get_num_threads() != old_threads:
                torch.set_num_threads(old_threads)


def _stratified_holdout(labels: np.ndarray, fraction: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (train, holdout) indices, stratified by label.

    The holdout has ``round(fraction * n_samples)`` samples, and every class
    gives it about ``fraction`` of its members (within a sample or so). (Each
    sample gets a within-class quantile, its random rank in its class plus a
    uniform jitter over the class size; the lowest quantiles are held out. A
    per-class ``round`` would hold out nothing from classes of one or two
    samples, and nothing at all with many small classes.) The holdout is
    empty when ``fraction`` is 0 or one side would be empty.

    Returns:
        ``(train_idx, holdout_idx)``, sorted int64 arrays.
    """
    n = labels.size
    everyone = np.arange(n)
    n_held = int(round(fraction * n))
    if n_held == 0 or n_held >= n:
        return everyone, everyone[:0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    by_class = order[np.argsort(labels[order], kind="stable")]  # grouped, shuffled within
    classes, starts, sizes = np.unique(labels[by_class], return_index=True,
                                       return_counts=True)
    rank = np.arange(n) - np.repeat(starts, sizes)
    quantile = (rank + rng.random(n)) / np.repeat(sizes, sizes)
    held = np.sort(by_class[np.argsort(quantile, kind="stable")[:n_held]])
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def _targets(correct: Tensor, target: str = "correct") -> Tensor:
    """Training targets [n_samples, 2, n_exits]: ``q*`` (index 0) and ``r*`` (index 1)."""
    q_star = score_targets(correct, target, dtype=torch.float32)
    return torch.stack([q_star, assignment_targets(correct, dtype=torch.float32)], dim=1)


def _adam(net: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, fused (one kernel for all parameters) where the build supports it, else foreach."""
    try:
        return torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)


def _check_labels(labels: np.ndarray, n_samples: int, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n_samples,):
        raise EenetError(f"labels must have shape ({n_samples},) to match probs, got "
                         f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise EenetError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise EenetError(f"labels must lie in [0, {n_classes}) for {n_classes} classes, got "
                         f"range [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64, copy=False)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EenetError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _non_negative(name: str, value: Any, *, positive: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise EenetError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out < 0 or (positive and out == 0):
        allowed = "a positive" if positive else "a non-negative"
        raise EenetError(f"{name} must be {allowed} finite number, got {value!r}")
    return out


# ---------------------------------------------------------------------------
# the scorer
# ---------------------------------------------------------------------------
class EENetScorer:
    """EENet's learned exit scores and exit distribution for a frozen multi-exit model.

    Implements Ilhan et al., WACV 2024, Sec. 3 on cached exit probabilities:
    per-exit scoring heads (the scores ``q``) and assignment heads (the soft
    assignment ``r`` with unbounded logits), trained with Adam on
    ``L_g + alpha_ce L_ce + alpha_budget L_budget`` and early-stopped on a
    held-out part of the fit data.

    Args:
        hidden: width of every hidden layer.
        depth: number of hidden layers per head (0 gives a linear head).
        epochs: maximum number of passes over the training part.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        alpha_ce: weight of the assignment loss ``L_ce``.
        alpha_budget: weight of the budget loss ``L_budget``.
        batch_size: samples per step; ``None`` trains full batch. Mini-batches
            of 512 reach the same holdout loss in far fewer passes than full
            batch (N = 10,000, K = 4, C = 100: about 40 epochs against 200+).
        holdout: share of the fit data held out (stratified by label, seeded)
            for early stopping, in [0, 1); 0 stops on the training loss.
        patience: epochs without a holdout improvement before stopping.
        tol: relative holdout-loss decrease that counts as an improvement
            (resets the patience and replaces the kept best weights).
        alternate: alternate steps between the scoring term (scoring heads)
            and the assignment terms (assignment heads), as the paper does,
            instead of one step on the summed loss. Because the weights and
            the fed-forward scores are detached, each term only reaches its
            own heads either way; alternating halves each group's updates.
        prob_features: ``"full"`` (the probability vector, as in the paper),
            ``"top"`` (the ``top_m`` largest probabilities, sorted) or
            ``"auto"`` (full up to ``FULL_PROBS_MAX_CLASSES`` classes).
        top_m: number of probabilities kept by ``"top"``.
        detach_weights: detach the scoring-loss weights from the assignment
            (see :func:`eenet.losses.scoring_loss`).
        target: the scoring heads' target (:func:`eenet.losses.score_targets`):
            ``"correct"`` (the paper: exit k is right), ``"no_regret"`` (the
            default: leaving at k loses nothing, i.e. k is right or no later
            exit is) or ``"no_regret_last"`` (k is right or the last exit is
            wrong). A sample no exit gets right should leave at the cheapest;
            the paper's target scores it as unready everywhere, so thresholds
            keep it running to the end for nothing.
        features: ``"paper"`` (probabilities and the three confidence
            summaries) or ``"agreement"`` (the default: also the margin and how
            the earlier exits rate exit k's prediction,
            :func:`eenet.features.agreement_features`).
        device: torch device for training and inference.
        num_threads: torch CPU threads while fitting and scoring (restored
            afterwards); ``None`` keeps the current setting. The default 1 is
            deliberate: the heads' matrices are small, and on a shared machine
            extra threads were up to ten times slower than one.

    Attributes:
        diagnostics: after :meth:`fit`: ``epochs_run``, ``best_epoch``,
            per-epoch ``train_loss`` and ``holdout_loss``, ``best_loss``, the
            loss ``parts`` at the best epoch, ``fit_seconds``, ``n_train``,
            ``n_holdout``, ``expected_cost`` of ``rbar``, ``seed``. Empty before.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> logits = rng.normal(size=(200, 3, 4)) * np.array([1.0, 2.0, 4.0])[:, None]
        >>> probs = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
        >>> labels = rng.integers(0, 4, size=200)
        >>> scorer = EENetScorer(epochs=5).fit(probs.astype(np.float32), labels,
        ...                                    np.array([1.0, 2.0, 3.0]), budget=2.0)
        >>> scorer.scores(probs.astype(np.float32)).shape
        (200, 3)
        >>> round(float(scorer.exit_distribution().sum()), 6)
        1.0
    """

    name: str = "eenet"

    def __init__(self, *, hidden: int = 32, depth: int = 1, epochs: int = 200,
                 lr: float = 1e-2, weight_decay: float = 1e-4, alpha_ce: float = 1.0,
                 alpha_budget: float = 1.0, batch_size: int | None = 512,
                 holdout: float = 0.2, patience: int = 10, tol: float = 1e-3,
                 alternate: bool = False,
                 prob_features: ProbFeatures = "auto", top_m: int = 16,
                 detach_weights: bool = True, target: str = "no_regret",
                 features: str = "agreement",
                 device: str = "cpu",
                 num_threads: int | None = 1) -> None:
        self.hidden = _positive_int("hidden", hidden)
        self.depth = _positive_int("depth", depth, minimum=0)
        self.epochs = _positive_int("epochs", epochs)
        self.lr = _non_negative("lr", lr, positive=True)
        self.weight_decay = _non_negative("weight_decay", weight_decay)
        self.alpha_ce = _non_negative("alpha_ce", alpha_ce)
        self.alpha_budget = _non_negative("alpha_budget", alpha_budget)
        self.batch_size = None if batch_size is None else _positive_int("batch_size",
                                                                        batch_size)
        self.holdout = _non_negative("holdout", holdout)
        if self.holdout >= 1:
            raise EenetError(f"holdout must lie in [0, 1), got {holdout!r}")
        self.patience = _positive_int("patience", patience)
        self.tol = _non_negative("tol", tol)
        self.alternate = bool(alternate)
        self.prob_features = check_choice("prob_features", prob_features,
                                           ("auto", "full", "top"))
        self.top_m = _positive_int("top_m", top_m)
        self.detach_weights = bool(detach_weights)
        self.target = check_choice("target", target, SCORE_TARGETS)
        self.features = check_choice("features", features, ("paper", "agreement"))
        try:
            self.device = str(torch.device(device))
        except (RuntimeError, TypeError):
            raise EenetError(f"device must be a torch device such as 'cpu' or 'cuda:0', "
                             f"got {device!r}") from None
        self.num_threads = None if num_threads is None else _positive_int("num_threads",
                                                                          num_threads)
        self.diagnostics: dict[str, Any] = {}
        self._net: _EENetHeads | None = None
        self._n_exits: int | None = None
        self._n_classes: int | None = None
        self._use_top: bool | None = None
        self._rbar: np.ndarray | None = None
        self._costs: np.ndarray | None = None
        self._budget: float | None = None

    # ---- hyperparameters -------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """The constructor arguments, as plain values."""
        return {"hidden": self.hidden, "depth": self.depth, "epochs": self.epochs,
                "lr": self.lr, "weight_decay": self.weight_decay, "alpha_ce": self.alpha_ce,
                "alpha_budget": self.alpha_budget, "batch_size": self.batch_size,
                "holdout": self.holdout, "patience": self.patience, "tol": self.tol,
                "alternate": self.alternate, "prob_features": self.prob_features,
                "top_m": self.top_m, "detach_weights": self.detach_weights,
                "target": self.target, "features": self.features, "device": self.device, "num_threads": self.num_threads}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"EENetScorer({args})"

    @property
    def is_fitted(self) -> bool:
        return self._net is not None

    # ---- features ----------------------------------------------------------
    def _static_features(self, probs: np.ndarray) -> Tensor:
        """[n_samples, n_exits, in_dim] float32 features on the training device."""
        conf = confidence_features(probs)  # [N, K, 3] float64
        if self._use_top:
            p = top_probs(probs, self.top_m)  # [N, K, top_m]
        else:
            p = probs.astype(np.float32, copy=False)  # [N, K, C]
        parts = [p.astype(np.float32, copy=False), conf.astype(np.float32)]
        if self.features == "agreement":
            parts.append(agreement_features(probs).astype(np.float32))
        feats = np.concatenate(parts, axis=2)
        return torch.from_numpy(feats).to(self.device)

    def _in_dim(self) -> int:
        assert self._n_classes is not None
        width = self.top_m if self._use_top else self._n_classes
        extra = N_AGREEMENT_FEATURES if self.features == "agreement" else 0
        return width + N_CONFIDENCE_FEATURES + extra

    def _check_fitted(self, method: str) -> _EENetHeads:
        if self._net is None:
            raise EenetError(f"EENetScorer.{method}() needs a trained scorer; call fit() "
                             f"first (or load one with EENetScorer.from_state())")
        return self._net

    def _check_predict_probs(self, probs: np.ndarray) -> np.ndarray:
        probs = _check_probs(probs)
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().cpu().numpy()
        if probs.shape[1:] != (self._n_exits, self._n_classes):
            raise EenetError(f"probs has {probs.shape[1]} exits and {probs.shape[2]} classes "
                             f"but the scorer was fitted on {self._n_exits} exits and "
                             f"{self._n_classes} classes")
        return probs

    # ---- fitting -------------------------------------------------------------
    def fit(self, probs: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget: float,
            *, seed: int = 0, verbose: bool = False) -> "EENetScorer":
        """Train the scoring and assignment heads for one budget.

        Args:
            probs: [n_samples, n_exits, n_classes] exit probabilities (float16/32/64)
                of the validation split.
            labels: [n_samples] integer labels.
            costs: [n_exits] cumulative exit costs, non-decreasing.
            budget: the average cost budget ``B``, in the unit of ``costs``; at
                least the cheapest exit's cost.
            seed: seeds the holdout split, the initialisation and the batch order.
                Global RNG state is left as it was.
            verbose: show a progress bar on stderr.

        Returns:
            ``self``, fitted.

        Raises:
            EenetError: inconsistent shapes, non-probabilities, labels out of
                range, bad costs or a budget below the cheapest exit.
        """
        probs = _check_probs(probs)
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().cpu().numpy()
        n, k, c = probs.shape
        if n == 0:
            raise EenetError("probs has no samples; fit needs at least one")
        labels = _check_labels(labels, n, c)
        costs = check_costs(costs, k)
        budget = check_budget(budget, costs)
        seed = _positive_int("seed", seed, minimum=0)

        start = time.perf_counter()
        self._net, self._rbar, self.diagnostics = None, None, {}  # a failed refit leaves none
        self._n_exits, self._n_classes = k, c
        self._use_top = (self.prob_features == "top"
                         or (self.prob_features == "auto" and c > FULL_PROBS_MAX_CLASSES))
        device = torch.device(self.device)
        scale = float(costs[-1]) if costs[-1] > 0 else 1.0
        costs_t = torch.as_tensor(costs / scale, dtype=torch.float32, device=device)
        budget_n = budget / scale

        static = self._static_features(probs)  # [N, K, in_dim]
        correct = torch.from_numpy(probs.argmax(axis=2) == labels[:, None]).to(device)
        train_idx, hold_idx = _stratified_holdout(labels, self.holdout, seed)

        with _local_torch_state(seed, device, self.num_threads):
            net = _EENetHeads(k, self._in_dim(), self.hidden, self.depth).to(device)
            history = self._train(net, static, correct, costs_t, budget_n,
                                  torch.from_numpy(train_idx).to(device),
                                  torch.from_numpy(hold_idx).to(device), seed, verbose)
            self._net = net
            r = self._forward_blocks(static, want="assignment")
        self._rbar = (r.mean(axis=0) / r.mean(axis=0).sum()).astype(np.float64)
        self._costs, self._budget = costs, budget
        history.update({
            "fit_seconds": time.perf_counter() - start, "n_train": int(train_idx.size),
            "n_holdout": int(hold_idx.size), "seed": seed,
            "expected_cost": float(self._rbar @ costs), "budget": budget,
            "exit_distribution": [float(x) for x in self._rbar],
            "prob_features": "top" if self._use_top else "full",
            "num_threads": self.num_threads or torch.get_num_threads(),
        })
        self.diagnostics = history
        logger.info("eenet fit: %d epochs (best %d), holdout loss %.4f, expected cost %.4g "
                    "for budget %.4g, %.2f s", history["epochs_run"], history["best_epoch"],
                    history["best_loss"], history["expected_cost"], budget,
                    history["fit_seconds"])
        return self

    def _losses(self, net: _EENetHeads, x: Tensor, targets: Tensor, costs: Tensor,
                budget: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Scoring loss, assignment-side loss, and all parts (detached) for one batch.

        Args:
            x: [n, n_exits, in_dim] static features.
            targets: [n, 2, n_exits] from :func:`_targets`: ``q*`` and ``r*``.
        """
        q_logit, z = net(x)
        log_r = F.log_softmax(z, dim=1)
        r = log_r.exp()
        l_g = scoring_loss(q_logit, targets[:, 0], r, detach_weights=self.detach_weights)
        l_ce = assignment_loss(log_r, targets[:, 1])
        l_b = budget_loss(r, costs, budget)
        assign_side = self.alpha_ce * l_ce + self.alpha_budget * l_b
        parts = {"scoring": l_g.detach(), "assignment": l_ce.detach(),
                 "budget": l_b.detach(), "total": (l_g + assign_side).detach()}
        return l_g, assign_side, parts

    def _train(self, net: _EENetHeads, static: Tensor, correct: Tensor, costs: Tensor,
               budget: float, train_idx: Tensor, hold_idx: Tensor, seed: int,
               verbose: bool) -> dict[str, Any]:
        targets = _targets(correct, self.target)  # [N, 2, K]
        x_train, t_train = static[train_idx], targets[train_idx]
        has_holdout = hold_idx.numel() > 0
        x_hold, t_hold = (static[hold_idx], targets[hold_idx]) if has_holdout else (
            x_train, t_train)
        opt = _adam(net, self.lr, self.weight_decay)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n_train = x_train.shape[0]
        batch = n_train if self.batch_size is None else min(self.batch_size, n_train)

        train_curve: list[float] = []
        hold_curve: list[float] = []
        best_loss, best_epoch, best_parts = math.inf, -1, {}
        best_state = copy.deepcopy(net.state_dict())
        step, stale = 0, 0
        bar = tqdm(range(self.epochs), disable=not verbose, desc="eenet fit", leave=False)
        for epoch in bar:
            net.train()
            if batch < n_train:
                # one gather per epoch, then contiguous slices
                order = torch.randperm(n_train, generator=gen).to(x_train.device)
                x_epoch, t_epoch = x_train[order], t_train[order]
            else:
                x_epoch, t_epoch = x_train, t_train
            epoch_loss = torch.zeros((), device=x_train.device)
            for begin in range(0, n_train, batch):
                xb, tb = x_epoch[begin:begin + batch], t_epoch[begin:begin + batch]
                opt.zero_grad(set_to_none=True)
                l_g, assign_side, parts = self._losses(net, xb, tb, costs, budget)
                if not self.alternate:
                    loss = l_g + assign_side
                elif step % 2 == 0:
                    loss = l_g  # reaches the scoring heads only
                else:
                    loss = assign_side  # reaches the assignment heads only
                loss.backward()
                opt.step()
                step += 1
                epoch_loss += parts["total"] * xb.shape[0]
            train_curve.append(float(epoch_loss) / n_train)

            net.eval()
            with torch.no_grad():
                _, _, hold_parts = self._losses(net, x_hold, t_hold, costs, budget)
            hold_loss = float(hold_parts["total"])
            hold_curve.append(hold_loss)
            if not math.isfinite(hold_loss):
                logger.warning("eenet fit: non-finite holdout loss at epoch %d; keeping the "
                               "best weights so far", epoch)
                break
            if hold_loss < best_loss - self.tol * abs(best_loss) or not math.isfinite(best_loss):
                best_loss, best_epoch = hold_loss, epoch
                best_parts = {key: float(v) for key, v in hold_parts.items()}
                best_state = copy.deepcopy(net.state_dict())
                stale = 0
            else:
                stale += 1
            bar.set_postfix(train=f"{train_curve[-1]:.4f}", holdout=f"{hold_loss:.4f}")
            if stale >= self.patience:
                break
        bar.close()
        net.load_state_dict(best_state)
        net.eval()
        return {"epochs_run": len(train_curve), "best_epoch": best_epoch,
                "best_loss": best_loss, "parts": best_parts, "train_loss": train_curve,
                "holdout_loss": hold_curve, "early_stopping_on": "holdout" if has_holdout
                else "train", "steps": step}

    # ---- inference -----------------------------------------------------------
    def _forward_blocks(self, static: Tensor, want: Literal["scores", "assignment"]
                        ) -> np.ndarray:
        net = self._check_fitted("scores" if want == "scores" else "assignment")
        net.eval()
        out = []
        with torch.no_grad():
            for begin in range(0, static.shape[0], _PREDICT_ROWS):
                q_logit, z = net(static[begin:begin + _PREDICT_ROWS])
                # float64 here: a float32 sigmoid rounds every logit above ~17 to
                # exactly 1, and such ties would blur the calibration's quotas
                block = (torch.sigmoid(q_logit.double()) if want == "scores"
                         else torch.softmax(z.double(), dim=1))
                out.append(block.cpu().numpy())
        if not out:
            return np.zeros((0, self._n_exits or 0), dtype=np.float64)
        return np.clip(np.concatenate(out, axis=0), 0.0, 1.0)

    def _predict(self, probs: np.ndarray, want: Literal["scores", "assignment"]
                 ) -> np.ndarray:
        self._check_fitted("scores" if want == "scores" else "assignment")
        probs = self._check_predict_probs(probs)
        device = torch.device(self.device)
        out = []
        with _local_torch_state(0, device, self.num_threads):
            rows = max(1, _PREDICT_ROWS)
            for begin in range(0, probs.shape[0], rows):
                static = self._static_features(probs[begin:begin + rows])
                out.append(self._forward_blocks(static, want))
        if not out:
            return np.zeros((0, probs.shape[1]), dtype=np.float64)
        return np.concatenate(out, axis=0)

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """Exit scores ``q``: the predicted probability that each exit is correct.

        Args:
            probs: [n_samples, n_exits, n_classes] exit probabilities, with the
                exit and class counts seen by :meth:`fit`.

        Returns:
            [n_samples, n_exits] float64 in [0, 1]; higher means readier to exit.

        Raises:
            EenetError: called before :meth:`fit`, or ``probs`` has the wrong shape.
        """
        return self._predict(probs, "scores")

    def assignment(self, probs: np.ndarray) -> np.ndarray:
        """Soft assignment ``r = softmax_k(z)`` of each sample to the exits.

        Args:
            probs: [n_samples, n_exits, n_classes] exit probabilities.

        Returns:
            [n_samples, n_exits] float64; every row sums to 1.

        Raises:
            EenetError: called before :meth:`fit`, or ``probs`` has the wrong shape.
        """
        r = self._predict(probs, "assignment")
        return r / np.maximum(r.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)

    def exit_distribution(self) -> np.ndarray | None:
        """Learned exit distribution ``rbar_k = mean_n r_n,k`` on the fit data.

        Returns:
            [n_exits] float64 summing to 1, or ``None`` before :meth:`fit`.
        """
        return None if self._rbar is None else self._rbar.copy()

    # ---- persistence -----------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the scorer, as plain containers.

        The result holds only tensors, numbers, strings, ``None``, lists and
        dicts, so it survives ``torch.save`` / ``torch.load(weights_only=True)``.

        Raises:
            EenetError: called before :meth:`fit`.
        """
        net = self._check_fitted("state")
        assert self._rbar is not None and self._costs is not None
        return {
            "method": self.name,
            "state_version": _STATE_VERSION,
            "hparams": self.hparams(),
            "n_exits": self._n_exits,
            "n_classes": self._n_classes,
            "prob_features_used": "top" if self._use_top else "full",
            "state_dict": {key: v.detach().cpu().clone() for key, v in
                           net.state_dict().items()},
            "exit_distribution": [float(x) for x in self._rbar],
            "costs": [float(x) for x in self._costs],
            "budget": self._budget,
            "diagnostics": _plain(self.diagnostics),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "EENetScorer":
        """Rebuild a fitted scorer from :meth:`state`'s output.

        Raises:
            EenetError: ``state`` is not an EENet scorer state or is inconsistent.
        """
        if not isinstance(state, dict) or state.get("method") != cls.name:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise EenetError(f"state must be an EENetScorer state (method {cls.name!r}), "
                             f"got {got!r}")
        version = state.get("state_version")
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise EenetError(f"state_version {version!r} is not supported; this eenet reads "
                             f"up to {_STATE_VERSION}")
        missing = [key for key in ("hparams", "n_exits", "n_classes", "prob_features_used",
                                   "state_dict", "exit_distribution", "costs")
                   if key not in state]
        if missing:
            raise EenetError(f"EENetScorer state lacks {', '.join(missing)}")
        hparams = dict(state["hparams"])
        if version < 2:
            for key, value in _V1_HPARAMS.items():
                hparams.setdefault(key, value)
        scorer = cls(**hparams)
        scorer._n_exits, scorer._n_classes = int(state["n_exits"]), int(state["n_classes"])
        scorer._use_top = state["prob_features_used"] == "top"
        net = _EENetHeads(scorer._n_exits, scorer._in_dim(), scorer.hidden, scorer.depth)
        try:
            net.load_state_dict(state["state_dict"])
        except RuntimeError as err:
            raise EenetError(f"EENetScorer state_dict does not fit the stored "
                             f"hyperparameters ({str(err).splitlines()[0]})") from None
        scorer._net = net.to(torch.device(scorer.device)).eval()
        scorer._rbar = np.asarray(state["exit_distribution"], dtype=np.float64)
        scorer._costs = np.asarray(state["costs"], dtype=np.float64)
        scorer._budget = None if state.get("budget") is None else float(state["budget"])
        scorer.diagnostics = dict(state.get("diagnostics", {}))
        return scorer


def _plain(value: Any) -> Any:
    """Convert NumPy scalars/arrays inside nested containers to plain Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def fit_eenet(probs: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget: float,
              *, seed: int = 0, verbose: bool = False, **hparams: Any) -> EENetScorer:
    """Build an :class:`EENetScorer` with ``hparams`` and fit it.

    Args:
        probs: [n_samples, n_exits, n_classes] exit probabilities.
        labels: [n_samples] integer labels.
        costs: [n_exits] cumulative exit costs.
        budget: average cost budget, in the unit of ``costs``.
        seed: see :meth:`EENetScorer.fit`.
        verbose: show a progress bar on stderr.
        **hparams: constructor arguments of :class:`EENetScorer`.

    Returns:
        The fitted scorer.

    Raises:
        EenetError: an unknown hyperparameter, or bad input (see ``fit``).
    """
    known = set(EENetScorer().hparams())
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise EenetError(f"unknown EENet hyperparameter {unknown[0]!r}; choose from: "
                         f"{', '.join(sorted(known))}")
    return EENetScorer(**hparams).fit(probs, labels, costs, budget, seed=seed,
                                      verbose=verbose)
