"""A staged multi-exit pre-LN transformer encoder (BERT's architecture, scaled down).

``MultiExitTransformer`` reads token ids ``[batch, seq_len]`` (``0`` pads,
position 0 holds ``[CLS]``) and has an exit after every layer: LayerNorm +
linear on the ``[CLS]`` hidden state, as BERT's classifier reads ``[CLS]``.

It is *staged* for :class:`eenet.runtime.EarlyExitModel`: stage 0 embeds the
tokens (word + learned position embeddings) and runs layer 0; stage k runs
layer k. What passes between stages is a tuple ``(hidden [batch, seq_len,
d_model], keep [batch, seq_len] bool)``, ``keep`` False at padding; the runtime
keeps the rows of the samples still running in both. Padded keys get no
attention weight, so a sample's exits do not depend on how much padding it
carries or on the other samples of its batch (up to float rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eenet._validation import EenetError

State = tuple[Tensor, Tensor]  # (hidden [b, t, d], keep [b, t] bool)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the kept positions.

    Shapes: ``x`` [b, t, d], ``keep`` [b, t] bool -> [b, t, d].
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise EenetError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, t, d = x.shape
        # [b, t, 3d] -> [3, b, heads, t, d / heads]
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(
            2, 0, 3, 1, 4)
        mask = keep[:, None, None, :]  # [b, t] -> [b, 1, 1, t]: every query sees the kept keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # [b, heads, t, dh] -> [b, t, d]


class EncoderLayer(nn.Module):
    """One pre-LN layer: ``x + attn(LN(x))``, then ``x + FFN(LN(x))`` (GELU)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, state: State) -> State:
        x, keep = state
        x = x + self.drop(self.attn(self.norm1(x), keep))
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, keep


class Embedding(nn.Module):
    """Token ids [b, t] -> ``(word + position embeddings [b, t, d], keep [b, t])``.

    With ``d_embed < d_model`` the word table is factorised as in ALBERT: ``d_embed``
    wide, projected to ``d_model`` by a linear map, so more hash buckets (fewer words
    sharing one) fit in the same number of parameters.
    """

    def __init__(self, n_buckets: int, max_len: int, d_model: int, dropout: float,
                 pad_id: int = 0, d_embed: int | None = None) -> None:
        super().__init__()
        self.pad_id, self.max_len = pad_id, max_len
        d_embed = d_model if d_embed is None else d_embed
        self.words = nn.Embedding(n_buckets, d_embed, padding_idx=pad_id)
        self.project = (nn.Identity() if d_embed == d_model
                        else nn.Linear(d_embed, d_model, bias=False))
        self.positions = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> State:
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.shape[1] > self.max_len:
            raise EenetError(f"expected integer token ids [batch, seq_len <= {self.max_len}], "
                             f"got {ids.dtype} {list(ids.shape)}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.project(self.words(ids)) + self.positions(pos))
        return x, ids != self.pad_id


class ClsHead(nn.Module):
    """LayerNorm + linear on the ``[CLS]`` state: ``(hidden, keep)`` -> logits [b, n_classes]."""

    def __init__(self, d_model: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear = nn.Linear(d_model, n_classes)

    def forward(self, state: State) -> Tensor:
        return self.linear(self.norm(state[0][:, 0]))


class MultiExitTransformer(nn.Module):
    """A staged pre-LN transformer encoder with an exit on ``[CLS]`` after every layer.

    Args:
        n_classes: classes per exit.
        n_buckets: token-id vocabulary (hash buckets, padding and ``[CLS]`` included).
        max_len: the longest sequence accepted.
        n_layers: encoder layers, one exit after each.
        d_model: hidden size; ``n_heads`` heads of ``d_model / n_heads``.
        d_ff: feed-forward width.
        dropout: on embeddings, attention weights and residual branches (training only).
        d_embed: width of the word table (default ``d_model``); narrower tables are
            projected to ``d_model`` (:class:`Embedding`).

    Shapes:
        input int64 ``[batch, seq_len]``; ``forward`` returns ``n_layers``
        tensors ``[batch, n_classes]``.

    Example:
        >>> m = MultiExitTransformer(5, n_buckets=100, max_len=8, n_layers=3, d_model=16,
        ...                          n_heads=2, d_ff=32).eval()
        >>> ids = torch.tensor([[1, 7, 9, 0, 0, 0, 0, 0], [1, 4, 4, 4, 4, 0, 0, 0]])
        >>> [tuple(o.shape) for o in m(ids)]
        [(2, 5), (2, 5), (2, 5)]
    """

    def __init__(self, n_classes: int, *, n_buckets: int, max_len: int, n_layers: int = 6,
                 d_model: int = 64, n_heads: int = 4, d_ff: int = 256,
                 dropout: float = 0.1, d_embed: int | None = None) -> None:
        super().__init__()
        if n_layers < 1:
            raise EenetError(f"n_layers must be at least 1, got {n_layers}")
        self.n_exits, self.n_classes = n_layers, n_classes
        layers = [EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)]
        first = nn.Sequential(Embedding(n_buckets, max_len, d_model, dropout, d_embed=d_embed),
                              layers[0])
        self.stages = nn.ModuleList([first, *layers[1:]])
        self.heads = nn.ModuleList([ClsHead(d_model, n_classes) for _ in range(n_layers)])
        self.apply(_init_weights)

    def forward(self, ids: Tensor) -> list[Tensor]:
        outs, state = [], ids
        for stage, head in zip(self.stages, self.heads):
            state = stage(state)
            outs.append(head(state))
        return outs


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
