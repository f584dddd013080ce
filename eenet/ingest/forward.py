"""One forward of a multi-exit model, checked against the contract, and the batches around it.

The forward contract (DESIGN.md section 6): ``model(x)`` returns a list or
tuple of per-exit logits, one ``[batch, n_classes]`` tensor per exit, every
exit with the same ``n_classes``. :func:`exit_logits` checks it and stacks the
exits into ``[batch, n_exits, n_classes]``; :func:`forward` runs the model
without autograd and turns its failures into one line; :func:`stream_batches`
runs it over a ``DataLoader`` and hands each batch's logits to the host.
:func:`find_exit_modules` finds the submodule producing each exit, for the
forward hooks that time exits (:mod:`eenet.ingest.costs`) or stop at one
(:mod:`eenet.runtime.hooks`).
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from eenet._validation import EenetError, first_line
from eenet.ingest.resolve import describe

__all__ = ["autocast", "batch_len", "exit_logits", "find_exit_modules", "forward", "grad_off",
           "labels_of", "make_loader", "match_exit_modules", "record_module_outputs",
           "select_rows", "stream_batches", "to_device", "to_host"]


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


_autocast = autocast  # stream_batches has a flag of the same name


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


# ---------------------------------------------------------------------------
# which module produces each exit
# ---------------------------------------------------------------------------
def record_module_outputs(model: nn.Module, example_input: Any
                          ) -> tuple[Any, list[tuple[str, list[torch.Tensor]]]]:
    """One forward of ``example_input`` with a hook on every submodule.

    Returns:
        ``(outs, records)``: what the model returned, and ``(module name, the
        module's output tensors)`` for every submodule call, in the order the
        calls finished (an outer module after the modules it calls).
    """
    records: list[tuple[str, list[torch.Tensor]]] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            records.append((name, [t for t in tree_leaves(output)
                                   if isinstance(t, torch.Tensor)]))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            outs = model(example_input)
    finally:
        for h in handles:
            h.remove()
    return outs, records


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return False


def match_exit_modules(outs: Sequence[torch.Tensor],
                       records: Sequence[tuple[str, Sequence[torch.Tensor]]]
                       ) -> list[tuple[str, int]]:
    """The submodule producing each exit, from :func:`record_module_outputs`.

    Exit ``k`` comes from the outermost submodule whose output holds exit
    ``k``'s tensor and no other exit's (a module that returns several exits
    produces none of them alone). When no submodule returns the tensor itself
    (the forward returns a view of it, e.g. reshaped), one whose output shares
    its memory counts.

    Args:
        outs: the model's exits, ``n_exits`` tensors (the forward contract, checked).
        records: ``(module name, output tensors)`` per call, in finishing order.

    Returns:
        ``(module name, index of the exit's tensor among that module's output
        tensors)`` per exit; the names are distinct.

    Raises:
        EenetError: an exit that is no submodule's output (computed by a
            function inside ``forward``).
    """
    found: list[tuple[str, int]] = []
    for k, o in enumerate(outs):
        others = [t for j, t in enumerate(outs) if j != k]
        match: list[tuple[str, int]] = []
        for same in (lambda a, b: a is b, _same_memory):
            match = [(name, next(i for i, t in enumerate(ts) if same(t, o)))
                     for name, ts in records
                     if any(same(t, o) for t in ts)
                     and not any(same(t, u) for t in ts for u in others)]
            if match:
                break
        if not match:
            raise EenetError(f"cannot tell which module produces exit {k} (it is not a "
                             f"submodule's output, e.g. computed by a function inside "
                             f"forward); name one module per exit with exit_modules")
        found.append(match[-1])  # the last to finish is the outermost
    return found


def find_exit_modules(model: nn.Module, example_input: Any, n_exits: int,
                      names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The submodule producing each exit's logits: ``names`` checked, or found by one forward.

    Without ``names``, the model runs once on ``example_input`` with a hook on
    every submodule, and exit ``k``'s module is the outermost one whose output
    holds exit ``k``'s tensor and no other exit's (:func:`match_exit_modules`).

    Args:
        model: a multi-exit model (the forward contract); not TorchScript.
        example_input: a batch the model accepts (one sample is enough); not
            run when ``names`` are given.
        n_exits: the number of exits expected.
        names: the modules' names (``model.named_modules()`` keys), one per
            exit, to check instead of searching.

    Returns:
        ``(module name, module)`` per exit, in exit order, every module distinct.

    Raises:
        EenetError: a TorchScript model (no forward hooks); ``names`` of another
            count, unknown or repeated; a forward that breaks the contract or
            returns another number of exits; an exit that is no submodule's output.

    Example:
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block, self.exit0 = nn.Linear(4, 8), nn.Linear(4, 3)
        ...         self.exit1 = nn.Sequential(nn.ReLU(), nn.Linear(8, 3))
        ...     def forward(self, x):
        ...         return [self.exit0(x), self.exit1(self.block(x))]
        >>> [name for name, _ in find_exit_modules(Net(), torch.zeros(1, 4), 2)]
        ['exit0', 'exit1']
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise EenetError("a TorchScript model takes no forward hooks, so its exit modules "
                         "cannot be used; use the eager model")
    modules = dict(model.named_modules())
    if names is None:
        outs, records = record_module_outputs(model, example_input)
        exit_logits(outs, batch_len(example_input))  # the forward contract, or one line
        if len(outs) != n_exits:
            raise EenetError(f"the model returns {len(outs)} exits, not the {n_exits} expected")
        return [(n, modules[n]) for n, _ in match_exit_modules(outs, records)]
    names = [str(n) for n in names]
    if len(names) != n_exits:
        raise EenetError(f"exit_modules names {len(names)} modules for {n_exits} exits; "
                         f"give one module name per exit")
    unknown = [n for n in names if not n or n not in modules]
    if unknown:
        known = ", ".join(list(modules)[1:13])
        raise EenetError(f"exit_modules {unknown} are not submodules of the model "
                         f"({type(model).__name__}); known names include: {known}")
    if len(set(names)) != len(names):
        raise EenetError(f"exit_modules names a module twice {names}; give a distinct "
                         f"module per exit")
    return [(n, modules[n]) for n in names]


# ---------------------------------------------------------------------------
# streaming a loader through the model
# ---------------------------------------------------------------------------
def to_host(logits: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying a batch's logits to the host; returns (host tensor, event or None).

    On CUDA the copy goes to pinned memory without blocking, and the writer
    thread waits on the event, so the next forward is queued meanwhile.
    """
    if logits.device.type != "cuda":
        return logits, None
    host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
    host.copy_(logits, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def stream_batches(model: nn.Module, loader: DataLoader, device: torch.device, *,
                   ids: np.ndarray | None, first_id: int = 0, limit: int | None = None,
                   autocast: bool = False, bar: Any = None
                   ) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, Any]]:
    """Yield ``(logits [b, K, C], labels [b], sample_ids [b], ready)`` batch by batch.

    ``ids`` are the dataset rows the loader yields, in order; without them the
    rows count up from ``first_id`` (a resumed stream may then be empty). Grad mode
    is switched off around each forward only: a context held across ``yield``
    would leak into the consumer.
    """
    non_blocking = device.type == "cuda"
    shape: tuple[int, int] | None = None
    seen = 0
    for i, batch in enumerate(_reading(loader)):
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise EenetError(f"batch {i} is {describe(batch)}; the dataset must yield "
                             f"(input, integer label) pairs")
        x, y = batch
        y = labels_of(y, i)
        if limit is not None and seen + y.shape[0] > limit:
            x, y = select_rows(x, torch.arange(limit - seen)), y[:limit - seen]
        b = int(y.shape[0])
        with _autocast(device, autocast):
            outs = forward(model, to_device(x, device, non_blocking), f"batch {i}")
        logits = exit_logits(outs, b, shape)
        shape = (logits.shape[1], logits.shape[2])
        batch_ids = ids[seen:seen + b] if ids is not None else \
            np.arange(first_id + seen, first_id + seen + b)
        seen += b
        if bar is not None:
            bar.update(b)
        host, ready = to_host(logits)
        yield host, y.numpy().astype(np.int64, copy=False), batch_ids, ready
        if limit is not None and seen >= limit:
            break
    if seen == 0 and first_id == 0:
        raise EenetError("the dataset yielded no samples; check the data spec and --limit")


def _reading(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches; a dataset that fails while read becomes one line."""
    batches = iter(loader)
    for i in itertools.count():
        try:
            batch = next(batches)
        except StopIteration:
            return
        except EenetError:
            raise
        except Exception as err:
            raise EenetError(f"reading batch {i} of the dataset raised {type(err).__name__}: "
                             f"{first_line(err)}; check the dataset") from err
        yield batch


def make_loader(dataset: Any, batch_size: int, num_workers: int, device: torch.device,
                sampler: Any = None) -> DataLoader:
    """The rows of ``dataset`` in order (or ``sampler``'s), pinned for a CUDA device."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, pin_memory=device.type == "cuda")
