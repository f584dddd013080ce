"""Run a frozen multi-exit model over a dataset split and write its exit cache.

This module (with :mod:`eenet.ingest.costs`) is the only place that touches
the backbone and DataLoaders; everything after ``eenet cache`` works on the
exit cache it writes. The forward contract is in :mod:`eenet.ingest.forward`;
datasets come from :mod:`eenet.ingest.data`.

:func:`cache_model` works in clear steps: check the options
(:class:`CacheOptions`), load the model and the data and check the forward
on one sample (``_prepare``), settle the costs (measured, counted, given or
copied from another cache), then stream the split into the cache with a
writer thread, in one process, resumably, or sharded over ``torchrun`` ranks.

Example:
    >>> from eenet.ingest.model import cache_model
    >>> cache_model("eenet.examples.models:fashion_mnist_cnn4",
    ...             "fashion-mnist:val", "cache/val.h5")  # doctest: +SKIP
    PosixPath('cache/val.h5')
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, default_collate
from tqdm.auto import tqdm

from eenet import __version__
from eenet._validation import (CacheError, EenetError, check_choice, check_int, resolve_device,
                               seeded)
from eenet.cache import CacheWriter, chunk_rows_for, merge_shards
from eenet.ingest.costs import (ChosenCosts, choose_costs, costs_from_cache, measure_costs,
                                parse_cost_spec)
from eenet.ingest.data import check_item, dataset_split, load_dataset
from eenet.ingest.distributed import (DistContext, ShardSampler, distributed_context,
                                      process_group, remove_stale_shards, run_sharded, step)
from eenet.ingest.forward import (autocast as autocast_ctx, exit_logits, forward, labels_of,
                                  select_rows, to_device)
from eenet.ingest.resolve import call_factory, describe, first_line, import_object
from eenet.ingest.stream import BackgroundWriter, ChunkDirWriter, PartialRun

logger = logging.getLogger(__name__)

__all__ = ["CacheOptions", "cache_model", "load_model", "run_exits"]

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    if not path.is_file():
        raise EenetError(f"model file {path} not found; give a TorchScript archive "
                         f"(.pt/.pth/.ts) or a factory as package.module:function")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device)
    except Exception as err:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            if any(n.endswith("data.pkl") for n in names) and \
                    not any("/code/" in n for n in names):
                raise EenetError(f"{path} is a torch.save checkpoint, not a TorchScript "
                                 f"archive; give the model as a factory (--model "
                                 f"package.module:function) and this file as "
                                 f"--weights") from None
        raise EenetError(f"{path} is not a TorchScript archive ({first_line(err)}); save "
                         f"the model with torch.jit.save, or give a factory as "
                         f"package.module:function") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EenetError(f"checkpoint {path} not found; check the --weights path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        text = str(err)
        if "Unsupported global" in text:
            raise EenetError(f"checkpoint {path} holds Python objects, not just tensors; "
                             f"save model.state_dict() with torch.save and pass that "
                             f"file") from None
        # torch's weights-only unpickler wraps any bad byte in a long advisory message.
        detail = "invalid data" if "Weights only load failed" in text else first_line(err)
        raise EenetError(f"checkpoint {path} cannot be read ({detail}); it is "
                         f"corrupt or not a torch.save file, save it again with "
                         f"torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EenetError(f"checkpoint {path} is not a state dict (found {describe(obj)}); "
                         f"save model.state_dict(), or a dict holding it under "
                         f"'state_dict' or 'model'")
    return dict(obj)


def _match_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                      path: Path) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    # Checkpoints saved from DataParallel/DistributedDataParallel prefix every key.
    if all(k.startswith("module.") for k in state) and \
            not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise EenetError(f"checkpoint {path} does not match the model: {'; '.join(parts)}; "
                         f"check that --weights belongs to --model")
    return state


def load_model(spec: str, weights: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Build or load a frozen multi-exit model.

    Args:
        spec: a factory import path ``package.module:function`` (called with no
            arguments, must return an ``nn.Module``), or the path of a
            TorchScript archive (``.pt``/``.pth``/``.ts``).
        weights: optional state dict file, read with
            ``torch.load(weights_only=True)``; a dict holding the state dict
            under ``state_dict`` or ``model`` also works.
        device: where to put the model (``"auto"``, ``"cpu"``, ``"cuda"``).

    Returns:
        The model on ``device``, in eval mode, with ``requires_grad`` off.

    Raises:
        EenetError: unknown module or function, a factory that returns no
            ``nn.Module``, a missing, corrupt or mismatching checkpoint.

    Example:
        >>> m = load_model("eenet.examples.models:fashion_mnist_cnn4")
        >>> len(m.heads), m.training
        (4, False)
    """
    dev = resolve_device(device)
    spec = str(spec)
    path = Path(spec)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES or path.is_file():
        model: Any = _load_torchscript(path, dev)
        logger.info("loaded TorchScript model %s", path)
    elif ":" in spec:
        model = call_factory(import_object(spec, "model factory"), spec, "model factory")
        if not isinstance(model, nn.Module):
            raise EenetError(f"model factory {spec!r} returned {describe(model)}, not a "
                             f"torch.nn.Module; make it return the network")
    else:
        raise EenetError(f"model {spec!r} is neither a TorchScript file (.pt/.pth/.ts) nor "
                         f"an import path package.module:function")
    if weights is not None:
        wpath = Path(weights)
        state = _match_state_dict(model, _read_state_dict(wpath), wpath)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise EenetError(f"checkpoint {wpath} does not load into the model "
                             f"({first_line(err)})") from None
        logger.info("loaded weights from %s", wpath)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------
