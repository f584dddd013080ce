"""Capture each exit's hidden features while caching (``eenet cache --features``).

Exit ``k``'s features are the input of the last ``nn.Linear`` inside its head:
the pooled representation its classifier reads. A forward pre-hook on that
layer keeps the batch's input; after each forward :meth:`FeatureCapture.take`
hands back one ``[batch, d_k]`` float16 array per exit, projected on the
model's device by :func:`~eenet.cache.random_projection` where the input is
wider than ``feature_dim``.

The heads are ``model.heads[k]`` for a staged model (``stages`` and ``heads``
of one length per exit); otherwise the exit modules
:func:`~eenet.ingest.forward.find_exit_modules` finds (or the ones named
with ``exit_modules``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from eenet._validation import EenetError
from eenet.cache import random_projection
from eenet.ingest.forward import find_exit_modules, forward

__all__ = ["FeatureCapture", "exit_heads", "last_linear"]


def exit_heads(model: nn.Module, example: Any, n_exits: int,
               names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each exit's head: ``heads[k]`` when staged, else the exit modules."""
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if names is None and isinstance(stages, nn.ModuleList) and \
            isinstance(heads, nn.ModuleList) and len(stages) == len(heads) == n_exits:
        return [(f"heads.{k}", heads[k]) for k in range(n_exits)]
    return find_exit_modules(model, example, n_exits, names)


def last_linear(head: nn.Module, name: str, k: int) -> nn.Linear:
    """The last ``nn.Linear`` registered inside ``head`` (the head itself if it is one).

    Raises:
        EenetError: the head holds no ``nn.Linear``.
    """
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EenetError(f"exit {k}'s head {name!r} ({type(head).__name__}) holds no "
                         f"nn.Linear, so --features has no last linear layer to read; cache "
                         f"without --features, or name heads ending in nn.Linear with "
                         f"--exit-modules")
    return linears[-1]


class FeatureCapture:
    """Forward pre-hooks on every exit's last linear layer, and the projections.

    Use as a context manager around the forwards (the hooks are removed on
    leaving). :meth:`probe` runs one forward to learn each input width and
    draw the projections; :meth:`take` returns the latest forward's features.

    Args:
        model: the multi-exit model (eager, not TorchScript).
        example: a batch the model accepts, to find the exit modules.
        n_exits: exits of the model.
        feature_dim: the widest features stored; wider inputs are projected.
        seed: seed of the projections (``random_projection(d_in, d, seed, k)``).
        names: exit module names (``--exit-modules``), else found.
    """

    def __init__(self, model: nn.Module, example: Any, n_exits: int, *, feature_dim: int = 64,
                 seed: int = 0, names: Sequence[str] | None = None) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            raise EenetError("--features needs forward hooks, which a TorchScript model does "
                             "not take; give the eager model as a factory")
        heads = exit_heads(model, example, n_exits, names)
        self.layers = [last_linear(h, n, k) for k, (n, h) in enumerate(heads)]
        self.feature_dim, self.seed = int(feature_dim), int(seed)
        self.projections: list[np.ndarray | None] = [None] * n_exits
        self._proj_dev: list[torch.Tensor | None] = [None] * n_exits
        self._seen: list[torch.Tensor | None] = [None] * n_exits
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureCapture":
        for k, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(k)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, k: int) -> Any:
        def keep(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self._seen[k] = inputs[0]
        return keep

    def probe(self, model: nn.Module, x: Any) -> list[int]:
        """One forward of ``x``: fix the projections; returns the stored width per exit."""
        forward(model, x, "the first sample")
        dims = []
        for k, x_k in enumerate(self._latest(1)):
            d_in = int(x_k.shape[1])
            if d_in > self.feature_dim:
                p = random_projection(d_in, self.feature_dim, self.seed, k)
                self.projections[k] = p
                self._proj_dev[k] = torch.from_numpy(p).to(x_k.device)
            dims.append(min(d_in, self.feature_dim))
        return dims

    def _latest(self, batch: int) -> list[torch.Tensor]:
        out = []
        for k, x_k in enumerate(self._seen):
            if not isinstance(x_k, torch.Tensor) or x_k.ndim != 2 or x_k.shape[0] != batch:
                got = "nothing (the layer did not run)" if x_k is None else \
                    (list(x_k.shape) if isinstance(x_k, torch.Tensor) else type(x_k).__name__)
                raise EenetError(f"exit {k}'s last linear layer read {got} on a batch of "
                                 f"{batch}; --features needs a [batch, d] input to each "
                                 f"head's last nn.Linear")
            out.append(x_k)
        return out

    def take(self, batch: int) -> list[np.ndarray]:
        """The last forward's features: one float16 ``[batch, d_k]`` array per exit."""
        out = []
        for x_k, p in zip(self._latest(batch), self._proj_dev):
            x_k = x_k.float()
            if p is not None:
                x_k = x_k @ p
            out.append(x_k.to(torch.float16).cpu().numpy())
        self._seen = [None] * len(self._seen)
        return out
