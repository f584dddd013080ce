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
import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from eenet._validation import resolve_device
from eenet.cache import ExitCache
from eenet.policy import ExitPolicy
from eenet.rules import Thresholds
from eenet.runtime.model import EarlyExitModel

__all__ = ["choose_overhead", "policy_overhead"]

_ROUNDS = 3  # timings per exit, interleaved; their median counts


class _FixedHead(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, h: Tensor) -> Tensor:
        return self.logits


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
                    min_run_time: float = 0.1) -> np.ndarray | None:
    """The policy's own cost ``O_k`` for a sample leaving at each exit, in the cache's unit.

    Args:
        policy: a policy whose scorer is fitted (its rule is not used).
        cache: the cache the costs come from: ``ms`` costs get a timing on
            ``device`` (default: the device the cache was measured on when it is
            available here, else the CPU), ``flops`` costs a FLOP count; other
            units get ``None`` (the overhead cannot be expressed in them).
        device: where to time.
        min_run_time: seconds per timing (``Timer.blocked_autorange``).

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
    net = _StandIn(k_exits, n_classes, dev)
    x = torch.zeros(1, 1, device=dev)
    served = [EarlyExitModel(net, _leaving_at(policy, k)) for k in range(k_exits)]
    if cache.cost_unit == "flops":
        out = np.empty(k_exits)
        for k, model in enumerate(served):
            with FlopCounterMode(display=False) as counter:
                model(x)
            out[k] = counter.get_total_flops()
        return np.maximum.accumulate(out)
    # Rounds interleaved over the exits, so a burst of load on a shared machine spreads over
    # every exit instead of landing on one; the median round counts, as the cache's costs
    # are medians too.
    rounds = np.empty((_ROUNDS, k_exits))
    threads = 1 if dev.type == "cpu" else torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(_ROUNDS):
            for k, model in enumerate(served):
                timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                                        num_threads=threads)
                rounds[r, k] = timer.blocked_autorange(
                    min_run_time=min_run_time / _ROUNDS).median * 1e3
    out = np.median(rounds, axis=0)
    return np.maximum.accumulate(out)  # timing noise between near-equal exits


def _cache_device(cache: ExitCache) -> str:
    measured_on = str(cache.attrs.get("device", "") or "cpu")
    if measured_on.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return measured_on if measured_on.startswith(("cpu", "cuda")) else "cpu"


def choose_overhead(mode: str, cache: ExitCache):
    """What ``--overhead auto|on|off`` means for ``cache``: :func:`policy_overhead` or None.

    ``auto`` counts the policy's own cost when the cache's costs were measured
    (latency or FLOPs: the policy's cost can be measured the same way) and not
    when they were given (their unit and machine are unknown here).
    """
    if mode == "off" or (mode == "auto" and cache.cost_source not in ("measured", "flops")):
        return None
    return policy_overhead
