"""EENet's per-exit scoring and assignment heads, and their training loop.

Ilhan et al., "EENet: Learning to Early Exit for Adaptive Inference",
WACV 2024, Sec. 3. For every exit k two small MLPs read the exit's features
and the (detached) scores of the earlier exits: the scoring head g_k gives the
score logit, the assignment head h_k an unbounded assignment logit. The
weights of all exits and of both kinds are stored stacked, so one batched
matrix product serves every exit's static inputs during training; the
scoring reads one exit's scoring head at a time (:mod:`eenet.scores.eenet_stream`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from eenet.scores.eenet_losses import assignment_targets, loss_terms, score_targets

__all__ = ["EENetHeads", "TrainConfig", "train_heads"]

logger = logging.getLogger(__name__)


class EENetHeads(nn.Module):
    """Scoring heads g_0..g_{K-1} and assignment heads h_0..h_{K-1}, stored stacked.

    Head k (either kind) is an MLP with ``depth`` hidden ReLU layers of width
    ``hidden`` reading ``in_dim + k`` inputs: exit k's features and the
    sigmoid scores of the k earlier exits. Mathematically this is exactly 2K
    independent MLPs (the blocks never mix).

    Parameters (W1 = 2 * hidden, or 2 when ``depth == 0``):
        in_w [K, in_dim, W1], in_b [K, W1]: first layer, exit features
            (columns ``[:hidden]`` feed the scoring head, ``[hidden:]`` the
            assignment head);
        q_w [K, K - 1, W1]: first layer, earlier scores (exit k uses k rows);
        hid_w [K, 2, depth - 1, hidden, hidden], hid_b [K, 2, depth - 1, hidden];
        out_w [K, 2, hidden], out_b [K, 2]: output layers (empty when depth == 0).
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

    def _head_output(self, k: int, h: Tensor) -> Tensor:
        """First-layer pre-activations [n, W1] of exit k -> [n, 2] (score, assignment)."""
        if self.depth == 0:
            return h
        n = h.shape[0]
        h = torch.relu(h).view(n, 2, self.hidden)  # [n, 2 (g, h), hidden]
        for layer in range(self.depth - 1):
            h = torch.relu(torch.einsum("nai,aij->naj", h, self.hid_w[k, :, layer])
                           + self.hid_b[k, :, layer])
        return (h * self.out_w[k]).sum(dim=2) + self.out_b[k]  # [n, 2]

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Score logits and assignment logits of every exit.

        Args:
            features: [n_samples, n_exits, in_dim] exit features.

        Returns:
            ``(q_logit, z)``, each [n_samples, n_exits].
        """
        n = features.shape[0]
        # every exit's first layer at once: [K, n, in_dim] @ [K, in_dim, W1] -> [K, n, W1]
        pre = torch.baddbmm(self.in_b[:, None, :], features.transpose(0, 1), self.in_w)
        # unbind, not pre[k]: indexing would allocate a [K, n, W1] gradient per exit
        pre_k, q_w_k = pre.unbind(0), self.q_w.unbind(0)
        outputs: list[Tensor] = []
        earlier = features.new_zeros(n, 0)  # sigmoid(q_0..q_{k-1}), detached, [n, k]
        for k in range(self.n_exits):
            h = pre_k[k] if k == 0 else pre_k[k] + earlier @ q_w_k[k][:k]
            out = self._head_output(k, h)  # [n, 2]: score logit, assignment logit
            outputs.append(out)
            if k + 1 < self.n_exits:
                earlier = torch.cat([earlier, torch.sigmoid(out[:, :1]).detach()], dim=1)
        both = torch.stack(outputs, dim=1)  # [n, K, 2]
        return both[..., 0], both[..., 1]


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_heads`.

    Attributes:
        epochs: maximum passes over the training part.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        alpha_ce: weight of the assignment loss ``L_ce``.
        alpha_budget: weight of the budget loss ``L_budget``.
        batch_size: samples per step; ``None`` trains full batch; ``"auto"`` (the
            default) takes an eighth of the training part, between 256 and 1024, so an
            epoch is at least eight steps and early stopping's patience, counted in
            epochs, means enough optimisation on small caches too.
        patience: epochs without a holdout improvement before stopping.
        tol: relative holdout-loss decrease that counts as an improvement.
        alternate: alternate steps between the scoring term and the
            assignment terms, as the paper does, instead of stepping on
            their sum (the detached weights keep each term on its own heads
            either way; alternating halves each group's updates).
        detach_weights: detach the scoring-loss weights from the assignment.
        target: ``"no_regret"`` (default), ``"correct"`` (the paper) or
            ``"no_regret_last"``; see :func:`eenet.scores.eenet_losses.score_targets`.
    """

    epochs: int = 200
    lr: float = 2e-2
    weight_decay: float = 1e-4
    alpha_ce: float = 1.0
    alpha_budget: float = 1.0
    batch_size: int | str | None = "auto"
    patience: int = 5
    tol: float = 1e-3
    alternate: bool = False
    detach_weights: bool = True
    target: str = "no_regret"


