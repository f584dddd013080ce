"""Serve a fitted policy on the real network: really stop computing, and measure what it costs.

- :class:`~eenet.runtime.model.EarlyExitModel`: a staged model plus a policy,
  batched, skipping every stage a sample does not need;
- :class:`~eenet.runtime.hooks.HookedEarlyExit`: batch-1 early exit for models
  that only expose their exit modules;
- :func:`~eenet.runtime.overhead.policy_overhead`: the policy's own cost per
  exit, measured like the network's, for calibration to include;
- :func:`~eenet.runtime.bench.bench_policy`: realized latency per sample against
  the budget, at batch 1 and at a serving batch size;
- :func:`~eenet.runtime.drift.measure_drift`: the network's exit costs re-timed
  now against the cache's (bench reports it, fit warns with it).
"""
from __future__ import annotations

from eenet.runtime.hooks import HookedEarlyExit
from eenet.runtime.model import EarlyExitModel, EarlyExitOutput, staged_parts

__all__ = ["EarlyExitModel", "EarlyExitOutput", "HookedEarlyExit", "staged_parts"]
