"""What each exit costs: per-exit latency on the caching device, FLOPs, or costs reused.

Costs are cumulative: exit ``k`` costs the backbone up to it plus every head
at or before it, since an exit policy evaluates the earlier heads to decide.

Latency is timed from one forward per run with a timestamp as each exit's
logits appear (a *staged* model, with ``stages`` and ``heads`` module lists,
is run stage by stage; any other model gets forward hooks on the module that
produces each exit), so one run yields all ``n_exits`` cumulative latencies
and timing costs a few forwards rather than one measurement per exit.
FLOPs come from ``torch.utils.flop_counter`` with the op graph traced, so
exit ``k`` counts exactly the ops it depends on. :func:`costs_from_cache`
reuses the costs recorded in another cache of the same network.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from eenet._validation import (EenetError, check_choice, check_costs, check_int, parse_costs,
                               resolve_device)
from eenet.ingest.forward import (batch_len, exit_logits, find_exit_modules, forward, grad_off,
                                  select_rows, to_device)

logger = logging.getLogger(__name__)

__all__ = ["ChosenCosts", "CostChoice", "CostReport", "choose_costs", "costs_from_cache",
           "given_costs", "measure_costs", "parse_cost_spec"]

CostChoice = Literal["measured", "flops"]


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CostReport:
    """Cumulative per-exit costs of a model, per sample.

    Attributes:
        latency_ms_batch1: [n_exits] median ms to produce each exit for one
            sample (one thread on CPU); ``None`` when not measured.
        latency_ms_batchB: [n_exits] median ms per sample at ``batch_size``
            (batch time / batch size); ``None`` when not measured.
        flops: [n_exits] FLOPs per sample counted by
            ``torch.utils.flop_counter`` (matmuls and convolutions).
        batch_size: the batch size of ``latency_ms_batchB``.
        num_threads: torch's CPU thread count for ``latency_ms_batchB``.
        device: where the latencies were measured.
        timing: ``"stages"`` (staged model), ``"hooks"``, or ``""``.
        exit_modules: the modules timed by hooks, one per exit (else empty).
    """

    latency_ms_batch1: np.ndarray | None
    latency_ms_batchB: np.ndarray | None
    flops: np.ndarray
    batch_size: int = 1
    num_threads: int = 1
    device: str = "cpu"
    timing: str = ""
    exit_modules: tuple[str, ...] = ()

    @property
    def n_exits(self) -> int:
        return int(self.flops.shape[0])

    def vectors(self) -> dict[str, np.ndarray]:
        """Every cost vector computed, by name (the cache's extra cost vectors)."""
        named = {"latency_ms_batch1": self.latency_ms_batch1,
                 "latency_ms_batchB": self.latency_ms_batchB, "flops": self.flops}
        return {k: v for k, v in named.items() if v is not None}

    def pick(self, kind: CostChoice) -> tuple[np.ndarray, str, str]:
        """The cost vector for ``kind`` with its unit and source.

        Returns:
            ``(costs [n_exits], cost_unit, cost_source)``: ``measured`` gives
            ``(latency_ms_batch1, "ms", "measured")``, ``flops`` gives
            ``(flops, "flops", "flops")``.
        """
        check_choice("cost kind", kind, ("measured", "flops"))
        if kind == "flops":
            return self.flops, "flops", "flops"
        if self.latency_ms_batch1 is None:
            raise EenetError("per-exit latency was not measured for this model; use "
                             "--costs flops or give explicit costs")
        return self.latency_ms_batch1, "ms", "measured"


@dataclass(frozen=True, eq=False)
class ChosenCosts:
    """The costs a cache records: the chosen vector, its unit and source, and the rest.

    Attributes:
        costs: [n_exits] the cache's ``costs``.
        unit: ``cost_unit``.
        source: ``cost_source`` (``measured``, ``flops`` or ``given``).
        extra: every other cost vector, by name ([n_exits] each).
        attrs: provenance written as root attributes (``num_threads``,
            ``timing``, ``costs_from``, ...).
    """

    costs: np.ndarray
    unit: str
    source: str
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain containers, for the state of a resumable run."""
        return {"costs": [float(c) for c in self.costs], "unit": self.unit,
                "source": self.source, "attrs": dict(self.attrs),
                "extra": {k: [float(c) for c in v] for k, v in self.extra.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ChosenCosts":
        return cls(np.asarray(obj["costs"], dtype=np.float64), str(obj["unit"]),
                   str(obj["source"]),
                   {k: np.asarray(v, dtype=np.float64) for k, v in obj["extra"].items()},
                   dict(obj["attrs"]))


def parse_cost_spec(costs: str | Sequence[float]) -> tuple[str, np.ndarray | None]:
    """``"measured"``/``"flops"``, or explicit numbers (a sequence or ``"1,2.5,4"``).

    Returns:
        ``(kind, values)``: ``("measured", None)``, ``("flops", None)`` or
        ``("given", float64 [n_exits])``.

    Example:
        >>> parse_cost_spec("1, 2.5,4")
        ('given', array([1. , 2.5, 4. ]))
    """
    if isinstance(costs, str) and costs.strip().lower() in ("measured", "flops"):
        return costs.strip().lower(), None
    return "given", check_costs(parse_costs(costs), name="costs")


def given_costs(given: np.ndarray, n_exits: int, unit: str = "ms") -> ChosenCosts:
    """Explicit costs, checked to have one value per exit; nothing is measured."""
    if given.size != n_exits:
        raise EenetError(f"costs has {given.size} values but the model has {n_exits} exits; "
                         f"give one cumulative cost per exit")
    return ChosenCosts(np.asarray(given, dtype=np.float64), unit, "given")


def choose_costs(kind: str, given: np.ndarray | None, report: CostReport,
                 unit_given: str = "ms") -> ChosenCosts:
    """The cache's costs from a parsed cost spec and a :class:`CostReport`."""
    if given is not None:
        chosen, unit, source = given_costs(given, report.n_exits).costs, unit_given, "given"
    else:
        chosen, unit, source = report.pick(kind)  # type: ignore[arg-type]
        if not np.any(chosen > 0):
            raise EenetError(f"every exit costs 0 {unit} by torch's counter (no matmul or "
                             f"convolution ops); use --costs measured or explicit costs")
    attrs = {"num_threads": report.num_threads, "timing": report.timing,
             "exit_modules": list(report.exit_modules), "costs_device": report.device}
    return ChosenCosts(np.asarray(chosen, dtype=np.float64), unit, source, report.vectors(),
                       attrs)


def costs_from_cache(path: str | os.PathLike, n_exits: int, *, model: str = "") -> ChosenCosts:
    """Reuse the cost vectors another cache recorded (``--costs-from VAL.h5``).

    Latency belongs to the network and the machine, not to the split: a test
    cache that copies the validation cache's vectors is measured in the same
    units as the thresholds fitted on validation. The copy is recorded in the
    root attribute ``costs_from``.

    Args:
        path: an exit cache of the same network.
        n_exits: the exit count the costs must have.
        model: this run's model, compared with the source's to warn on a mismatch.

    Raises:
        CacheError: the file is not an exit cache.
        EenetError: the source has another number of exits.
    """
    from eenet.cache import read_costs

    src = read_costs(path).matching(n_exits)
    if model and src.model and src.model != model:
        warnings.warn(f"--costs-from {path} was made with model {src.model}, not {model}; "
                      f"its costs are copied anyway", stacklevel=2)
    return ChosenCosts(src.costs, src.cost_unit, src.cost_source, dict(src.extra_costs),
                       dict(src.provenance))


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------
class _OpGraph(TorchDispatchMode):
    """Record every aten op's FLOPs and the earlier ops its inputs came from.

    Written by hand: ``FlopCounterMode`` totals FLOPs by module, but per-exit
    cumulative FLOPs need the ops each exit depends on, whatever order the
    forward (or TorchScript's scheduler) runs them in.
    """

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.flops: list[int] = []
        self.deps: list[tuple[int, ...]] = []
        self.producer: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while tracing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        deps = {self.producer[id(t)] for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and id(t) in self.producer}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        index = len(self.flops)
        self.flops.append(self.counter.get_total_flops() - before)
        self.deps.append(tuple(deps))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.producer[id(t)] = index
                self._alive.append(t)
        return out

    def ancestors(self, t: torch.Tensor) -> set[int]:
        start = self.producer.get(id(t))
        if start is None:
            return set()
        seen, todo = {start}, [start]
        while todo:
            for d in self.deps[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen


def _exit_flops(model: nn.Module, x1: Any) -> np.ndarray:
    """Cumulative FLOPs per exit for one sample: the ops that exits 0..k depend on."""
    counter = FlopCounterMode(display=False)
    with grad_off(model), counter, _OpGraph(counter) as graph:
        outs = model(x1)
    used: set[int] = set()
    flops = []
    for o in outs:
        used |= graph.ancestors(o)
        flops.append(sum(graph.flops[i] for i in used))
    return np.asarray(flops, dtype=np.float64)


# ---------------------------------------------------------------------------
# which module produces each exit
# ---------------------------------------------------------------------------
def _staged_parts(model: nn.Module, n_exits: int
                  ) -> tuple[list[nn.Module], list[nn.Module]] | None:
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.Module) or not isinstance(heads, nn.Module):
        return None
    try:
        if len(stages) != n_exits or len(heads) != n_exits:  # type: ignore[arg-type]
            logger.info("model has %d stages and %d heads for %d exits; not treating it as "
                        "staged", len(stages), len(heads), n_exits)  # type: ignore[arg-type]
            return None
        return ([stages[i] for i in range(n_exits)],  # type: ignore[index]
                [heads[i] for i in range(n_exits)])  # type: ignore[index]
    except (TypeError, IndexError, KeyError, RuntimeError):
        return None


def _run_staged(stages: Sequence[nn.Module], heads: Sequence[nn.Module], x: Any,
                mark: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """The staged forward, calling ``mark(k)`` as soon as exit ``k``'s logits exist."""
    outs = []
    for k, (stage, head) in enumerate(zip(stages, heads)):
        x = stage(x)
        outs.append(head(x))
        if mark is not None:
            mark(k)
    return outs


def _staged_agrees(stages: Sequence[nn.Module], heads: Sequence[nn.Module], x1: Any,
                   outs: Sequence[torch.Tensor]) -> bool:
    with grad_off(stages[0]):
        mine = _run_staged(stages, heads, x1)
    return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3,
                                                     atol=1e-4)
               for a, b in zip(mine, outs))


