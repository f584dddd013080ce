"""EENet's scores exit by exit, lean enough to run inside a serving loop.

Training reads each exit's features as defined in :mod:`eenet.scores.eenet`
(probabilities, max probability, 1 - normalised entropy, vote ratio, margin,
the earlier exits' probabilities of this exit's answer, agreement). Most of
those are affine in a handful of raw quantities, so the affine part folds into
the first layer of the scoring head once (:func:`fold_scoring_heads`) and
scoring an exit needs only

    z_k = [p_k (or its top m), top-1, top-2, H(p_k), votes for the answer,
           (p_{k-1}[y_k], sum_{j<k} p_j[y_k], 1[y_{k-1} = y_k]), q_0 .. q_{k-1}]

with ``H`` the entropy. A batch's whole running state is one packed float32
tensor ``[batch, width]`` (:meth:`EENetStream.start`), updated in place: the
previous exit's probabilities, their running sum and the votes per class
(``n_classes`` columns each), the most votes any class has, the last answer,
and the scores so far. A runtime keeps the samples still running with one
row gather of it, whatever the number of exits.

Two kernels compute the same scores. The pure-torch one runs on any device;
on the CPU one compiled C call per exit (:mod:`eenet.scores.eenet_kernel`)
does the same arithmetic without the thirty-odd operator dispatches, which
are what a decision at batch 1 costs (benchmarks/scoring_overhead.py).
:class:`EENetStream` is the one scoring path of a fitted EENet scorer: the
cache is scored with it, and so is every batch the runtime serves.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from eenet.scores.eenet_heads import EENetHeads
from eenet.scores.eenet_kernel import CFG_FIELDS, kernel_forced_off, load_kernel, pack_head

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
        kernel: ``"auto"`` (the C kernel for CPU tensors where it builds, torch
            elsewhere), ``"torch"`` or ``"c"`` (CPU tensors only).
    """

    def __init__(self, heads: list[FoldedHead], *, n_exits: int, n_classes: int,
                 top_m: int | None, agreement: bool,
                 kernel: Literal["auto", "torch", "c"] = "auto") -> None:
        self.heads, self.n_exits, self.n_classes = heads, n_exits, n_classes
        self.top_m, self.agreement, self.kernel = top_m, agreement, kernel
        self.n_top = max(2, top_m or 0)
        self.feed = n_classes if top_m is None else top_m  # probability columns fed
        self.n_raw = self.feed + (7 if agreement else 4)  # raw features before the scores
        # packed state columns: history rows (n_classes each), vmax, answer + 1, scores
        self.n_rows = 3 if agreement else 1
        self.col_vmax = self.n_rows * n_classes
        self.col_pred = self.col_vmax + 1
        self.col_q = self.col_vmax + 2
        self.width = self.col_q + n_exits
        self._device: dict[torch.device, list[FoldedHead]] = {}
        self._cols: dict[torch.device, Tensor] = {}
        self._c_args = [self._c_settings(k, h) for k, h in enumerate(heads)]

    def _c_settings(self, k: int, head: FoldedHead) -> tuple[int, int, tuple]:
        """Exit k's settings and flat weights for the C kernel: their addresses, and the
        arrays that keep them alive."""
        values = dict(n_classes=self.n_classes, width=self.width, n_rows=self.n_rows,
                      col_vmax=self.col_vmax, col_pred=self.col_pred, col_q=self.col_q, k=k,
                      feed=self.feed, top_m=self.top_m or 0, agreement=int(self.agreement),
                      n_raw=self.n_raw, hidden=head.w_first.shape[1],
                      n_hidden=len(head.hidden), has_out=int(head.w_out is not None))
        cfg = np.array([values[name] for name in CFG_FIELDS], dtype=np.intc)
        arrays = [t.detach().cpu().float().numpy() if t is not None else None for t in
                  (head.w_first, head.b_first, head.w_out, head.b_out)]
        hidden = tuple((w.detach().cpu().float().numpy(), b.detach().cpu().float().numpy())
                       for w, b in head.hidden)
        weights = pack_head(arrays[0], arrays[1], hidden, arrays[2], arrays[3])
        return cfg.ctypes.data, weights.ctypes.data, (cfg, weights)

    def _on(self, device: torch.device) -> list[FoldedHead]:
        if device not in self._device:
            def move(t):
                return None if t is None else t.to(device)
            self._device[device] = [FoldedHead(move(h.w_first), move(h.b_first), tuple(
                (move(w), move(b)) for w, b in h.hidden), move(h.w_out), move(h.b_out))
                for h in self.heads]
        return self._device[device]

    def start(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The packed state of ``batch`` samples that have seen no exit: ``{"packed":
        float32 [batch, width]}`` (see the module docstring), all zeros."""
        return {"packed": torch.zeros(batch, self.width, dtype=torch.float32, device=device)}

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's score logit, float32 ``[batch]``; exits must come in order from 0.

        Updates the packed state in place with exit k's outputs.
        """
        if logits.dtype != torch.float32:
            logits = logits.float()
        packed = state["packed"]
        if self.kernel != "torch" and logits.device.type == "cpu":
            kernel = load_kernel()
            if kernel is not None:
                if not packed.is_contiguous():  # the C kernel writes rows in place
                    packed = state["packed"] = packed.contiguous()
                return self._score_c(k, logits, packed, kernel)
            if self.kernel == "c" and not kernel_forced_off():
                raise RuntimeError("EENet's C kernel could not be built here (see the log)")
        return self._score_torch(k, logits, packed)

    def _score_torch(self, k: int, logits: Tensor, packed: Tensor) -> Tensor:
        """The pure-torch kernel (any device)."""
        head = self._on(logits.device)[k]
        n_classes = logits.shape[1]
        p = torch.softmax(logits, dim=1)
        values = p.topk(min(self.n_top, n_classes), dim=1).values  # _first pads a short top-m
        pred1 = p.argmax(dim=1, keepdim=True) + 1  # [b, 1] the answer + 1 (ties: lowest class)
        entropy = torch.special.entr(p).sum(dim=1, keepdim=True)
        # every history row at this exit's answer: [b, rows]
        cols = pred1 + self._row_cols(logits.device)
        at_pred = packed.gather(1, cols)
        count = at_pred[:, -1:] + 1.0  # votes for this answer, this exit included
        votes = torch.maximum(packed[:, self.col_vmax:self.col_pred], count)
        parts = [p if self.top_m is None else _first(values, self.top_m), values[:, :2],
                 entropy, votes]
        answer = pred1.float()  # as the state keeps it
        if self.agreement:
            agree = packed[:, self.col_pred:self.col_q] == answer
            parts += [at_pred[:, :2], agree.float()]
        if k > 0:
            parts.append(packed[:, self.col_q:self.col_q + k])
        s = _mlp_torch(torch.cat(parts, dim=1), head)
        if self.agreement:
            packed[:, n_classes:2 * n_classes].add_(p)
            packed[:, :n_classes].copy_(p)
        packed.scatter_(1, cols[:, -1:], count)
        packed[:, self.col_vmax:self.col_q].copy_(torch.cat([votes, answer], dim=1))
        torch.sigmoid(s, out=packed[:, self.col_q + k])
        return s

    def _row_cols(self, device: torch.device) -> Tensor:
        """``[rows]`` column of class -1 in each history row (the answer + 1 indexes it)."""
        cols = self._cols.get(device)
        if cols is None:
            cols = self._cols[device] = torch.arange(self.n_rows, device=device) * \
                self.n_classes - 1
        return cols

    def _score_c(self, k: int, logits: Tensor, packed: Tensor, kernel) -> Tensor:
        """The C kernel (:mod:`eenet.scores.eenet_kernel`): one call for the batch."""
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        cfg, weights, _ = self._c_args[k]
        out = torch.empty(logits.shape[0], dtype=torch.float32)
        kernel(cfg, weights, logits.data_ptr(), logits.stride(0), packed.data_ptr(),
               logits.shape[0], out.data_ptr())
        return out


def _mlp_torch(x: Tensor, head: FoldedHead) -> Tensor:
    """A folded scoring head on the raw features ``x`` [b, raw_dim + k]: the logit [b]."""
    h = torch.addmm(head.b_first, x, head.w_first)
    if head.w_out is None:
        return h[:, 0]
    h = torch.relu_(h)
    for w, b in head.hidden:
        h = torch.relu_(torch.addmm(b, h, w))
    return torch.addmv(head.b_out, h, head.w_out)


def _first(values: Tensor, m: int) -> Tensor:
    """The first ``m`` columns, zero-padded when there are fewer."""
    if values.shape[1] >= m:
        return values[:, :m]
    return torch.nn.functional.pad(values, (0, m - values.shape[1]))