# running the exits
# ---------------------------------------------------------------------------
def _to_host(logits: torch.Tensor) -> tuple[torch.Tensor, Any]:
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


def _batches(model: nn.Module, loader: DataLoader, device: torch.device, *,
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
        with autocast_ctx(device, autocast):
            outs = forward(model, to_device(x, device, non_blocking), f"batch {i}")
        logits = exit_logits(outs, b, shape)
        shape = (logits.shape[1], logits.shape[2])
        batch_ids = ids[seen:seen + b] if ids is not None else \
            np.arange(first_id + seen, first_id + seen + b)
        seen += b
        if bar is not None:
            bar.update(b)
        host, ready = _to_host(logits)
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


def _loader(dataset: Any, batch_size: int, num_workers: int, device: torch.device,
            sampler: Any = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, pin_memory=device.type == "cuda")


def run_exits(model: nn.Module, dataset: Any, *, device: str | torch.device,
              batch_size: int = 256, num_workers: int = 0, limit: int | None = None,
              verbose: bool = True, autocast: bool = False
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run every exit on a dataset, one batch at a time.

    The arguments are checked when called; the batches come lazily, so the
    logits of the whole dataset are never held at once. The forward contract
    is checked on the first batch.

    Args:
        model: a multi-exit model; it is moved to ``device`` and put in eval mode.
        dataset: yields (input, integer label) pairs; read in order.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: samples per forward.
        num_workers: DataLoader worker processes.
        limit: use only the first ``limit`` samples.
        verbose: show a tqdm progress bar on stderr.
        autocast: run the forward under ``torch.autocast`` (bfloat16 on CPU,
            float16 on CUDA); logits come back as float32 anyway.

    Yields:
        ``(logits, labels)``: float32 [batch, n_exits, n_classes] and int64 [batch].

    Raises:
        EenetError: bad arguments; a forward that breaks the contract (not a
            list/tuple of [batch, n_classes] tensors with one class count) or
            fails; batches without integer labels.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> class Two(torch.nn.Module):
        ...     def forward(self, x):
        ...         return [x[:, :3], x[:, :3] * 2]
        >>> ds = TensorDataset(torch.randn(10, 5), torch.zeros(10, dtype=torch.long))
        >>> [l.shape for l, y in run_exits(Two(), ds, device="cpu", batch_size=4,
        ...                                verbose=False)]
        [(4, 2, 3), (4, 2, 3), (2, 2, 3)]
    """
    dev = resolve_device(device)
    batch_size = check_int("batch_size", batch_size, 1)
    num_workers = check_int("num_workers", num_workers, 0)
    if limit is not None:
        limit = check_int("limit", limit, 1)
    total = limit
    if not isinstance(dataset, IterableDataset):
        total = len(dataset) if limit is None else min(limit, len(dataset))
    model.to(dev).eval()
    loader = _loader(dataset, batch_size, num_workers, dev)

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with tqdm(total=total, desc="caching exits", unit="sample", file=sys.stderr,
                  disable=not verbose) as bar:
            for logits, labels, _, ready in _batches(model, loader, dev, ids=None,
                                                     limit=limit, autocast=autocast,
                                                     bar=bar):
                if ready is not None:
                    ready.synchronize()
                yield logits.numpy(), labels

    return stream()


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("float32", "float16"))
        check_int("batch_size", self.batch_size, 1)
        check_int("num_workers", self.num_workers, 0)
        check_int("seed", self.seed, 0)
        check_int("repeats", self.repeats, 1)
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


def _options(options: CacheOptions | None, kwargs: dict[str, Any]) -> CacheOptions:
    for old, new in _LEGACY.items():  # earlier keyword names, still accepted
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
    names = {f.name for f in dataclasses.fields(CacheOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"cache_model() got unexpected keyword arguments {unknown}")
    return dataclasses.replace(options or CacheOptions(), **kwargs)


# ---------------------------------------------------------------------------
# the steps of `eenet cache`
# ---------------------------------------------------------------------------
@dataclass
class _Job:
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
                    chunk_rows=self.chunk_rows, expected_rows=self.n_rows)


def _example_batch(dataset: Any, n: int, spec: str) -> Any:
    """The inputs of the first ``n`` items, collated into one batch."""
    if isinstance(dataset, IterableDataset):
        items = list(itertools.islice(iter(dataset), n))
    else:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
    if not items:
        raise EenetError(f"dataset {spec!r} is empty; check the file or the split")
    check_item(items[0], spec)
    try:
        return default_collate([item[0] for item in items])
    except (TypeError, RuntimeError) as err:
        raise EenetError(f"dataset {spec!r}: its inputs cannot be batched "
                         f"({first_line(err)}); every input must be a tensor of the same "
                         f"shape") from None


def _prepare(model_spec: str, data_spec: str, opts: CacheOptions,
             device: torch.device) -> _Job:
    """Load the model and data, and check the forward contract on one sample."""
    model = load_model(model_spec, opts.weights, device)
    dataset = load_dataset(data_spec, opts.data_dir)
    example = _example_batch(dataset, opts.batch_size, str(data_spec))
    first = to_device(select_rows(example, torch.zeros(1, dtype=torch.long)), device)
    n_exits, n_classes = exit_logits(forward(model, first, "the first sample"), 1).shape[1:]
    n_rows = opts.limit
    if not isinstance(dataset, IterableDataset):
        n_rows = len(dataset) if opts.limit is None else min(opts.limit, len(dataset))
    itemsize = np.dtype(opts.dtype).itemsize
    split = opts.split if opts.split is not None else dataset_split(str(data_spec))
    return _Job(str(model_spec), str(data_spec), opts, model, dataset, device, example,
                int(n_exits), int(n_classes), n_rows,
                chunk_rows_for(n_exits, n_classes, itemsize, multiple_of=opts.batch_size),
                split)


def _costs(job: _Job) -> ChosenCosts:
    """The cache's costs: copied (``costs_from``), or given/counted/measured here."""
    o = job.opts
    if o.costs_from is not None:
        return costs_from_cache(o.costs_from, job.n_exits, model=job.model_spec)
    kind, given = parse_cost_spec(o.costs)
    timing = o.timing if o.timing is not None else kind == "measured"
    if given is not None and not timing:  # nothing to measure: the run is one forward pass
        if given.size != job.n_exits:
            raise EenetError(f"costs has {given.size} values but the model has "
                             f"{job.n_exits} exits; give one cumulative cost per exit")
        return ChosenCosts(given, o.cost_unit, "given")
    report = measure_costs(job.model, job.example, device=job.device,
                           batch_size=o.batch_size, repeats=o.repeats,
                           min_run_time=o.min_run_time, exit_modules=o.exit_modules,
                           timing=timing)
    return choose_costs(kind, given, report, o.cost_unit)


def _attrs(job: _Job, costs: ChosenCosts, ctx: DistContext | None) -> dict[str, Any]:
    o = job.opts
    attrs = {"device": str(job.device), "seed": o.seed, "batch_size": o.batch_size,
             "num_threads": torch.get_num_threads(), "torch_version": str(torch.__version__),
             "weights": "" if o.weights is None else str(o.weights),
             "autocast": bool(o.autocast), **costs.attrs}
    if ctx is not None:
        attrs.update(world_size=ctx.world_size, cost_rank=0, distributed_backend=ctx.backend)
    return attrs


def _stream(job: _Job, sink: Any, *, chunks: Sequence[int] | None = None,
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
    loader = _loader(dataset, o.batch_size, o.num_workers, job.device, sampler)
    total = ids.size if ids is not None else limit
    show = o.verbose and int(os.environ.get("RANK", "0") or 0) == 0
    with tqdm(total=total, desc="caching exits", unit="sample", file=sys.stderr,
              disable=not show) as bar, BackgroundWriter(sink) as writer:
        for batch in _batches(job.model, loader, job.device, ids=ids, first_id=skip,
                              limit=limit, autocast=o.autocast, bar=bar):
            writer.put(*batch)


class _Skip(IterableDataset):
    """An iterable dataset without its first ``n`` items (a resumed run)."""

    def __init__(self, dataset: IterableDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.dataset), self.n, None)


def _run_single(job: _Job, out: Path) -> None:
    costs = _costs(job)
    with CacheWriter(out, **job.writer_args(_attrs(job, costs, None))) as writer:
        _stream(job, writer)
        writer.set_costs(costs.costs, cost_unit=costs.unit, cost_source=costs.source,
                         extra=costs.extra)


# ---------------------------------------------------------------------------
# resumable and distributed runs
# ---------------------------------------------------------------------------
def _spec(job: _Job) -> dict[str, Any]:
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


def _partial_costs(job: _Job, run: PartialRun) -> ChosenCosts:
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


def _write_pending(job: _Job, run: PartialRun, chunks: Sequence[int]) -> None:
    """Compute the chunks among ``chunks`` that the partial run does not hold yet."""
    done = run.done(chunks, job.rows_of)
    pending = [c for c in chunks if c not in done]
    logger.info("resumable run: %d of %d chunks done, %d to compute", len(done), len(chunks),
                len(pending))
    with ChunkDirWriter(run, chunk_rows=job.chunk_rows, n_exits=job.n_exits,
                        n_classes=job.n_classes, dtype=job.opts.dtype) as sink:
        _stream(job, sink, chunks=pending)


def _write_pending_iterable(job: _Job, run: PartialRun) -> int:
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


def _assemble(job: _Job, run: PartialRun, out: Path, n_chunks: int, costs: ChosenCosts,
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


def _run_resumable(job: _Job, out: Path) -> None:
    run = PartialRun(out)
    costs = _partial_costs(job, run)
    if isinstance(job.dataset, IterableDataset):
        n_chunks = _write_pending_iterable(job, run)
    else:
        n_chunks = job.n_chunks
        _write_pending(job, run, range(n_chunks))
    _assemble(job, run, out, n_chunks, costs, None)


def _run_distributed(job: _Job, out: Path, ctx: DistContext) -> None:
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


def _check_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.is_dir():
        raise CacheError(f"{out}: is a directory; give a file name such as {out / 'val.h5'}")
    if not out.parent.is_dir():
        raise CacheError(f"{out}: output directory {out.parent} does not exist; create it "
                         f"first (mkdir -p {out.parent})")
    return out


def cache_model(model_spec: str, data_spec: str, out: str | os.PathLike,
                options: CacheOptions | None = None, **kwargs: Any) -> Path:
    """Run a frozen multi-exit model on a dataset split and write its exit cache.

    What ``eenet cache`` calls. Everything cheap is checked first (options,
    output directory, model, dataset, the forward contract on one sample,
    the cost count, the per-exit costs); then the split streams batch by
    batch into the cache, written atomically: on any error, Ctrl-C or SIGTERM
    nothing is left at ``out``. With ``resume=True`` progress is kept chunk
    by chunk next to ``out`` and a killed run continues where it stopped;
    under ``torchrun`` the split is sharded over the ranks and merged.

    Args:
        model_spec: factory ``package.module:function`` or TorchScript file.
        data_spec: a registered ``NAME:SPLIT`` (``fashion-mnist:val``), an
            ``.npz`` with ``x`` and ``y``, or a factory ``package.module:function``.
        out: the ``.h5`` file to write; its directory must exist.
        options: a :class:`CacheOptions`; keyword arguments override its fields
            (``cost_unit_given`` and ``time_exits`` are accepted as the older
            names of ``cost_unit`` and ``timing``).

    Returns:
        The path of the written cache (on every rank of a distributed run).

    Raises:
        EenetError: any bad input; the message says what and how to fix it.
        CacheError: the output directory does not exist.
    """
    opts = _options(options, dict(kwargs))
    out = _check_out(out)
    ctx = distributed_context(opts.distributed, opts.device)
    dev = ctx.device if ctx is not None else resolve_device(opts.device)
    partial = PartialRun(out)
    if ctx is None or ctx.rank == 0:
        remove_stale_shards(out)
        if not opts.resume and partial.exists():
            warnings.warn(f"{partial.dir} holds an interrupted run; continue it with "
                          f"--resume or delete it", stacklevel=2)
    with seeded(opts.seed, dev):
        if ctx is not None:
            with process_group(ctx):
                job = step(ctx, lambda: _prepare(model_spec, data_spec, opts, dev),
                           "loading the model and the data")
                _run_distributed(job, out, ctx)
            return out
        job = _prepare(model_spec, data_spec, opts, dev)
        if opts.resume:
            _run_resumable(job, out)
        else:
            _run_single(job, out)
    logger.info("wrote %s: %s samples, %d exits", out, job.n_rows, job.n_exits)
    return out
