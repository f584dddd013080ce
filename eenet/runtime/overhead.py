"""The policy's own cost: what serving a policy adds to the network, per exit taken.

A cached cost ``c_k`` is the network's: the stages and heads up to exit k. A
served policy also scores exits 0..k, compares each score with its threshold,
keeps its bookkeeping and writes the answer. :func:`policy_overhead` measures
that, ``O_k`` for a sample that leaves at exit k, by running the real runtime
(:class:`~eenet.runtime.model.EarlyExitModel`, the real scorer) around a stand-in
network whose stages do nothing and whose heads return fixed logits, with
thresholds that make the sample leave exactly at k. It is measured as
``eenet cache`` measures the network: ``torch.utils.benchmark`` at batch 1 on
one thread (CPU), warm-up, repeats, the median; three such medians per exit,
interleaved across the exits, and the median of those. With FLOP costs it counts the
policy's FLOPs with ``torch.utils.flop_counter`` instead.

Calibration then spends the budget on ``c_k + O_k``
(:meth:`eenet.policy.ExitPolicy.costs_for`), so the budget a policy is fitted
to is the budget its runtime spends.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from eenet._validation import EenetError, first_line, resolve_device
from eenet.cache import ExitCache
from eenet.policy import ExitPolicy
from eenet.rules import Thresholds
from eenet.scores.eenet_kernel import torch_only
from eenet.ingest.forward import select_rows, to_device
from eenet.runtime.model import EarlyExitModel, staged_parts

__all__ = ["choose_overhead", "policy_overhead", "warn_on_drift"]

logger = logging.getLogger(__name__)
_ROUNDS = 3  # timings per exit, interleaved; their median counts


class _FixedHead(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, h: Tensor) -> Tensor:
        return self.logits.expand(h.shape[0], -1)  # [batch, n_classes]


class _StandIn(nn.Module):
    """A staged network that costs nothing: identity stages, heads with fixed logits."""

    def __init__(self, n_exits: int, n_classes: int, device: torch.device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stages = nn.ModuleList([nn.Identity() for _ in range(n_exits)])
        self.heads = nn.ModuleList([_FixedHead(torch.randn(1, n_classes, generator=gen))
                                    for _ in range(n_exits)])
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # carries the device
        self.to(device)


def _leaving_at(policy: ExitPolicy, k: int) -> ExitPolicy:
    """A copy of ``policy`` whose rule sends every sample to exit k, scoring exits 0..k."""
    forced = copy.copy(policy)
    values = np.full(policy.rule.n_exits, np.inf)  # type: ignore[union-attr]
    values[k] = -np.inf
    forced.rule = Thresholds(values)
    return forced


def policy_overhead(policy: ExitPolicy, cache: ExitCache, *, device: str | None = None,
                    min_run_time: float = 0.3, model: nn.Module | None = None,
                    example_input: Any = None, batch: int = 1,
                    statistic: Literal["median", "paired"] | None = None
                    ) -> np.ndarray | None:
    """The policy's own cost ``O_k`` for a sample leaving at each exit, in the cache's unit.

    Without ``model`` the runtime is timed around a stand-in network that
    costs nothing. With the real staged ``model`` and one ``example_input``
    [1, ...], ``O_k`` is the runtime's time leaving at exit k minus the
    network's own time up to exit k, both timed the same way: this also
    counts what serving costs between the network's kernels (caches the
    layers evict, allocations), which the stand-in does not see.

    Args:
        policy: a policy whose scorer is fitted (its rule is not used).
        cache: the cache the costs come from: ``ms`` costs get a timing on
            ``device`` (default: the device the cache was measured on when it is
            available here, else the CPU), ``flops`` costs a FLOP count; other
            units get ``None`` (the overhead cannot be expressed in them).
        device: where to time.
        min_run_time: seconds per timing (``Timer.blocked_autorange``).
        model: the staged network the cache came from (optional, see above).
        example_input: one input of ``model``, with the batch dimension.
        batch: time batches of this many copies of the input, every sample
            leaving at the same exit; the result is per sample (serving
            decides at batch 1, the default).
        statistic: ``"median"`` (interleaved medians, as the cache's costs are
            measured) or ``"paired"``: inside the network, the median difference
            of blocks of about 0.5 ms timed back to back, around the stand-in the
            fastest block. Default: ``"paired"`` inside the network, where the own
            cost is a difference of two timings and a machine whose speed drifts
            within seconds makes a difference of two medians timed apart
            meaningless (a decision of tens of µs measured at 0.34 ms); ``"median"``
            around the stand-in.

    Returns:
        float64 [n_exits], non-decreasing, or ``None``.
    """
    if cache.cost_unit not in ("ms", "flops"):
        return None
    dev = resolve_device(device or _cache_device(cache))
    k_exits, n_classes = cache.n_exits, cache.n_classes
    if policy.rule is None:  # only the scorer matters; any rule of the right size will do
        policy = copy.copy(policy)
        policy.rule = Thresholds(np.full(k_exits, np.inf))
    real = model is not None and cache.cost_unit == "ms"
    net = model.to(dev).eval() if real else _StandIn(k_exits, n_classes, dev)
    copies = torch.zeros(batch, dtype=torch.long)  # [batch] row 0, repeated
    x = select_rows(to_device(example_input, dev), copies) if real else torch.zeros(
        batch, 1, device=dev)
    served = [EarlyExitModel(net, _leaving_at(policy, k)) for k in range(k_exits)]
    if cache.cost_unit == "flops":
        out = np.empty(k_exits)
        for k, run in enumerate(served):
            with FlopCounterMode(display=False) as counter, torch_only():
                run(x)
            out[k] = counter.get_total_flops() / batch
        return np.maximum.accumulate(out)
    runs = [lambda run=run: run(x) for run in served]
    network = None
    if real:  # the network alone, truncated after each exit, to subtract
        stages, heads = staged_parts(net)
        network = [lambda k=k: _truncated(stages, heads, k, x) for k in range(k_exits)]
    if statistic is None:
        statistic = "paired" if real else "median"
    if statistic == "paired":
        out = _paired(runs, network, dev, min_run_time) / batch
    else:
        times = _interleaved_medians(runs + (network or []), dev, min_run_time)
        out = (times[:k_exits] - (times[k_exits:] if real else 0.0)) / batch
    return np.maximum.accumulate(np.maximum(out, 0.0))  # timing noise between near-equal exits


@torch.inference_mode()
def _truncated(stages: nn.ModuleList, heads: nn.ModuleList, k: int, x: Any) -> Any:
    h = x
    for j in range(k + 1):
        h = stages[j](h)
        heads[j](h)
    return h


def _interleaved_medians(runs: list[Callable[[], Any]], dev: torch.device,
                         min_run_time: float) -> np.ndarray:
    """Median ms of each call over rounds interleaved across the calls.

    Interleaving spreads a burst of load on a shared machine over every call
    instead of landing on one; the median round counts, as the cache's costs
    are medians too.
    """
    rounds = np.empty((_ROUNDS, len(runs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(_ROUNDS):
            for i, run in enumerate(runs):
                rounds[r, i] = _timer(run, dev).blocked_autorange(
                    min_run_time=min_run_time / _ROUNDS).median * 1e3
    return np.median(rounds, axis=0)


def _paired(runs: list[Callable[[], Any]], minus: list[Callable[[], Any]] | None,
            dev: torch.device, min_run_time: float) -> np.ndarray:
    """ms of ``runs[k]`` minus ``minus[k]``: the median over alternating blocks of about
    0.5 ms of their difference (without ``minus``, the fastest block of ``runs[k]``).

    A core's speed can drift within seconds (the host, another job on its
    sibling thread); blocks timed back to back see the same drift, so their
    difference cancels it where two separate medians do not.
    """
    out = np.empty(len(runs))
    seconds = min_run_time / len(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, run in enumerate(runs):
            timers = [_timer(run, dev)] + ([_timer(minus[k], dev)] if minus else [])
            number = max(1, int(5e-4 / max(timers[0].timeit(1).mean, 1e-7)))
            diffs, spent = [], 0.0
            while spent < seconds or len(diffs) < 5:
                blocks = [t.timeit(number).mean for t in timers]
                diffs.append(blocks[0] - sum(blocks[1:]))
                spent += sum(blocks) * number
            out[k] = (np.median(diffs) if minus else min(diffs)) * 1e3
    return out


def _timer(run: Callable[[], Any], dev: torch.device) -> benchmark.Timer:
    threads = 1 if dev.type == "cpu" else torch.get_num_threads()
    return benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads)


def _cache_device(cache: ExitCache) -> str:
    measured_on = str(cache.attrs.get("device", "") or "cpu")
    if measured_on.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return measured_on if measured_on.startswith(("cpu", "cuda")) else "cpu"


def choose_overhead(mode: str, cache: ExitCache):
    """What ``--overhead auto|on|model|off`` means for ``cache``: a measuring function or None.

    ``model`` times the runtime inside the network the cache came from (its
    recorded model, weights and dataset, loaded here), which also counts what
    serving costs between the network's kernels; ``on`` times it around a
    stand-in network that costs nothing; ``off`` charges nothing. ``auto``
    charges the policy's cost when the cache's costs were measured (latency or
    FLOPs: the policy's can be measured the same way), not when they were given
    (their unit and machine are unknown here): inside the recorded network when
    the costs are latencies and that network loads here, around the stand-in
    otherwise. On the bundled networks the in-network figure is the one that
    lands the served latency on the budget (benchmarks/RESULTS.md, serving).
    """
    if mode == "off" or (mode == "auto" and cache.cost_source not in ("measured", "flops")):
        return None
    if mode == "on":
        return policy_overhead
    if mode == "auto":
        if cache.cost_unit != "ms":
            return policy_overhead
        try:
            model, example = _recorded_network(cache)
        except (EenetError, OSError, ImportError) as err:
            logger.info("policy overhead timed around a stand-in network: %s", first_line(err))
            return policy_overhead
    else:
        model, example = _recorded_network(cache)
    warn_on_drift(model, example, cache)

    def inside_the_network(policy: ExitPolicy, fitted_on: ExitCache, **options: Any
                           ) -> np.ndarray | None:
        return policy_overhead(policy, fitted_on, model=model, example_input=example, **options)
    return inside_the_network


def warn_on_drift(model: nn.Module, example: Any, cache: ExitCache) -> None:
    """Re-time the network's exits and warn when they drifted more than 5% from the
    cache's measured latencies (:mod:`eenet.runtime.drift`).

    It warns and does not rescale: the drift is the machine's state at this
    moment (another job's load, a clock), which may not be its state when the
    policy serves, and a rescaled budget would no longer match the costs the
    cache, ``evaluate`` and ``sweep`` report. Re-caching re-times every split
    consistently.
    """
    if cache.cost_unit != "ms" or cache.cost_source != "measured":
        return
    from eenet.runtime.drift import measure_drift

    drift = measure_drift(model, example, cache.costs, device=_cache_device(cache))
    logger.info("exit costs now vs the cache's: %s", drift.describe())
    if drift.exceeds():
        warnings.warn(drift.advice(), stacklevel=3)


def _recorded_network(cache: ExitCache) -> tuple[nn.Module, Any]:
    """The staged network and one input of the dataset ``cache`` was made from."""
    from eenet.ingest.data import load_dataset
    from eenet.ingest.model import load_model

    if not cache.model or not cache.dataset:
        raise EenetError(f"{cache.path or 'the cache'} records no model or dataset to load; "
                         f"use --overhead on (a stand-in network) instead of model")
    model = load_model(cache.model, cache.attrs.get("weights") or None, "cpu")
    staged_parts(model)  # the runtime needs stages and heads
    item = load_dataset(cache.dataset)[0][0]
    x = item[None] if isinstance(item, Tensor) else select_rows(item, torch.zeros(1).long())
    return model, x
