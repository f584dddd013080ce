"""Serve a policy over a dataset split and measure the latency it really delivers.

:func:`serve` runs an :class:`~eenet.runtime.model.EarlyExitModel` over a
dataset (``eenet run``); :func:`bench_policy` times it (``eenet bench``): the
realized mean latency per sample at batch 1 (one thread on CPU, as the cache's
costs are measured) and at a serving batch size, the throughput, next to the
full network run the same way and to the policy's simulated cost (the cached
costs plus the policy's own, at the exits the runtime took). Inputs are
moved to the device before the clock starts, so data loading is not timed;
on CUDA the clock is a pair of CUDA events around the run.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from eenet._validation import EenetError, first_line, network_fingerprint, resolve_device
from eenet.ingest.forward import to_device
from eenet.ingest.resolve import describe
from eenet.runtime.drift import DRIFT_LIMIT, CostDrift, measure_drift
from eenet.runtime.model import EarlyExitModel, EarlyExitOutput

__all__ = ["BenchResult", "ServedSplit", "bench_policy", "check_served_network", "serve"]


@dataclass(frozen=True)
class ServedSplit:
    """Per-sample results of serving a split, in dataset order.

    Attributes:
        prediction, exit: int64 [n_samples].
        score: float64 [n_samples] (NaN at the last exit).
        label: int64 [n_samples] (-1 where the dataset gives none).
    """

    prediction: np.ndarray
    exit: np.ndarray
    score: np.ndarray
    label: np.ndarray

    @property
    def n_samples(self) -> int:
        return int(self.exit.size)


def _inputs(dataset: Any, limit: int | None, batch_size: int) -> Iterator[tuple[Any, Any]]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    seen = 0
    for x, y in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + len(y) > limit:
            keep = limit - seen
            x = x[:keep] if isinstance(x, torch.Tensor) else x
            y = y[:keep]
        seen += len(y)
        yield x, y


def serve(served: EarlyExitModel, dataset: Any, *, batch_size: int = 256,
          device: str = "cpu", limit: int | None = None, verbose: bool = False) -> ServedSplit:
    """Run ``served`` over ``dataset`` in order; samples are numbered from 0 (their ids).

    Args:
        served: the early-exit model.
        dataset: (input, label) pairs.
        batch_size: samples per forward.
        device: where to run.
        limit: serve only the first ``limit`` samples.
        verbose: progress bar on stderr.

    Raises:
        EenetError: the network is not the policy's (its fingerprint, its class
            count), the inputs do not suit it, or the labels lie outside its classes.
    """
    check_served_network(served)
    dev = resolve_device(device)
    served.to(dev)
    outs: list[EarlyExitOutput] = []
    labels: list[np.ndarray] = []
    start = 0
    bar = tqdm(desc="serving", unit="sample", disable=not verbose)
    for x, y in _inputs(dataset, limit, batch_size):
        n = len(y)
        ids = torch.arange(start, start + n)
        outs.append(_run_checked(served, to_device(x, dev, non_blocking=dev.type == "cuda"),
                                 ids, start))
        labels.append(np.asarray(y, dtype=np.int64))
        start += n
        bar.update(n)
    bar.close()
    if not outs:
        raise EenetError("the dataset yielded no samples")
    _check_served_labels(np.concatenate(labels), served.n_classes)
    return ServedSplit(prediction=torch.cat([o.prediction for o in outs]).cpu().numpy(),
                       exit=torch.cat([o.exit for o in outs]).cpu().numpy(),
                       score=torch.cat([o.score for o in outs]).cpu().numpy(),
                       label=np.concatenate(labels))


def check_served_network(served: EarlyExitModel) -> None:
    """Refuse a network whose parameters are not those of the network the policy was
    fitted on, when the policy records them (:meth:`ExitPolicy.check_network`)."""
    policy = served.policy
    if policy.reference and policy.reference.get("network_sha256"):
        policy.check_network(network_fingerprint(served.model))


def _run_checked(served: EarlyExitModel, x: Any, ids: torch.Tensor, start: int
                 ) -> EarlyExitOutput:
    """``served(x, ids)``; inputs the network cannot take become one line naming them."""
    try:
        return served(x, ids)
    except EenetError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise EenetError(f"the network failed on the batch from sample {start} (input "
                         f"{describe(x)}): {type(err).__name__}: {first_line(err)}; check that "
                         f"the dataset's inputs suit the model") from err


def _check_served_labels(labels: np.ndarray, n_classes: int) -> None:
    """Labels int64 [n_samples] must be class indices of the policy's network (-1: none)."""
    bad = (labels < -1) | (labels >= n_classes)
    if bad.any():
        raise EenetError(f"the dataset's labels must lie in [0, {n_classes}) for the policy's "
                         f"{n_classes} classes, got range [{labels.min()}, {labels.max()}] "
                         f"({int(bad.sum())} outside); check that the data belong to the "
                         f"network's task")


