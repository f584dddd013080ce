"""The caching runs: settle the costs, then stream a loaded model's exits into a cache.

:func:`eenet.ingest.model.cache_model` loads the model and the data into a
:class:`CacheJob` and calls one of:

- :func:`run_single`: one process, straight into the cache (a writer thread
  compresses and writes while the model computes);
- :func:`run_resumable`: progress kept chunk by chunk next to the output
  (:class:`~eenet.ingest.stream.PartialRun`), a killed run continued;
- :func:`run_distributed`: the split sharded over ``torchrun`` ranks and merged
  (:mod:`eenet.ingest.distributed`), resumable too.

The costs are settled once per run: copied from another cache, given, or
measured (:mod:`eenet.ingest.costs`); a resumed run reuses the ones it saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from eenet import __version__
from eenet._validation import (CacheError, EenetError, check_choice, check_int,
                               network_fingerprint)
from eenet.cache import CacheWriter, merge_shards
from eenet.ingest.costs import (ChosenCosts, choose_costs, costs_from_cache, given_costs,
                                measure_costs, parse_cost_spec)
from eenet.ingest.distributed import DistContext, ShardSampler, run_sharded, step
from eenet.ingest.features import FeatureCapture
from eenet.ingest.forward import make_loader, stream_batches
from eenet.ingest.stream import BackgroundWriter, ChunkDirWriter, PartialRun

logger = logging.getLogger(__name__)

__all__ = ["CacheJob", "CacheOptions", "options_from", "run_distributed", "run_resumable",
           "run_single"]


@dataclass(frozen=True)
class CacheOptions:
    """Everything :func:`cache_model` can be told besides the model, the data and the output.

    Attributes:
        weights: state dict for the model (``torch.load(weights_only=True)``).
        data_dir: where a registered dataset's files lie.
        split: split name to record; parsed from ``NAME:SPLIT`` when ``None``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: samples per forward (also the batch of ``latency_ms_batchB``).
        num_workers: DataLoader worker processes.
        limit: cache only the first ``limit`` samples.
        costs: ``"measured"`` (``latency_ms_batch1``, ms), ``"flops"``, or explicit
            cumulative numbers (one per exit; a sequence or ``"1,2.5,4"``), recorded
            as ``given``.
        cost_unit: the unit of explicit costs.
        costs_from: reuse the cost vectors of this cache (``--costs-from``).
        timing: time every exit; ``None`` times only for ``measured`` costs,
            ``True`` also stores latencies beside flops or given costs.
        exit_modules: module names producing each exit, for hook timing.
        dtype: storage dtype of the logits.
        autocast: run the forward under ``torch.autocast``; recorded.
        seed: torch seed for the run (restored afterwards), recorded.
        min_run_time, repeats: timing effort, see :func:`~eenet.ingest.costs.measure_costs`.
        verbose: progress bar on stderr.
        resume: keep progress next to the output and continue a killed run of
            the same arguments (see :mod:`eenet.ingest.stream`).
        distributed: shard over ``torchrun`` ranks; ``None`` does so when
            ``WORLD_SIZE > 1`` (see :mod:`eenet.ingest.distributed`).
        features: also store every exit's hidden features, the input of its
            head's last linear layer (see :mod:`eenet.ingest.features`); one
            process, not resumable.
        feature_dim: the widest features stored; wider ones are projected.
    """

    weights: str | os.PathLike | None = None
    data_dir: str | os.PathLike | None = None
    split: str | None = None
    device: str = "auto"
    batch_size: int = 256
    num_workers: int = 0
    limit: int | None = None
    costs: str | Sequence[float] = "measured"
    cost_unit: str = "ms"
    costs_from: str | os.PathLike | None = None
    timing: bool | None = None
    exit_modules: Sequence[str] | None = None
    dtype: Literal["float32", "float16"] = "float32"
    autocast: bool = False
    seed: int = 0
    min_run_time: float = 0.2
    repeats: int = 100
    verbose: bool = True
    resume: bool = False
    distributed: bool | None = None
    features: bool = False
    feature_dim: int = 64

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("float32", "float16"))
        check_int("batch_size", self.batch_size, 1)
        check_int("num_workers", self.num_workers, 0)
        check_int("seed", self.seed, 0)
        check_int("repeats", self.repeats, 1)
        check_int("feature_dim", self.feature_dim, 1)
        if self.features and self.resume:
            raise EenetError("--features is written by a single uninterrupted run; drop "
                             "--resume (or --features)")
        if self.limit is not None:
            check_int("limit", self.limit, 1)
        if not self.min_run_time > 0:
            raise EenetError(f"min_run_time must be positive, got {self.min_run_time}")
        kind, _ = parse_cost_spec(self.costs)
        if self.costs_from is not None:
            if not (isinstance(self.costs, str) and self.costs == "measured"):
                raise EenetError("give either --costs or --costs-from, not both")
            if self.timing:
                raise EenetError("--costs-from copies the costs of another cache; drop "
                                 "--timing, or drop --costs-from to measure them here")
        elif kind == "measured" and self.timing is False:
            raise EenetError("measured costs need timing; drop --no-timing, or give "
                             "--costs flops, explicit costs or --costs-from")


_LEGACY = {"cost_unit_given": "cost_unit", "time_exits": "timing"}


def options_from(options: CacheOptions | None, kwargs: dict[str, Any]) -> CacheOptions:
    """``options`` (or the defaults) with ``kwargs`` as overrides, older names accepted."""
    for old, new in _LEGACY.items():  # earlier keyword names, still accepted
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
    names = {f.name for f in dataclasses.fields(CacheOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"cache_model() got unexpected keyword arguments {unknown}")
    return dataclasses.replace(options or CacheOptions(), **kwargs)



@dataclass
class CacheJob:
    """What one caching run works with, once the model and data are loaded."""

    model_spec: str
    data_spec: str
    opts: CacheOptions
    model: nn.Module
    dataset: Any
    device: torch.device
    example: Any
    n_exits: int
    n_classes: int
    n_rows: int | None  # None for an iterable dataset without --limit
    chunk_rows: int
    split: str
    capture: FeatureCapture | None = None  # with --features
    feature_dims: list[int] | None = None

    @property
    def n_chunks(self) -> int:
        assert self.n_rows is not None
        return -(-self.n_rows // self.chunk_rows)

    def rows_of(self, chunk: int) -> int:
        assert self.n_rows is not None
        return min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows)

    def writer_args(self, attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return dict(n_exits=self.n_exits, n_classes=self.n_classes, dtype=self.opts.dtype,
                    model=self.model_spec, dataset=self.data_spec, split=self.split,
                    attrs=dict(attrs or {}), with_sample_ids=True,
                    chunk_rows=self.chunk_rows, expected_rows=self.n_rows,
                    feature_dims=self.feature_dims,
                    feature_projections=None if self.capture is None else
                    self.capture.projections)



def _costs(job: CacheJob) -> ChosenCosts:
    """The cache's costs: copied (``costs_from``), or given/counted/measured here."""
    o = job.opts
    if o.costs_from is not None:
        return costs_from_cache(o.costs_from, job.n_exits, model=job.model_spec)
    kind, given = parse_cost_spec(o.costs)
    timing = o.timing if o.timing is not None else kind == "measured"
    if given is not None and not timing:  # nothing to measure: the run is one forward pass
        return given_costs(given, job.n_exits, o.cost_unit)
    report = measure_costs(job.model, job.example, device=job.device,
                           batch_size=o.batch_size, repeats=o.repeats,
                           min_run_time=o.min_run_time, exit_modules=o.exit_modules,
                           timing=timing)
    return choose_costs(kind, given, report, o.cost_unit)