def _exit_modules_to_time(model: nn.Module, x1: Any, n_exits: int,
                          names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The module producing each exit (:func:`find_exit_modules`), to time with hooks."""
    if isinstance(model, torch.jit.ScriptModule):
        raise EenetError("cannot time each exit of a TorchScript model without stages and "
                         "heads (it takes no forward hooks); use --costs flops or give "
                         "explicit per-exit costs")
    try:
        return find_exit_modules(model, x1, n_exits, names)
    except EenetError as err:
        raise EenetError(f"{err}; or skip timing: --costs flops or explicit costs") from None


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _hooked(modules: Sequence[nn.Module], mark: Callable[[int], None]) -> Iterator[None]:
    handles = [m.register_forward_hook(lambda *_, k=k: mark(k)) for k, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Stamps:
    """Seconds from a run's start until each exit first appears, on CPU or CUDA.

    Written by hand: ``torch.utils.benchmark.Timer`` times a whole statement,
    while one run stamped at every exit gives all ``n_exits`` cumulative
    latencies at once. On CUDA the stamps are events, read after one
    synchronisation per run, so timing does not stall the stream between exits.
    """

    def __init__(self, n_exits: int, device: torch.device) -> None:
        self.n = n_exits
        self.cuda = device.type == "cuda"
        self.row: list[Any] = []

    def start(self) -> None:
        self.row = [None] * self.n
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def mark(self, k: int) -> None:
        if self.row[k] is not None:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.row[k] = ev
        else:
            self.row[k] = time.perf_counter()

    def seconds(self) -> list[float]:
        if any(s is None for s in self.row):
            raise EenetError("an exit module did not run during the forward; name the "
                             "modules that produce the exits with exit_modules")
        if self.cuda:
            self.row[-1].synchronize()
            return [self.t0.elapsed_time(e) / 1e3 for e in self.row]
        return [s - self.t0 for s in self.row]


def _time_runs(run: Callable[[Callable[[int], None]], Any], n_exits: int,
               device: torch.device, repeats: int, min_run_time: float) -> np.ndarray:
    """Median seconds to each exit over stamped runs, [n_exits].

    Two warm-up runs first (allocator, caches, lazy initialisation, thread
    pools); then at least 3 runs, stopping after ``repeats`` runs or once
    ``min_run_time`` seconds are spent. Every run's stamps increase across
    exits, so their per-exit medians do too.
    """
    stamps = _Stamps(n_exits, device)
    for _ in range(2):
        stamps.start()
        run(stamps.mark)
    rows = []
    started = time.perf_counter()
    while len(rows) < repeats and (len(rows) < 3 or
                                   time.perf_counter() - started < min_run_time):
        if stamps.cuda:
            torch.cuda.synchronize(device)
        stamps.start()
        run(stamps.mark)
        rows.append(stamps.seconds())
    return np.median(np.asarray(rows, dtype=np.float64), axis=0)


def _latencies(model: nn.Module, staged: tuple[list, list] | None,
               modules: Sequence[nn.Module], x: Any, n_exits: int, device: torch.device,
               threads: int, repeats: int, min_run_time: float) -> np.ndarray:
    """Median seconds to each exit for the batch ``x`` with ``threads`` CPU threads."""
    if staged is not None:
        def run(mark: Callable[[int], None]) -> Any:
            with grad_off(model):
                return _run_staged(*staged, x, mark)
    else:
        def run(mark: Callable[[int], None]) -> Any:
            with _hooked(modules, mark), grad_off(model):
                return model(x)
    with _num_threads(threads):
        return _time_runs(run, n_exits, device, repeats, min_run_time)


def measure_costs(model: nn.Module, example_input: Any, *,
                  device: str | torch.device, batch_size: int, repeats: int = 100,
                  min_run_time: float = 0.2, exit_modules: Sequence[str] | None = None,
                  timing: bool = True) -> CostReport:
    """Measure the cumulative latency and FLOPs of every exit, per sample.

    Latency is the median time to produce exit ``k``, counting the backbone
    up to it and every head at or before it. Each run is one forward stamped
    as every exit's logits appear: staged models (``stages``/``heads``) run
    stage by stage, other models get forward hooks on the module producing
    each exit (named in ``exit_modules`` or found by matching the returned
    tensors). ``latency_ms_batch1`` is measured at batch 1 with one thread on
    CPU; ``latency_ms_batchB`` at ``batch_size`` with torch's thread count,
    divided by ``batch_size``. FLOPs come from ``torch.utils.flop_counter`` at
    batch 1, counting for exit ``k`` every op that exits ``0..k`` depend on.

    Args:
        model: the multi-exit model (moved to ``device``, eval mode).
        example_input: a batch of model inputs [b, ...] with b >= 1; row 0 is
            the batch-1 input and the rows are cycled to fill ``batch_size``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: batch size of ``latency_ms_batchB``.
        repeats: timed runs per batch size, at most (at least 3 are made).
        min_run_time: seconds after which no further run starts, per batch
            size; small values make measuring fast and noisy.
        exit_modules: names (as in ``model.named_modules()``) of the module
            producing each exit, for non-staged models.
        timing: measure latencies; with ``False`` only FLOPs are counted.

    Returns:
        A :class:`CostReport`.

    Raises:
        EenetError: the forward breaks the contract, or per-exit timing is
            impossible (a TorchScript model without stages and heads, exits
            not produced by distinct submodules).

    Example:
        >>> import torch
        >>> from eenet.examples.models import MultiExitCNN
        >>> r = measure_costs(MultiExitCNN(4), torch.zeros(1, 1, 28, 28), device="cpu",
        ...                   batch_size=8, min_run_time=0.01)
        >>> bool((r.flops[1:] > r.flops[:-1]).all())
        True
    """
    dev = resolve_device(device)
    batch_size = check_int("batch_size", batch_size, 1)
    repeats = check_int("repeats", repeats, 1)
    if not min_run_time > 0:
        raise EenetError(f"min_run_time must be positive, got {min_run_time}")
    n_rows = batch_len(example_input)
    x1 = to_device(select_rows(example_input, torch.zeros(1, dtype=torch.long)), dev)
    model = model.to(dev).eval()
    outs = forward(model, x1, "the example input")
    n_exits = exit_logits(outs, 1).shape[1]
    flops = _exit_flops(model, x1)
    threads = torch.get_num_threads()
    if not timing:
        return CostReport(None, None, flops, batch_size=batch_size, num_threads=threads,
                          device=str(dev))
    xb = to_device(select_rows(example_input, torch.arange(batch_size) % n_rows), dev)
    staged = _staged_parts(model, n_exits)
    if staged is not None and not _staged_agrees(*staged, x1, outs):
        logger.warning("the model's stages and heads do not reproduce its forward; timing "
                       "exits with hooks instead")
        staged = None
    found = [] if staged is not None else _exit_modules_to_time(model, x1, n_exits,
                                                                exit_modules)
    modules = [m for _, m in found]
    one = 1 if dev.type == "cpu" else threads
    # Batch B first: its warm-up also warms the thread pool and allocator for batch 1.
    tb = _latencies(model, staged, modules, xb, n_exits, dev, threads, repeats, min_run_time)
    t1 = _latencies(model, staged, modules, x1, n_exits, dev, one, repeats, min_run_time)
    lat1, latb = t1 * 1e3, tb * 1e3 / batch_size
    method = "stages" if staged is not None else "hooks"
    logger.info("per-exit latency (%s, %s): batch 1 %s ms, batch %d %s ms/sample; FLOPs %s",
                method, dev, np.array2string(lat1, precision=4), batch_size,
                np.array2string(latb, precision=4), np.array2string(flops, precision=0))
    return CostReport(lat1, latb, flops, batch_size=batch_size, num_threads=threads,
                      device=str(dev), timing=method,
                      exit_modules=tuple(n for n, _ in found))