@dataclass(frozen=True)
class BenchResult:
    """What ``eenet bench`` measures (times in ms per sample).

    Attributes:
        method, budget, cost_unit: the policy's.
        n_samples: samples timed at the serving batch size (batch 1 times
            the first ``n_batch1`` of them).
        batch_size, device, threads: how it ran.
        latency_ms_batch1: realized mean latency per sample at batch 1.
        latency_ms_batchB: realized time per sample at ``batch_size``.
        throughput: samples per second at ``batch_size``.
        full_ms_batch1, full_ms_batchB, full_throughput: the whole network, run the same way.
        simulated_cost: the policy's cost at the exits taken: the cached costs
            plus its own (when it counts it), averaged over the samples.
        exit_fractions: share of samples leaving at each exit.
        accuracy: at the exits taken (NaN without labels).
        drift: the network's exit costs re-timed now against the cache's
            (:mod:`eenet.runtime.drift`), for the full model and each exit
            reached; ``None`` when the costs are not latencies.
    """

    method: str
    budget: float
    cost_unit: str
    n_samples: int
    n_batch1: int
    batch_size: int
    device: str
    threads: int
    latency_ms_batch1: float
    latency_ms_batchB: float
    throughput: float
    full_ms_batch1: float
    full_ms_batchB: float
    full_throughput: float
    simulated_cost: float
    exit_fractions: tuple[float, ...]
    accuracy: float
    drift: CostDrift | None = None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["exit_fractions"] = ";".join(f"{f:.4f}" for f in self.exit_fractions)
        drift = row.pop("drift") and self.drift
        row["cost_drift_full"] = drift.full_model if drift else math.nan
        row["cost_drift_by_exit"] = ";".join(
            f"{k}:{r:+.4f}" for k, r in zip(drift.exits, drift.relative)) if drift else ""
        return row

    def format_table(self) -> str:
        has_budget = math.isfinite(self.budget) and self.budget > 0
        ratio = (f"{self.latency_ms_batch1 / self.budget:.3f}" if has_budget
                 else "- (no budget: risk control alone)")
        budget = f"{self.budget:.4g} {self.cost_unit}" if has_budget else "none"
        return "\n".join([
            f"method {self.method}   budget {budget}   device "
            f"{self.device}   {self.n_samples} samples",
            f"{'':24}{'early exit':>12}{'full model':>12}{'speed-up':>10}",
            f"{'batch 1, ms/sample':24}{self.latency_ms_batch1:>12.4f}"
            f"{self.full_ms_batch1:>12.4f}{self.full_ms_batch1 / self.latency_ms_batch1:>10.2f}",
            f"{f'batch {self.batch_size}, ms/sample':24}{self.latency_ms_batchB:>12.4f}"
            f"{self.full_ms_batchB:>12.4f}{self.full_ms_batchB / self.latency_ms_batchB:>10.2f}",
            f"{f'batch {self.batch_size}, samples/s':24}{self.throughput:>12.0f}"
            f"{self.full_throughput:>12.0f}",
            f"realized batch-1 latency / budget {ratio}   simulated cost "
            f"{self.simulated_cost:.4g} {self.cost_unit}   accuracy {self.accuracy:.4f}",
            "exit fractions " + " ".join(f"{f:.3f}" for f in self.exit_fractions),
            *self._drift_lines()])

    def _drift_lines(self) -> list[str]:
        if self.drift is None:
            return []
        over = f"   over {100 * DRIFT_LIMIT:.0f}%: re-cache and fit again" \
            if self.drift.exceeds() else ""
        return [f"network vs cache: {self.drift.describe()}{over}"]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _clock(run: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``run`` takes (CUDA events on a GPU)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        begin.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / 1e3
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def bench_policy(served: EarlyExitModel, dataset: Any, *, batch_size: int = 256,
                 device: str = "cpu", limit: int | None = None, n_batch1: int = 1000,
                 repeats: int = 3, verbose: bool = False) -> BenchResult:
    """Time a served policy against the full network on a dataset split.

    Args:
        served: the early-exit model (its ``model`` is the full network).
        dataset: (input, label) pairs.
        batch_size: the serving batch size.
        device: where to run.
        limit: use only the first ``limit`` samples.
        n_batch1: samples timed one at a time (the first of the split).
        repeats: passes over the data per measurement, the early-exit model's and
            the full network's alternating; the fastest of each counts (the one
            least disturbed by the rest of the machine).
        verbose: progress on stderr.
    """
    dev = resolve_device(device)
    # served first: inputs, labels or classes that do not fit are refused before any timing
    result = serve(served, dataset, batch_size=batch_size, device=str(dev), limit=limit,
                   verbose=verbose)
    batches = [(to_device(x, dev), y) for x, y in _inputs(dataset, limit, batch_size)]
    if not batches:
        raise EenetError("the dataset yielded no samples")
    n = sum(len(y) for _, y in batches)
    singles = [(to_device(x, dev), y) for x, y in _inputs(dataset, min(n_batch1, n), 1)]
    full: nn.Module = served.model
    policy = served.policy
    one = 1 if dev.type == "cpu" else None

    def over(items: list, fn: Callable[[Any], Any]) -> Callable[[], None]:
        def run() -> None:
            for x, _ in items:
                fn(x)
        return run

    def best(items: list, threads: int | None) -> tuple[float, float]:
        """Fastest pass of the early-exit model and of the full one, passes alternating so
        both see the same moments of a machine whose speed drifts."""
        runs = (over(items, served), over(items, full))
        with _threads(threads), torch.inference_mode():
            for fn in (served, full):
                over(items[:2], fn)()  # warm-up
            passes = [[_clock(run, dev) for run in runs] for _ in range(repeats)]
        return tuple(min(p[i] for p in passes) for i in range(2))  # type: ignore[return-value]

    t_b1, t_full1 = best(singles, one)
    t_bb, t_fullb = best(batches, None)
    costs = np.asarray(policy.reference["costs"], dtype=np.float64)  # type: ignore[index]
    if policy.overhead is not None:
        costs = costs + policy.overhead
    labelled = result.label >= 0
    accuracy = float((result.prediction == result.label)[labelled].mean()) \
        if labelled.any() else math.nan
    k_exits = served.n_exits
    fractions = np.bincount(result.exit, minlength=k_exits) / result.n_samples
    drift = _drift(served, singles[0][0], dev, np.flatnonzero(fractions))
    return BenchResult(
        method=policy.method.name, budget=float(policy.budget or math.nan),
        cost_unit=str(policy.reference["cost_unit"]), n_samples=n,  # type: ignore[index]
        n_batch1=len(singles), batch_size=batch_size, device=str(dev),
        threads=torch.get_num_threads(), latency_ms_batch1=t_b1 * 1e3 / len(singles),
        latency_ms_batchB=t_bb * 1e3 / n, throughput=n / t_bb,
        full_ms_batch1=t_full1 * 1e3 / len(singles), full_ms_batchB=t_fullb * 1e3 / n,
        full_throughput=n / t_fullb, simulated_cost=float(costs[result.exit].mean()),
        exit_fractions=tuple(float(f) for f in fractions), accuracy=accuracy, drift=drift)


def _drift(served: EarlyExitModel, x1: Any, device: torch.device, reached: np.ndarray
           ) -> CostDrift | None:
    """The network's exit costs now against the cache's, when those are measured
    latencies (warns above :data:`~eenet.runtime.drift.DRIFT_LIMIT`)."""
    reference = served.policy.reference or {}
    if reference.get("cost_unit") != "ms" or reference.get("cost_source") != "measured":
        return None
    drift = measure_drift(served.model, x1, reference["costs"], device=str(device),
                          exits=[int(k) for k in reached])
    if drift.exceeds():
        warnings.warn(drift.advice(), stacklevel=3)
    return drift