def _attrs(job: CacheJob, costs: ChosenCosts, ctx: DistContext | None) -> dict[str, Any]:
    o = job.opts
    attrs = {"device": str(job.device), "seed": o.seed, "batch_size": o.batch_size,
             "num_threads": torch.get_num_threads(), "torch_version": str(torch.__version__),
             "weights": "" if o.weights is None else str(o.weights),
             "autocast": bool(o.autocast), "network_sha256": network_fingerprint(job.model),
             **costs.attrs}
    if job.capture is not None:
        attrs.update(feature_source="last_linear_input", feature_dim=o.feature_dim)
    if ctx is not None:
        attrs.update(world_size=ctx.world_size, cost_rank=0, distributed_backend=ctx.backend)
    return attrs


def _stream(job: CacheJob, sink: Any, *, chunks: Sequence[int] | None = None,
            skip: int = 0) -> None:
    """Run the model over the split's rows (``chunks`` of them, or all from ``skip``)
    and hand every batch to ``sink`` through a writer thread."""
    o = job.opts
    dataset, sampler, ids, limit = job.dataset, None, None, o.limit
    if not isinstance(dataset, IterableDataset):
        assert job.n_rows is not None
        chosen = range(job.n_chunks) if chunks is None else chunks
        sampler = ShardSampler(chosen, job.chunk_rows, job.n_rows)
        ids, limit = np.fromiter(sampler, np.int64, count=len(sampler)), None
        if ids.size == 0:
            return
    elif skip:
        dataset = _Skip(dataset, skip)
        limit = None if limit is None else limit - skip
    loader = make_loader(dataset, o.batch_size, o.num_workers, job.device, sampler)
    total = ids.size if ids is not None else limit
    show = o.verbose and int(os.environ.get("RANK", "0") or 0) == 0
    capture = job.capture if job.capture is not None else contextlib.nullcontext()
    with tqdm(total=total, desc="caching exits", unit="sample", file=sys.stderr,
              disable=not show) as bar, BackgroundWriter(sink) as writer, capture:
        for batch in stream_batches(job.model, loader, job.device, ids=ids, first_id=skip,
                                    limit=limit, autocast=o.autocast, bar=bar):
            feats = None if job.capture is None else job.capture.take(len(batch[1]))
            writer.put(*batch, features=feats)


