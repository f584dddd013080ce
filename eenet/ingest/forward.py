"""One forward of a multi-exit model, checked against the contract, and batch plumbing.

The forward contract (DESIGN.md section 6): ``model(x)`` returns a list or
tuple of per-exit logits, one ``[batch, n_classes]`` tensor per exit, every
exit with the same ``n_classes``. :func:`exit_logits` checks it and stacks the
exits into ``[batch, n_exits, n_classes]``; :func:`forward` runs the model
without autograd and turns its failures into one line.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from eenet._validation import EenetError
from eenet.ingest.resolve import describe, first_line

__all__ = ["autocast", "batch_len", "exit_logits", "forward", "grad_off", "labels_of",
           "select_rows", "to_device"]


def to_device(x: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (possibly nested) batch to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x


def select_rows(x: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of every tensor in a (possibly nested) batch."""
    if isinstance(x, torch.Tensor):
        return x[index.to(x.device)]
    if isinstance(x, Mapping):
        return {k: select_rows(v, index) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(select_rows(v, index) for v in x)
    return x


def batch_len(x: Any) -> int:
    """The batch size of a (possibly nested) batch: its first tensor's first axis."""
    for leaf in tree_leaves(x):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])
    raise EenetError(f"the model input is {describe(x)}; expected a tensor whose first "
                     f"axis is the batch")


def exit_logits(outs: Any, batch: int, expect: tuple[int, int] | None = None) -> torch.Tensor:
    """Check the forward contract and stack the exits.

    Args:
        outs: what ``model(x)`` returned: ``n_exits`` tensors ``[batch, n_classes]``.
        batch: the batch size the forward was given.
        expect: ``(n_exits, n_classes)`` of earlier batches, if any.

    Returns:
        float32 ``[batch, n_exits, n_classes]`` on the model's device.

    Raises:
        EenetError: a single tensor, a wrong batch size, exits with different
            class counts, fewer than two classes, or a change between batches.
    """
    wanted = ("a list or tuple of per-exit logits, one [batch, n_classes] tensor per exit "
              "(return [exit0_logits, exit1_logits, ...])")
    if isinstance(outs, torch.Tensor):
        raise EenetError(f"the model's forward returned a single tensor of shape "
                         f"{list(outs.shape)}; expected {wanted}")
    if not isinstance(outs, (list, tuple)) or len(outs) == 0:
        raise EenetError(f"the model's forward returned {describe(outs)}; expected {wanted}")
    for k, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.ndim != 2 or o.shape[0] != batch:
            raise EenetError(f"the model's forward returned {describe(o)} for exit {k} "
                             f"with a batch of {batch}; expected a [{batch}, n_classes] "
                             f"tensor per exit")
    classes = [int(o.shape[1]) for o in outs]
    if len(set(classes)) > 1:
        raise EenetError(f"the model's exits have different class counts {classes}; every "
                         f"exit must give logits over the same n_classes")
    if classes[0] < 2:
        raise EenetError(f"the model's exits give {classes[0]} logit per sample; expected "
                         f"n_classes >= 2 class logits")
    if expect is not None and (len(outs), classes[0]) != expect:
        raise EenetError(f"a batch returned {len(outs)} exits x {classes[0]} classes, but "
                         f"the first batch returned {expect[0]} x {expect[1]}")
    return torch.stack([o.float() for o in outs], dim=1)  # K x [b, C] -> [b, K, C]


def labels_of(y: Any, batch_index: int) -> torch.Tensor:
    """A batch's labels as a 1-D integer tensor, or a one-line error."""
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or \
            y.dtype.is_complex or y.dtype == torch.bool:
        raise EenetError(f"batch {batch_index} has labels {describe(y)}; the dataset must "
                         f"yield (input, integer label) pairs")
    return y


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` (float16 on CUDA, bfloat16 on CPU) when ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """``inference_mode``; ``no_grad`` for TorchScript, whose graph executor can try to
    record inference tensors for autograd when its parameters require grad."""
    if isinstance(model, torch.jit.ScriptModule):
        return torch.no_grad()
    return torch.inference_mode()


def forward(model: nn.Module, x: Any, where: str) -> Any:
    """``model(x)`` without autograd; a failure becomes one line naming ``where``."""
    try:
        with grad_off(model):
            return model(x)
    except EenetError:
        raise
    except Exception as err:
        raise EenetError(f"the model's forward failed on {where} (input {describe(x)}): "
                         f"{type(err).__name__}: {first_line(err)}; check that the "
                         f"dataset's inputs suit the model") from err
