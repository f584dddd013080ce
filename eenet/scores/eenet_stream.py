"""EENet's scores exit by exit, lean enough to run inside a serving loop.

Training reads each exit's features as defined in :mod:`eenet.scores.eenet`
(probabilities, max probability, 1 - normalised entropy, vote ratio, margin,
the earlier exits' probabilities of this exit's answer, agreement). Most of
those are affine in a handful of raw quantities, so the affine part folds into
the first layer of the scoring head once (:func:`fold_scoring_heads`) and
scoring an exit needs only

    z_k = [p_k (or its top m), top-1, top-2, H(p_k), votes for the answer,
           (p_{k-1}[y_k], sum_{j<k} p_j[y_k], 1[y_{k-1} = y_k]), q_0 .. q_{k-1}]

with ``H`` the entropy: about twenty tensor operations per exit, whatever the
batch. The running history (previous probabilities, their sum, the votes) is
updated lazily, when the next exit is scored, so a sample that leaves pays
nothing for it. :class:`EENetStream` is the one scoring path of a fitted
EENet scorer: the cache is scored with it, and so is every batch the
runtime serves.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from eenet.scores.eenet_heads import EENetHeads

__all__ = ["EENetStream", "FoldedHead", "fold_scoring_heads"]


class FoldedHead(NamedTuple):
    """One exit's scoring head on the raw inputs ``z_k``."""

    w_first: Tensor  # [raw_dim + k, H1]
    b_first: Tensor  # [H1]
    hidden: tuple[tuple[Tensor, Tensor], ...]  # (w [H, H], b [H]) per further layer
    w_out: Tensor | None  # [H] (None: a linear head, whose output is column 0)
    b_out: Tensor | None  # []


def fold_scoring_heads(net: EENetHeads, *, width: int, n_classes: int,
                       agreement: bool) -> list[FoldedHead]:
    """The scoring heads with the affine parts of the features folded in.

    Feature rows of exit k in training order: ``head`` (``width`` values),
    max prob, ``1 - H/log C``, ``votes/(k+1)``, and with agreement: margin
    ``top1 - top2``, ``p_{k-1}[y]`` (exit 0: its own max), ``mean_{j<k} p_j[y]``
    (exit 0: its own max), agreement (exit 0: 1); then the k earlier scores.
    Raw rows: head, top1, top2, H, votes, and with agreement ``p_{k-1}[y]``,
    ``sum_{j<k} p_j[y]``, agreement; then the earlier scores.
    """
    cols = slice(0, net.hidden) if net.depth > 0 else slice(0, 1)
    log_c = math.log(n_classes)
    heads = []
    for k in range(net.n_exits):
        w = net.in_w[k, :, cols].detach().cpu().double()  # [in_dim, H1]
        b = net.in_b[k, cols].detach().cpu().double().clone()
        row = {name: w[width + i] for i, name in enumerate(
            ("max", "ent", "vote", "margin", "prev", "mean", "agree")[:w.shape[0] - width])}
        raw = torch.zeros(width + (7 if agreement else 4), w.shape[1], dtype=torch.float64)
        raw[:width] = w[:width]
        raw[width] = row["max"]  # top1
        raw[width + 2] = -row["ent"] / log_c  # H
        b += row["ent"]  # the 1 of 1 - H/log C
        raw[width + 3] = row["vote"] / (k + 1)  # votes for the answer, counted so far
        if agreement:
            raw[width] += row["margin"]
            raw[width + 1] = -row["margin"]  # top2
            if k == 0:  # no earlier exit: its own max, and agreement 1
                raw[width] += row["prev"] + row["mean"]
                b += row["agree"]
            else:
                raw[width + 4] = row["prev"]
                raw[width + 5] = row["mean"] / k
                raw[width + 6] = row["agree"]
        q_rows = net.q_w[k, :k, cols].detach().cpu().double()
        w_first = torch.cat([raw, q_rows], dim=0).float()
        hidden = tuple((net.hid_w[k, 0, layer].detach().cpu(),
                        net.hid_b[k, 0, layer].detach().cpu())
                       for layer in range(max(net.depth - 1, 0)))
        out = (net.out_w[k, 0].detach().cpu(), net.out_b[k, 0].detach().cpu()) \
            if net.depth > 0 else (None, None)
        heads.append(FoldedHead(w_first, b.float(), hidden, *out))
    return heads