class _Skip(IterableDataset):
    """An iterable dataset without its first ``n`` items (a resumed run)."""

    def __init__(self, dataset: IterableDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.dataset), self.n, None)


def run_single(job: CacheJob, out: Path) -> None:
    """Settle the costs and stream the whole split into ``out`` (atomically).

    The progress an interrupted ``--resume`` run kept towards ``out`` is deleted
    once ``out`` is complete: this run's whole output supersedes it.
    """
    costs = _costs(job)
    with CacheWriter(out, **job.writer_args(_attrs(job, costs, None))) as writer:
        _stream(job, writer)
        writer.set_costs(costs.costs, cost_unit=costs.unit, cost_source=costs.source,
                         extra=costs.extra)
    partial = PartialRun(out)
    if partial.dir.exists():
        partial.remove()
        logger.info("deleted %s, an interrupted run's progress: %s is now complete",
                       partial.dir, out)



def _spec(job: CacheJob) -> dict[str, Any]:
    """What decides the cache's contents; a resumed run must match it."""
    o = job.opts
    weights = ""
    if o.weights is not None:
        weights = hashlib.sha256(Path(o.weights).read_bytes()).hexdigest()
    kind, given = parse_cost_spec(o.costs)
    return {"eenet_version": __version__, "model": job.model_spec, "weights_sha256": weights,
            "data": job.data_spec, "data_dir": str(o.data_dir or ""), "split": job.split,
            "limit": o.limit, "n_rows": job.n_rows, "batch_size": o.batch_size,
            "chunk_rows": job.chunk_rows, "dtype": o.dtype, "seed": o.seed,
            "autocast": o.autocast, "device_type": job.device.type,
            "n_exits": job.n_exits, "n_classes": job.n_classes,
            "costs": kind if given is None else [float(c) for c in given],
            "cost_unit": o.cost_unit, "timing": o.timing,
            "costs_from": "" if o.costs_from is None else os.path.abspath(o.costs_from)}


def _partial_costs(job: CacheJob, run: PartialRun) -> ChosenCosts:
    """The costs of a resumable run: those an earlier run saved, or settled now and saved.

    The state directory is created only here, once the costs are known, so a
    run refused for bad input leaves nothing behind.
    """
    spec = _spec(job)
    saved = run.load_costs() if run.check(spec) else None
    if saved is not None:
        logger.info("resuming the interrupted run in %s", run.dir)
        return ChosenCosts.from_json(saved)
    costs = _costs(job)
    run.start(spec)
    run.save_costs(costs.to_json())
    return costs


