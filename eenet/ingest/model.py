"""Run a frozen multi-exit model over a dataset split and write its exit cache.

This module (with :mod:`eenet.ingest.costs`) is the only place that touches
the backbone and DataLoaders; everything after ``eenet cache`` works on the
exit cache it writes. The forward contract is in :mod:`eenet.ingest.forward`;
datasets come from :mod:`eenet.ingest.data`.

:func:`cache_model` works in clear steps: check the options
(:class:`~eenet.ingest.pipeline.CacheOptions`), load the model and the data and
check the forward on one sample (``_prepare``), then hand the loaded job to
:mod:`eenet.ingest.pipeline`, which settles the costs and streams the split
into the cache in one process, resumably, or sharded over ``torchrun`` ranks.

Example:
    >>> from eenet.ingest.model import cache_model
    >>> cache_model("eenet.examples.models:fashion_mnist_cnn4",
    ...             "fashion-mnist:val", "cache/val.h5")  # doctest: +SKIP
    PosixPath('cache/val.h5')
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, default_collate
from tqdm.auto import tqdm

from eenet._validation import EenetError, check_int, first_line, resolve_device, seeded
from eenet.cache import check_output_path, chunk_rows_for
from eenet.ingest.data import check_item, dataset_split, load_dataset
from eenet.ingest.distributed import (distributed_context, process_group,
                                      remove_stale_shards, step)
from eenet.ingest.features import FeatureCapture
from eenet.ingest.forward import (exit_logits, forward, make_loader, select_rows,
                                  stream_batches, to_device)
from eenet.ingest.pipeline import (CacheJob, CacheOptions, options_from, run_distributed,
                                   run_resumable, run_single)
from eenet.ingest.resolve import call_factory, describe, import_object
from eenet.ingest.stream import PartialRun

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
    loader = make_loader(dataset, batch_size, num_workers, dev)

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with tqdm(total=total, desc="caching exits", unit="sample", file=sys.stderr,
                  disable=not verbose) as bar:
            for logits, labels, _, ready in stream_batches(model, loader, dev, ids=None,
                                                     limit=limit, autocast=autocast,
                                                     bar=bar):
                if ready is not None:
                    ready.synchronize()
                yield logits.numpy(), labels

    return stream()



# ---------------------------------------------------------------------------
# the `eenet cache` entry point
# ---------------------------------------------------------------------------
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
             device: torch.device) -> CacheJob:
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
    job = CacheJob(str(model_spec), str(data_spec), opts, model, dataset, device, example,
                   int(n_exits), int(n_classes), n_rows,
                   chunk_rows_for(n_exits, n_classes, itemsize, multiple_of=opts.batch_size),
                   split)
    if opts.features:
        job.capture = FeatureCapture(model, first, job.n_exits, feature_dim=opts.feature_dim,
                                     seed=opts.seed, names=opts.exit_modules)
        with job.capture:
            job.feature_dims = job.capture.probe(model, first)
    return job


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
    opts = options_from(options, dict(kwargs))
    out = check_output_path(out)
    ctx = distributed_context(opts.distributed, opts.device)
    if ctx is not None and opts.features:
        raise EenetError("--features is written by one process; run eenet cache without "
                         "torchrun (or drop --features)")
    dev = ctx.device if ctx is not None else resolve_device(opts.device)
    partial = PartialRun(out)
    if ctx is None or ctx.rank == 0:
        remove_stale_shards(out)
        if not opts.resume and partial.exists():
            warnings.warn(f"{partial.dir} holds an interrupted run; without --resume it is "
                          f"deleted once {out} is complete (stop now and rerun with --resume "
                          f"to continue it instead)", stacklevel=2)
    with seeded(opts.seed, dev):
        if ctx is not None:
            with process_group(ctx):
                job = step(ctx, lambda: _prepare(model_spec, data_spec, opts, dev),
                           "loading the model and the data")
                run_distributed(job, out, ctx)
            return out
        job = _prepare(model_spec, data_spec, opts, dev)
        if opts.resume:
            run_resumable(job, out)
        else:
            run_single(job, out)
    logger.info("wrote %s: %s samples, %d exits", out, job.n_rows, job.n_exits)
    return out