class _Adam:
    """Adam (Kingma & Ba, ICLR 2015) with L2 weight decay, as ``torch.optim.Adam`` computes it.

    Written by hand: in torch 2.13 the first ``torch.optim`` optimizer imports
    ``torch._dynamo``, a one-time cost of about a second, which is half of a
    whole EENet fit on a 10,000-sample cache.
    """

    def __init__(self, params: list[Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad if self.wd == 0 else p.grad.add(p, alpha=self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().add_(self.eps * math.sqrt(1 - b2 ** self.t)), value=-lr)
            p.grad = None


def _objective(net: EENetHeads, x: Tensor, q_star: Tensor, r_star: Tensor, costs: Tensor,
               budget: float, cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(scoring term, assignment-side terms, total) of one batch, with gradients."""
    q_logit, z = net(x)
    terms = loss_terms(q_logit, z, q_star, r_star, costs, budget,
                       detach_weights=cfg.detach_weights)
    assign = cfg.alpha_ce * terms["assignment"] + cfg.alpha_budget * terms["budget"]
    return terms["scoring"], assign, terms["scoring"] + assign


def _epoch(net: EENetHeads, opt: _Adam, train: tuple[Tensor, Tensor, Tensor], costs: Tensor,
           budget: float, cfg: TrainConfig, gen: torch.Generator, step: int
           ) -> tuple[float, int]:
    """One pass over the training part in shuffled mini-batches; (mean loss, steps so far)."""
    x, q_star, r_star = train
    n = x.shape[0]
    batch = n if cfg.batch_size is None else min(_batch_size(cfg.batch_size, n), n)
    if batch < n:
        # one shuffled copy per epoch, then contiguous slices: a random gather per batch
        # from a large array misses the caches and slows every step as n grows
        order = torch.randperm(n, generator=gen).to(x.device)
        x, q_star, r_star = x[order], q_star[order], r_star[order]
    total_loss = torch.zeros((), device=x.device)
    for begin in range(0, n, batch):
        rows = slice(begin, begin + batch)
        scoring, assign, total = _objective(net, x[rows], q_star[rows], r_star[rows], costs,
                                            budget, cfg)
        loss = total if not cfg.alternate else (scoring if step % 2 == 0 else assign)
        loss.backward()
        opt.step()
        step += 1
        total_loss += total.detach() * min(batch, n - begin)
    return float(total_loss) / n, step


def _batch_size(setting: int | str, n: int) -> int:
    """Samples per step: the setting, or for ``"auto"`` n/8 kept within [256, 1024]."""
    return min(1024, max(256, n // 8)) if setting == "auto" else int(setting)


def _holdout_loss(net: EENetHeads, held: tuple[Tensor, Tensor, Tensor], costs: Tensor,
                  budget: float, cfg: TrainConfig) -> dict[str, float]:
    """The objective's terms and total on the held-out part, without gradients."""
    x, q_star, r_star = held
    with torch.no_grad():
        q_logit, z = net(x)
        terms = loss_terms(q_logit, z, q_star, r_star, costs, budget,
                           detach_weights=cfg.detach_weights)
    parts = {key: float(value) for key, value in terms.items()}
    parts["total"] = parts["scoring"] + cfg.alpha_ce * parts["assignment"] \
        + cfg.alpha_budget * parts["budget"]
    return parts


def train_heads(net: EENetHeads, features: Tensor, correct: Tensor, costs: Tensor,
                budget: float, train_idx: Tensor, hold_idx: Tensor, cfg: TrainConfig, *,
                seed: int, verbose: bool = False) -> dict[str, Any]:
    """Minimise ``L_g + alpha_ce L_ce + alpha_budget L_budget`` with Adam; early stopping.

    Mini-batches are drawn from ``train_idx``; after every epoch the loss on
    ``hold_idx`` (or on the training part when it is empty) decides whether
    the weights are the best so far (a relative improvement of ``cfg.tol``)
    and, after ``cfg.patience`` epochs without one, stops. The best weights
    are restored into ``net`` at the end.

    Args:
        net: the heads, trained in place.
        features: [n_samples, n_exits, in_dim] exit features.
        correct: [n_samples, n_exits] bool correctness.
        costs: [n_exits] costs divided by the last exit's, so the learning rate
            does not depend on the cost unit.
        budget: the budget in the same scaled unit.
        train_idx, hold_idx: disjoint sample indices.
        cfg: optimisation settings.
        seed: seeds the batch order.
        verbose: progress bar on stderr.

    Returns:
        Diagnostics: ``epochs_run``, ``best_epoch``, ``best_loss``, ``parts``
        (loss terms at the best epoch), per-epoch ``train_loss`` and
        ``holdout_loss``, ``early_stopping_on``, ``steps``.
    """
    q_star = score_targets(correct, cfg.target, dtype=torch.float32)
    r_star = assignment_targets(correct, dtype=torch.float32)
    train = (features[train_idx], q_star[train_idx], r_star[train_idx])
    on_holdout = hold_idx.numel() > 0
    hold = hold_idx if on_holdout else train_idx
    held = (features[hold], q_star[hold], r_star[hold])
    params = list(net.parameters())
    opt = _Adam(params, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    train_curve: list[float] = []
    hold_curve: list[float] = []
    best_loss, best_epoch, best_parts = math.inf, -1, {}
    best_state = [p.detach().clone() for p in params]
    step, stale = 0, 0
    bar = tqdm(range(cfg.epochs), disable=not verbose, desc="eenet fit", leave=False)
    for epoch in bar:
        loss, step = _epoch(net, opt, train, costs, budget, cfg, gen, step)
        train_curve.append(loss)
        parts = _holdout_loss(net, held, costs, budget, cfg)
        hold_curve.append(parts["total"])
        if not math.isfinite(parts["total"]):
            logger.warning("eenet fit: non-finite holdout loss at epoch %d; keeping the best "
                           "weights so far", epoch)
            break
        if parts["total"] < best_loss - cfg.tol * abs(best_loss) \
                or not math.isfinite(best_loss):
            best_loss, best_epoch, best_parts, stale = parts["total"], epoch, parts, 0
            for kept, p in zip(best_state, params):
                kept.copy_(p.detach())
        else:
            stale += 1
        bar.set_postfix(train=f"{loss:.4f}", holdout=f"{parts['total']:.4f}")
        if stale >= cfg.patience:
            break
    bar.close()
    with torch.no_grad():
        for kept, p in zip(best_state, params):
            p.copy_(kept)
    return {"epochs_run": len(train_curve), "best_epoch": best_epoch, "best_loss": best_loss,
            "parts": best_parts, "train_loss": train_curve, "holdout_loss": hold_curve,
            "early_stopping_on": "holdout" if on_holdout else "train", "steps": step}