def _write_pending(job: CacheJob, run: PartialRun, chunks: Sequence[int]) -> None:
    """Compute the chunks among ``chunks`` that the partial run does not hold yet."""
    done = run.done(chunks, job.rows_of)
    pending = [c for c in chunks if c not in done]
    logger.info("resumable run: %d of %d chunks done, %d to compute", len(done), len(chunks),
                len(pending))
    with ChunkDirWriter(run, chunk_rows=job.chunk_rows, n_exits=job.n_exits,
                        n_classes=job.n_classes, dtype=job.opts.dtype) as sink:
        _stream(job, sink, chunks=pending)


def _write_pending_iterable(job: CacheJob, run: PartialRun) -> int:
    """The iterable-dataset case: continue after the complete chunks; returns the chunk count."""
    n = 0
    while (chunk := run.read_chunk(n)) is not None and chunk[1].size == job.chunk_rows:
        n += 1
    if run.read_chunk(n) is None:  # no short last chunk: the stream had not ended
        with ChunkDirWriter(run, chunk_rows=job.chunk_rows, n_exits=job.n_exits,
                            n_classes=job.n_classes, dtype=job.opts.dtype) as sink:
            _stream(job, sink, skip=n * job.chunk_rows)
    count = 0
    while run.read_chunk(count) is not None:
        count += 1
    return count


def _assemble(job: CacheJob, run: PartialRun, out: Path, n_chunks: int, costs: ChosenCosts,
              ctx: DistContext | None) -> None:
    with CacheWriter(out, **job.writer_args(_attrs(job, costs, ctx))) as writer:
        for c in range(n_chunks):
            chunk = run.read_chunk(c)
            if chunk is None:
                raise CacheError(f"{run.chunk_path(c)} is missing or damaged; run again "
                                 f"with --resume to compute it")
            writer.write_chunk(*chunk)
        writer.set_costs(costs.costs, cost_unit=costs.unit, cost_source=costs.source,
                         extra=costs.extra)
    run.remove()


def run_resumable(job: CacheJob, out: Path) -> None:
    """Compute the chunks an earlier run of the same arguments lacks, then assemble ``out``."""
    run = PartialRun(out)
    costs = _partial_costs(job, run)
    if isinstance(job.dataset, IterableDataset):
        n_chunks = _write_pending_iterable(job, run)
    else:
        n_chunks = job.n_chunks
        _write_pending(job, run, range(n_chunks))
    _assemble(job, run, out, n_chunks, costs, None)


def run_distributed(job: CacheJob, out: Path, ctx: DistContext) -> None:
    """This rank's share of the split to its shard (or the resumable chunks); rank 0 merges."""
    if isinstance(job.dataset, IterableDataset):
        raise EenetError("distributed caching needs a map-style dataset (with __len__ and "
                         "__getitem__); an iterable dataset cannot be split between ranks, "
                         "so run it in one process")
    if job.opts.resume:
        run = PartialRun(out)
        costs = step(ctx, lambda: _partial_costs(job, run), "settling the costs", ranks=[0])
        run_sharded(ctx, out, job.n_chunks,
                    lambda _, chunks: _write_pending(job, run, chunks),
                    lambda _: _assemble(job, run, out, job.n_chunks, costs, ctx))
        return
    costs = step(ctx, lambda: _costs(job), "measuring costs", ranks=[0])

    def write_part(path: Path, chunks: range) -> None:
        args = job.writer_args()
        args["expected_rows"] = sum(job.rows_of(c) for c in chunks)
        with CacheWriter(path, shard=True, **args) as writer:
            _stream(job, writer, chunks=chunks)

    def merge(paths: list[Path]) -> None:
        assert costs is not None
        merge_shards(out, paths, costs=costs.costs, cost_unit=costs.unit,
                     cost_source=costs.source, extra=costs.extra,
                     **job.writer_args(_attrs(job, costs, ctx)))

    run_sharded(ctx, out, job.n_chunks, write_part, merge)