class EENetStream:
    """The per-exit scoring of a fitted EENet scorer (see the module docstring).

    Args:
        heads: :func:`fold_scoring_heads` of the trained heads.
        n_exits, n_classes: the network's.
        top_m: feed the ``top_m`` largest probabilities instead of all (None: all).
        agreement: the agreement features are in use.
    """

    def __init__(self, heads: list[FoldedHead], *, n_exits: int, n_classes: int,
                 top_m: int | None, agreement: bool) -> None:
        self.heads, self.n_exits, self.n_classes = heads, n_exits, n_classes
        self.top_m, self.agreement = top_m, agreement
        self.n_top = max(2, top_m or 0)
        self._device: dict[torch.device, list[FoldedHead]] = {}

    def _on(self, device: torch.device) -> list[FoldedHead]:
        if device not in self._device:
            def move(t):
                return None if t is None else t.to(device)
            self._device[device] = [FoldedHead(move(h.w_first), move(h.b_first), tuple(
                (move(w), move(b)) for w, b in h.hidden), move(h.w_out), move(h.b_out))
                for h in self.heads]
        return self._device[device]

    def start(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """History rows: previous probabilities, their running sum, votes (agreement),
        or votes alone; the answer and vote count so far; the earlier scores."""
        rows = 3 if self.agreement else 1
        return {"hist": torch.zeros(batch, rows, self.n_classes, device=device),
                "vmax": torch.zeros(batch, 1, device=device),
                "pred": torch.full((batch,), -1, dtype=torch.long, device=device),
                "q": torch.zeros(batch, 0, device=device)}

    def _catch_up(self, state: dict[str, Tensor]) -> None:
        """Fold the previous exit's outputs (kept in ``state``) into the history."""
        hist = state["hist"]
        if self.agreement:
            p = state.pop("p")
            hist[:, 0].copy_(p)
            hist[:, 1].add_(p)
        hist[:, -1].scatter_(1, state["pred"][:, None], state.pop("count"))
        state["q"] = torch.cat([state["q"], torch.sigmoid(state.pop("s"))[:, None]], dim=1)

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's score logit ``[batch]``; exits must come in order from 0."""
        head = self._on(logits.device)[k]
        if k > 0:
            self._catch_up(state)
        p = torch.softmax(logits.float(), dim=1)
        top = p.topk(min(self.n_top, p.shape[1]), dim=1)  # _first pads a short top-m
        values, pred = top.values, top.indices[:, 0]
        entropy = torch.special.entr(p).sum(dim=1, keepdim=True)
        hist = state["hist"]
        rows = hist.shape[1]
        # every history row at this exit's answer: [b, rows]
        at_pred = hist.gather(2, pred.view(-1, 1, 1).expand(-1, rows, 1)).view(-1, rows)
        count = at_pred[:, -1:] + 1.0  # votes for this answer, this exit included
        votes = torch.maximum(state["vmax"], count)
        parts = [p if self.top_m is None else _first(values, self.top_m), values[:, :2],
                 entropy, votes]
        if self.agreement:
            parts += [at_pred[:, :2], (pred == state["pred"]).unsqueeze(1).float()]
        if k > 0:
            parts.append(state["q"])
        h = torch.addmm(head.b_first, torch.cat(parts, dim=1), head.w_first)
        if head.w_out is None:
            s = h[:, 0]
        else:
            h = torch.relu(h)
            for w, b in head.hidden:
                h = torch.relu(torch.addmm(b, h, w))
            s = torch.addmv(head.b_out, h, head.w_out)
        state.update(vmax=votes, count=count, s=s)
        if self.agreement:
            state["p"] = p
        state["pred"] = pred
        return s


def _first(values: Tensor, m: int) -> Tensor:
    """The first ``m`` columns, zero-padded when there are fewer."""
    if values.shape[1] >= m:
        return values[:, :m]
    return torch.nn.functional.pad(values, (0, m - values.shape[1]))
