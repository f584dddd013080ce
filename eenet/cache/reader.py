"""Reading an exit cache: :func:`read_cache`, :func:`read_costs` (costs only),
:func:`summarize_cache` (block by block) and :func:`iter_encoded_chunks` (stored bytes).

Every reader opens the file with :class:`open_checked`, which checks the
format name and version before anything else is read; every error names the
file and the key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from eenet._validation import CacheError, EenetError, check_costs, check_labels, first_line
from eenet.cache.exit_cache import ExitCache, cache_summary, scan_finite
from eenet.cache.layout import (FORMAT_NAME, FORMAT_VERSION, READ_ROWS_BYTES, SHARD_FORMAT,
                                rows_per_block)

__all__ = ["CacheCosts", "iter_encoded_chunks", "open_checked", "read_cache", "read_costs",
           "summarize_cache"]

_SUMMARY_ROWS_BYTES = 4 << 20  # rows per block when only arg-max is kept


def _attr(f: h5py.File, path: Path, key: str, default: Any = None) -> Any:
    if key not in f.attrs:
        if default is None:
            raise CacheError(f"{path}: root attribute {key!r} is missing; the file is not a "
                             f"complete eenet exit cache, rebuild it")
        return default
    value = f.attrs[key]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


class open_checked:
    """Open ``path`` read-only after checking it is an HDF5 file of an accepted format."""

    def __init__(self, path: Path, formats: Sequence[str] = (FORMAT_NAME,)) -> None:
        self.path, self.formats = Path(path), tuple(formats)

    def __enter__(self) -> h5py.File:
        path = self.path
        if not path.is_file():
            raise CacheError(f"{path}: no such file; build it with `eenet cache` or "
                             f"`eenet import`")
        try:
            is_h5 = h5py.is_hdf5(path)
        except OSError:
            is_h5 = False
        if not is_h5:
            raise CacheError(f"{path}: not an HDF5 file (truncated or not an exit cache); "
                             f"rebuild it with `eenet cache` or `eenet import`")
        try:
            self.f = h5py.File(path, "r")
        except OSError as err:
            raise CacheError(f"{path}: cannot open the HDF5 file ({first_line(err)});"
                             f" it is corrupt, rebuild it") from None
        fmt = self.f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt not in self.formats:
            self.f.close()
            raise CacheError(f"{path}: attribute 'format' is {fmt!r}, expected "
                             f"{self.formats[0]!r}; this HDF5 file is not an eenet exit cache")
        version = int(_attr(self.f, path, "format_version"))
        if version > FORMAT_VERSION:
            self.f.close()
            raise CacheError(f"{path}: format_version {version} is newer than this eenet "
                             f"reads ({FORMAT_VERSION}); upgrade eenet")
        return self.f

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _read_dataset(f: h5py.File, path: Path, key: str, rows: slice | None = None) -> np.ndarray:
    if key not in f:
        raise CacheError(f"{path}: dataset {key!r} is missing; the file is not a complete "
                         f"eenet exit cache (rebuild it with `eenet cache` or `eenet import`)")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise CacheError(f"{path}: {key!r} is not a dataset; rebuild the file")
    try:
        if ds.ndim == 3 and rows is None:
            out = np.empty(ds.shape, dtype=ds.dtype)
            step = rows_per_block(ds.shape[1], ds.shape[2], ds.dtype.itemsize,
                                  READ_ROWS_BYTES)
            for start in range(0, ds.shape[0], step):
                ds.read_direct(out, np.s_[start:start + step], np.s_[start:start + step])
            return out
        return ds[()] if rows is None else ds[rows]
    except (OSError, ValueError, TypeError) as err:
        raise CacheError(f"{path}: dataset {key!r} cannot be read, the file is corrupt "
                         f"({first_line(err)}); rebuild it") from None


def _read_meta(f: h5py.File, path: Path) -> dict[str, Any]:
    """Everything but the logits: labels, costs, ids, cost vectors and attributes."""
    try:
        names = tuple(json.loads(_attr(f, path, "exit_names", "[]")))
        vector_names = json.loads(_attr(f, path, "cost_vectors", "[]"))
    except json.JSONDecodeError:
        raise CacheError(f"{path}: attribute 'exit_names' or 'cost_vectors' is not "
                         f"valid JSON; rebuild the file") from None
    known = {"format", "format_version", "cost_unit", "cost_source", "logits_kind",
             "exit_names", "cost_vectors", "model", "dataset", "split", "feature_dims"}
    return {
        "costs": _read_dataset(f, path, "costs"),
        "extra_costs": {name: _read_dataset(f, path, name) for name in vector_names},
        "exit_names": names, "attrs": {k: _attr(f, path, k) for k in f.attrs if k not in known},
        "cost_unit": str(_attr(f, path, "cost_unit")),
        "cost_source": str(_attr(f, path, "cost_source", "given")),
        "logits_kind": str(_attr(f, path, "logits_kind", "logits")),
        **{k: str(_attr(f, path, k, "")) for k in ("model", "dataset", "split")},
    }


def _read_features(f: h5py.File, path: Path, n_exits: int, data: bool = True
                   ) -> dict[str, Any]:
    """The optional ``features_k`` and ``feature_projection_k`` datasets.

    With ``data`` the arrays (``features``, ``feature_projections``, as
    :class:`ExitCache` takes them); without, only what ``eenet info`` shows
    (``features``: shapes, ``feature_projected``: bools). Empty without features.
    """
    if "features_0" not in f:
        return {}
    feats, projs = [], []
    for k in range(n_exits):
        key, pkey = f"features_{k}", f"feature_projection_{k}"
        if key not in f:
            raise CacheError(f"{path}: dataset {key!r} is missing while 'features_0' is "
                             f"there; the file is damaged, rebuild it")
        feats.append(_read_dataset(f, path, key) if data else list(f[key].shape))
        has = pkey in f
        projs.append((_read_dataset(f, path, pkey) if has else None) if data else has)
    if data:
        return {"features": feats, "feature_projections": projs}
    return {"features": feats, "feature_projected": projs}


def read_cache(path: str | os.PathLike) -> ExitCache:
    """Read and validate an exit cache written by :func:`~eenet.cache.writer.write_cache`
    or ``eenet cache``.

    Args:
        path: an ``.h5`` exit cache.

    Returns:
        The :class:`ExitCache`, with ``path`` set.

    Raises:
        CacheError: the file is missing, not HDF5, of another format or a newer
            version, or has a missing, corrupt or inconsistent dataset; the
            message names the file and the key.
    """
    path = Path(path)
    with open_checked(path) as f:
        logits = _read_dataset(f, path, "logits")
        labels = _read_dataset(f, path, "labels")
        ids = _read_dataset(f, path, "sample_ids") if "sample_ids" in f else None
        meta = _read_meta(f, path)
        if logits.ndim != 3:
            raise CacheError(f"{path}: dataset 'logits' has shape {logits.shape}, expected "
                             f"[n_samples, n_exits, n_classes]; rebuild the file")
        meta.update(_read_features(f, path, logits.shape[1]))
    try:
        return ExitCache(logits=logits, labels=labels, sample_ids=ids, path=str(path), **meta)
    except CacheError:
        raise
    except EenetError as err:
        raise CacheError(str(err)) from None


@dataclass(frozen=True, eq=False)
class CacheCosts:
    """A cache's cost vectors and where they came from, read without its logits.

    Attributes:
        costs: [n_exits] the chosen cumulative costs.
        cost_unit, cost_source: as in :class:`ExitCache`.
        extra_costs: every other cost vector, by name.
        model: the model the cache was made with.
        device: where the costs were measured (empty when unknown).
        path: the file read.
        shape: ``(n_samples, n_exits, n_classes)`` of the cache's logits.
    """

    costs: np.ndarray
    cost_unit: str
    cost_source: str
    extra_costs: dict[str, np.ndarray]
    model: str
    device: str
    path: str
    shape: tuple[int, int, int] = (0, 0, 0)

    def matching(self, n_exits: int) -> "CacheCosts":
        """These costs, checked to have one value per exit of a network with ``n_exits``."""
        if self.costs.size != n_exits:
            raise EenetError(f"--costs-from {self.path} has costs for {self.costs.size} exits "
                             f"but this network has {n_exits}; use a cache of the same network")
        return self

    @property
    def provenance(self) -> dict[str, str]:
        """Root attributes of a cache that copies these costs."""
        return {"costs_from": os.path.abspath(self.path), "costs_device": self.device}


def read_costs(path: str | os.PathLike) -> CacheCosts:
    """Read only the costs of an exit cache (for ``--costs-from``); the logits stay on disk.

    Raises:
        CacheError: the file is not an exit cache, or its costs are damaged.
    """
    path = Path(path)
    with open_checked(path) as f:
        meta = _read_meta(f, path)
        shape = tuple(int(d) for d in f["logits"].shape) if "logits" in f else (0, 0, 0)
        n_exits = shape[1] if len(shape) == 3 and shape[1] else None
    try:
        costs = check_costs(meta["costs"], n_exits, name=f"{path}: costs")
        extra = {k: check_costs(v, n_exits, name=f"{path}: {k}")
                 for k, v in meta["extra_costs"].items()}
    except EenetError as err:
        raise CacheError(str(err)) from None
    attrs = meta["attrs"]
    device = str(attrs.get("costs_device") or attrs.get("device") or "")
    return CacheCosts(costs, meta["cost_unit"], meta["cost_source"], extra, meta["model"],
                      device, str(path), shape)  # type: ignore[arg-type]


def summarize_cache(path: str | os.PathLike) -> dict[str, Any]:
    """:meth:`ExitCache.summary` of a file, reading its logits block by block.

    Only whether each block's arg-max is right is kept, so the memory needed
    is one block (a chunk or about 4 MiB) plus ``[n_samples, n_exits]``
    booleans and the labels, whatever the cache's size.

    Raises:
        CacheError: as :func:`read_cache`, including non-finite logits.
    """
    path = Path(path)
    with open_checked(path) as f:
        meta = _read_meta(f, path)
        ds = f["logits"] if "logits" in f else None
        if ds is None or ds.ndim != 3:
            raise CacheError(f"{path}: dataset 'logits' is missing or not "
                             f"[n_samples, n_exits, n_classes]; rebuild the file")
        n, k, c = ds.shape
        try:
            labels = check_labels(_read_dataset(f, path, "labels"), n, c, where=f"{path}: ")
            check_costs(meta["costs"], k, name=f"{path}: costs")
        except EenetError as err:
            raise CacheError(str(err)) from None
        step = rows_per_block(k, c, ds.dtype.itemsize, _SUMMARY_ROWS_BYTES)
        step = max(ds.chunks[0], step - step % ds.chunks[0])  # whole chunks per read
        correct = np.empty((n, k), dtype=bool)
        for start in range(0, n, step):
            block = _read_dataset(f, path, "logits", slice(start, start + step))
            try:
                scan_finite(block, f"{path}: logits", offset=start)
            except EenetError as err:
                raise CacheError(str(err)) from None
            correct[start:start + step] = block.argmax(axis=2) == \
                labels[start:start + step, None]
        meta.update(_read_features(f, path, k, data=False))
        meta.update(path=str(path), n_classes=c, logits_dtype=ds.dtype,
                    exit_names=meta["exit_names"] or tuple(f"exit{i}" for i in range(k)))
    return cache_summary(meta, correct)


def iter_encoded_chunks(path: str | os.PathLike
                        ) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
    """The stored chunks of a cache or shard, in order: ``(data, labels, sample_ids)``.

    ``data`` is a chunk's compressed bytes as
    :func:`~eenet.cache.chunks.encode_chunk` makes them;
    labels and ids are int64 [rows] (ids are the row positions when the file
    stores none).
    """
    path = Path(path)
    with open_checked(path, (FORMAT_NAME, SHARD_FORMAT)) as f:
        ds = f["logits"]
        rows = ds.chunks[0]
        n = ds.shape[0]
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            try:
                mask, data = ds.id.read_direct_chunk((start, 0, 0))
            except (OSError, RuntimeError, KeyError) as err:
                raise CacheError(f"{path}: chunk at row {start} of 'logits' cannot be read "
                                 f"({first_line(err)}); the file is damaged, "
                                 f"rebuild it") from None
            if mask:
                raise CacheError(f"{path}: chunk at row {start} was stored with filters "
                                 f"skipped; it cannot be copied, rebuild the file")
            ids = f["sample_ids"][start:stop] if "sample_ids" in f else np.arange(start, stop)
            yield bytes(data), f["labels"][start:stop], ids
