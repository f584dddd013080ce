"""HDF5 exit cache: every exit's output for one dataset split, in one file.

A multi-exit network is run once per split; every policy and budget after
that works on this file alone.

File layout (``format = "eenet-exit-cache"``, ``format_version = 1``)::

    /logits        float32 or float16 [n_samples, n_exits, n_classes]
                   chunked along samples, gzip-compressed. Raw logits, or
                   log-probabilities when the root attribute
                   ``logits_kind == "log_probs"`` (imported probabilities).
    /labels        int64 [n_samples], in [0, n_classes)
    /costs         float64 [n_exits], cumulative cost of reaching each exit
                   (backbone up to the exit plus every head at or before it),
                   in ``cost_unit``
    /sample_ids    int64 [n_samples]                       (optional)
    /<name>        float64 [n_exits], every other cost vector computed, named
                   in the root attribute ``cost_vectors`` (for example
                   ``latency_ms_batch1``, ``latency_ms_batchB``, ``flops``)

Root attributes: ``format``, ``format_version``, ``eenet_version``,
``model``, ``dataset``, ``split``, ``cost_unit``, ``cost_source``
(``measured`` / ``flops`` / ``given``), ``device``, ``created`` (ISO 8601),
``exit_names`` (a JSON list), ``cost_vectors`` (a JSON list), ``logits_kind``,
``seed``, and any extra string or number attributes the writer was given.

Files are written under a temporary name in the target directory and renamed
only once complete, so an interrupted run never leaves a file that looks
valid. :func:`read_cache` checks the format name and version before it reads
anything else, and every error names the file and the key.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import h5py
import numpy as np

from eenet import __version__
from eenet._validation import CacheError, EenetError, check_costs
from eenet.metrics import exit_accuracy, oracle_accuracy

FORMAT_NAME = "eenet-exit-cache"
FORMAT_VERSION = 1
LogitsKind = Literal["logits", "log_probs"]
_CHUNK_BYTES = 1 << 20  # ~1 MiB of logits per HDF5 chunk
_READ_ROWS_BYTES = 64 << 20  # rows per block when reading or scanning


def _rows_per_block(n_exits: int, n_classes: int, itemsize: int, target: int) -> int:
    return max(1, target // max(1, n_exits * n_classes * itemsize))


@dataclass(frozen=True, eq=False)
class ExitCache:
    """Every exit's output on one dataset split.

    Attributes:
        logits: [n_samples, n_exits, n_classes] logits (or log-probabilities
            when ``logits_kind == "log_probs"``); float32 or float16.
        labels: [n_samples] int64 class indices.
        costs: [n_exits] float64 cumulative cost of each exit, in ``cost_unit``.
        cost_unit: unit of ``costs`` (``"ms"``, ``"flops"``, ...).
        cost_source: ``"measured"``, ``"flops"`` or ``"given"``.
        model, dataset, split: free-text provenance.
        exit_names: one name per exit (defaults to ``exit0``, ``exit1``, ...).
        logits_kind: whether ``logits`` holds logits or log-probabilities.
        extra_costs: every other cost vector computed, by name.
        sample_ids: optional [n_samples] int64 ids.
        attrs: other provenance (``device``, ``created``, ``seed``, ...).
        path: the file this cache was read from, if any.

    Example:
        >>> import numpy as np
        >>> c = ExitCache(np.zeros((4, 2, 3), np.float32), np.array([0, 1, 2, 0]),
        ...               np.array([1.0, 2.0]))
        >>> (c.n_samples, c.n_exits, c.n_classes)
        (4, 2, 3)
    """

    logits: np.ndarray
    labels: np.ndarray
    costs: np.ndarray
    cost_unit: str = "ms"
    cost_source: str = "given"
    model: str = ""
    dataset: str = ""
    split: str = ""
    exit_names: tuple[str, ...] = ()
    logits_kind: LogitsKind = "logits"
    extra_costs: Mapping[str, np.ndarray] = field(default_factory=dict)
    sample_ids: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    # arg-max and correctness, computed once: every fit, calibration and evaluation asks
    _memo: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"{self.path}: " if self.path else ""
        logits = np.asarray(self.logits)
        if logits.ndim != 3:
            raise EenetError(f"{where}logits must be [n_samples, n_exits, n_classes], "
                             f"got shape {logits.shape}")
        if logits.dtype not in (np.float32, np.float16):
            logits = logits.astype(np.float32)
        n, k, c = logits.shape
        if n == 0 or k == 0 or c < 2:
            raise EenetError(f"{where}logits shape {logits.shape} needs at least one sample, "
                             f"one exit and two classes")
        labels = np.asarray(self.labels)
        if labels.shape != (n,):
            raise EenetError(f"{where}labels must have shape ({n},) to match logits, "
                             f"got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) \
                    and np.all(labels == np.round(labels)):
                labels = labels.astype(np.int64)
            else:
                raise EenetError(f"{where}labels must be integer class indices, "
                                 f"got dtype {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if labels.min() < 0 or labels.max() >= c:
            raise EenetError(f"{where}labels must lie in [0, {c}) for {c} classes, got range "
                             f"[{labels.min()}, {labels.max()}]")
        costs = check_costs(self.costs, k, name=f"{where}costs")
        names = tuple(str(s) for s in self.exit_names) or tuple(f"exit{i}" for i in range(k))
        if len(names) != k:
            raise EenetError(f"{where}exit_names has {len(names)} names for {k} exits")
        if self.logits_kind not in ("logits", "log_probs"):
            raise EenetError(f"{where}logits_kind must be 'logits' or 'log_probs', "
                             f"got {self.logits_kind!r}")
        extra = {str(key): check_costs(v, k, name=f"{where}{key}")
                 for key, v in dict(self.extra_costs).items()}
        ids = None if self.sample_ids is None else np.asarray(self.sample_ids, dtype=np.int64)
        if ids is not None and ids.shape != (n,):
            raise EenetError(f"{where}sample_ids must have shape ({n},), got {ids.shape}")
        for name, value in (("logits", logits), ("labels", labels), ("costs", costs),
                            ("exit_names", names), ("extra_costs", extra),
                            ("sample_ids", ids), ("attrs", dict(self.attrs))):
            object.__setattr__(self, name, value)
        _scan_finite(logits, f"{where}logits")

    # ---- shape -------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.logits.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[2])

    # ---- derived arrays ----------------------------------------------------
    def _blocks(self) -> Iterator[slice]:
        rows = _rows_per_block(self.n_exits, self.n_classes, 4, _READ_ROWS_BYTES)
        for start in range(0, self.n_samples, rows):
            yield slice(start, min(start + rows, self.n_samples))

    def probs(self) -> np.ndarray:
        """Softmax probabilities, float32 [n_samples, n_exits, n_classes]."""
        out = np.empty(self.logits.shape, dtype=np.float32)
        for sl in self._blocks():
            block = self.logits[sl].astype(np.float32)
            block -= block.max(axis=2, keepdims=True)
            np.exp(block, out=block)
            block /= block.sum(axis=2, keepdims=True)
            out[sl] = block
        return out

    def predictions(self) -> np.ndarray:
        """Arg-max class of every exit, int64 [n_samples, n_exits] (read-only)."""
        if "predictions" not in self._memo:
            pred = np.argmax(self.logits, axis=2).astype(np.int64)
            pred.flags.writeable = False
            self._memo["predictions"] = pred
        return self._memo["predictions"]

    def correct(self) -> np.ndarray:
        """Whether each exit's arg-max is the label, bool [n_samples, n_exits] (read-only)."""
        if "correct" not in self._memo:
            ok = self.predictions() == self.labels[:, None]
            ok.flags.writeable = False
            self._memo["correct"] = ok
        return self._memo["correct"]

    # ---- views ---------------------------------------------------------------
    def subset(self, indices: np.ndarray | Sequence[int]) -> "ExitCache":
        """The cache restricted to ``indices`` (a row subset, in the given order)."""
        idx = np.asarray(indices)
        return dataclasses.replace(
            self, logits=self.logits[idx], labels=self.labels[idx],
            sample_ids=None if self.sample_ids is None else self.sample_ids[idx])

    def holdout_split(self, fraction: float, seed: int = 0) -> tuple["ExitCache", "ExitCache"]:
        """Split into (rest, held_out), stratified by label and seeded.

        Args:
            fraction: share of samples held out, in (0, 1).
            seed: seed of the shuffle.

        Returns:
            Two caches over disjoint samples; the second holds about
            ``fraction`` of every class.
        """
        if not 0 < fraction < 1:
            raise EenetError(f"holdout fraction must lie in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        held = []
        for cls in np.unique(self.labels):
            members = np.flatnonzero(self.labels == cls)
            rng.shuffle(members)
            held.append(members[: int(round(fraction * members.size))])
        held_idx = np.sort(np.concatenate(held))
        mask = np.ones(self.n_samples, dtype=bool)
        mask[held_idx] = False
        if held_idx.size == 0 or mask.sum() == 0:
            raise EenetError(f"holdout fraction {fraction} leaves one side empty for "
                             f"{self.n_samples} samples")
        return self.subset(np.flatnonzero(mask)), self.subset(held_idx)

    def summary(self) -> dict[str, Any]:
        """What ``eenet info`` shows: sizes, costs, per-exit and oracle accuracy."""
        correct = self.correct()
        return {
            "path": self.path,
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "n_samples": self.n_samples,
            "n_exits": self.n_exits,
            "n_classes": self.n_classes,
            "exit_names": list(self.exit_names),
            "costs": [float(c) for c in self.costs],
            "cost_unit": self.cost_unit,
            "cost_source": self.cost_source,
            "cost_vectors": {k: [float(x) for x in v] for k, v in self.extra_costs.items()},
            "exit_accuracy": [float(a) for a in exit_accuracy(correct)],
            "last_exit_accuracy": float(correct[:, -1].mean()),
            "oracle_accuracy": float(oracle_accuracy(correct)),
            "logits_dtype": str(self.logits.dtype),
            "logits_kind": self.logits_kind,
            "device": self.attrs.get("device", ""),
            "created": self.attrs.get("created", ""),
            "eenet_version": self.attrs.get("eenet_version", ""),
        }


def _scan_finite(logits: np.ndarray, name: str) -> None:
    rows = _rows_per_block(logits.shape[1], logits.shape[2], 4, _READ_ROWS_BYTES)
    for start in range(0, logits.shape[0], rows):
        block = logits[start:start + rows]
        bad = ~np.isfinite(block)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise EenetError(f"{name} contains non-finite values (NaN or inf), first at "
                             f"[sample {start + first[0]}, exit {first[1]}, class {first[2]}]; "
                             f"fix the model or drop those samples")


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
def _attr_value(value: Any) -> Any:
    if isinstance(value, str):
        return str(value)  # h5py refuses str subclasses such as torch.__version__
    if isinstance(value, (int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value)


class CacheWriter:
    """Stream an exit cache to disk batch by batch; the file appears only when complete.

    Use as a context manager. Rows are appended with :meth:`write`; costs are
    set with :meth:`set_costs` before the block ends. On an exception inside
    the block, or when no rows or no costs were written, the temporary file is
    deleted and nothing is left at ``path``.

    Args:
        path: target ``.h5`` path; its directory must exist.
        n_exits, n_classes: the logits' trailing dimensions.
        dtype: ``"float32"`` (default) or ``"float16"``.
        logits_kind: ``"logits"`` or ``"log_probs"``.
        model, dataset, split, exit_names, attrs: provenance written as root
            attributes.

    Example:
        >>> import numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "val.h5")
        >>> with CacheWriter(p, n_exits=2, n_classes=3) as w:
        ...     w.write(np.zeros((5, 2, 3)), np.zeros(5, dtype=int))
        ...     w.set_costs([1.0, 2.0], cost_unit="ms", cost_source="given")
        >>> read_cache(p).n_samples
        5
    """

    def __init__(self, path: str | os.PathLike, *, n_exits: int, n_classes: int,
                 dtype: Literal["float32", "float16"] = "float32",
                 logits_kind: LogitsKind = "logits", model: str = "", dataset: str = "",
                 split: str = "", exit_names: Sequence[str] | None = None,
                 attrs: Mapping[str, Any] | None = None, compression: str | None = "gzip",
                 with_sample_ids: bool = False) -> None:
        self.path = Path(path)
        if dtype not in ("float32", "float16"):
            raise EenetError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        if not self.path.parent.is_dir():
            raise CacheError(f"{self.path}: output directory {self.path.parent} does not "
                             f"exist; create it first")
        self.n_exits, self.n_classes = int(n_exits), int(n_classes)
        self.dtype = np.dtype(dtype)
        self.logits_kind = logits_kind
        self.meta = {"model": model, "dataset": dataset, "split": split}
        self.exit_names = list(exit_names) if exit_names else [f"exit{i}"
                                                               for i in range(self.n_exits)]
        if len(self.exit_names) != self.n_exits:
            raise EenetError(f"exit_names has {len(self.exit_names)} names for "
                             f"{self.n_exits} exits")
        self.attrs = dict(attrs or {})
        self.compression = compression
        self.with_sample_ids = with_sample_ids
        self.n_written = 0
        self._costs: dict[str, Any] | None = None
        self._file: h5py.File | None = None
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")

    def __enter__(self) -> "CacheWriter":
        rows = _rows_per_block(self.n_exits, self.n_classes, self.dtype.itemsize, _CHUNK_BYTES)
        try:
            f = h5py.File(self._tmp, "w")
        except OSError as err:
            raise CacheError(f"{self.path}: cannot create the file ({err})") from None
        self._file = f
        comp = {"compression": self.compression, "compression_opts": 1, "shuffle": True} \
            if self.compression == "gzip" else {"compression": self.compression}
        f.create_dataset("logits", shape=(0, self.n_exits, self.n_classes), dtype=self.dtype,
                         maxshape=(None, self.n_exits, self.n_classes),
                         chunks=(rows, self.n_exits, self.n_classes), **comp)
        f.create_dataset("labels", shape=(0,), dtype=np.int64, maxshape=(None,),
                         chunks=(max(rows, 1024),))
        if self.with_sample_ids:
            f.create_dataset("sample_ids", shape=(0,), dtype=np.int64, maxshape=(None,),
                             chunks=(max(rows, 1024),))
        return self

    def write(self, logits: np.ndarray, labels: np.ndarray,
              sample_ids: np.ndarray | None = None) -> None:
        """Append a batch: ``logits`` [batch, n_exits, n_classes], ``labels`` [batch]."""
        if self._file is None:
            raise RuntimeError("CacheWriter.write() called outside its `with` block")
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        b = logits.shape[0] if logits.ndim == 3 else -1
        if logits.shape[1:] != (self.n_exits, self.n_classes) or logits.ndim != 3:
            raise EenetError(f"{self.path}: a batch of logits has shape {logits.shape}, "
                             f"expected [batch, {self.n_exits}, {self.n_classes}]")
        if labels.shape != (b,):
            raise EenetError(f"{self.path}: a batch of {b} logits came with labels of shape "
                             f"{labels.shape}")
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            cast = logits.astype(self.dtype, copy=False)
        bad = ~np.isfinite(cast)
        if bad.any():
            first = np.argwhere(bad)[0]
            hint = ("the values overflow float16; use dtype float32"
                    if np.isfinite(logits).all() else "fix the model or the data")
            raise EenetError(f"{self.path}: logits of sample {self.n_written + int(first[0])} "
                             f"exit {int(first[1])} are not finite; {hint}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise EenetError(f"{self.path}: labels must lie in [0, {self.n_classes}), got "
                             f"[{labels.min()}, {labels.max()}]")
        f = self._file
        start, stop = self.n_written, self.n_written + b
        f["logits"].resize(stop, axis=0)
        f["logits"][start:stop] = cast
        f["labels"].resize(stop, axis=0)
        f["labels"][start:stop] = labels.astype(np.int64)
        if self.with_sample_ids:
            ids = np.arange(start, stop) if sample_ids is None else np.asarray(sample_ids)
            f["sample_ids"].resize(stop, axis=0)
            f["sample_ids"][start:stop] = ids.astype(np.int64)
        self.n_written = stop

    def set_costs(self, costs: Sequence[float], *, cost_unit: str, cost_source: str,
                  extra: Mapping[str, Sequence[float]] | None = None) -> None:
        """Record the chosen cumulative cost vector and every other one computed."""
        self._costs = {
            "costs": check_costs(costs, self.n_exits, name=f"{self.path}: costs"),
            "cost_unit": str(cost_unit), "cost_source": str(cost_source),
            "extra": {k: check_costs(v, self.n_exits, name=f"{self.path}: {k}")
                      for k, v in dict(extra or {}).items()},
        }

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._file = self._file, None
        try:
            if exc_type is None:
                if self.n_written == 0:
                    raise EenetError(f"{self.path}: no samples were written; the dataset "
                                     f"is empty")
                if self._costs is None:
                    raise EenetError(f"{self.path}: no per-exit costs were set")
                self._finish(f)
            f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        except BaseException:
            try:
                f.close()
            except Exception:  # already closed or broken; the file goes anyway
                pass
            self._tmp.unlink(missing_ok=True)
            raise
        finally:
            if exc_type is not None:
                self._tmp.unlink(missing_ok=True)

    def _finish(self, f: h5py.File) -> None:
        costs = self._costs
        assert costs is not None
        f.create_dataset("costs", data=costs["costs"])
        for name, vec in costs["extra"].items():
            if name in f:
                raise EenetError(f"{self.path}: cost vector name {name!r} clashes with a "
                                 f"dataset of the cache")
            f.create_dataset(name, data=vec)
        attrs = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "eenet_version": __version__, "cost_unit": costs["cost_unit"],
            "cost_source": costs["cost_source"], "logits_kind": self.logits_kind,
            "exit_names": json.dumps(self.exit_names),
            "cost_vectors": json.dumps(sorted(costs["extra"])),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": "", "seed": -1, **self.meta,
        }
        reserved = set(attrs) - {"device", "seed", "created"}
        for key, value in self.attrs.items():
            if key in reserved:
                continue
            attrs[key] = value
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)


def write_cache(path: str | os.PathLike, cache: ExitCache, *,
                dtype: Literal["float32", "float16"] | None = None) -> Path:
    """Write ``cache`` to ``path`` (atomically); returns the path.

    Args:
        path: target ``.h5`` file; its directory must exist.
        cache: the cache to store.
        dtype: storage dtype of the logits; defaults to the cache's own.
    """
    dtype = dtype or ("float16" if cache.logits.dtype == np.float16 else "float32")
    rows = _rows_per_block(cache.n_exits, cache.n_classes, 4, _READ_ROWS_BYTES)
    attrs = dict(cache.attrs)
    with CacheWriter(path, n_exits=cache.n_exits, n_classes=cache.n_classes, dtype=dtype,
                     logits_kind=cache.logits_kind, model=cache.model, dataset=cache.dataset,
                     split=cache.split, exit_names=cache.exit_names, attrs=attrs,
                     with_sample_ids=cache.sample_ids is not None) as w:
        for start in range(0, cache.n_samples, rows):
            sl = slice(start, start + rows)
            w.write(cache.logits[sl], cache.labels[sl],
                    None if cache.sample_ids is None else cache.sample_ids[sl])
        w.set_costs(cache.costs, cost_unit=cache.cost_unit, cost_source=cache.cost_source,
                    extra=cache.extra_costs)
    return Path(path)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def _attr(f: h5py.File, path: Path, key: str, default: Any = None) -> Any:
    if key not in f.attrs:
        if default is None:
            raise CacheError(f"{path}: root attribute {key!r} is missing; the file is not a "
                             f"complete eenet exit cache")
        return default
    value = f.attrs[key]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _read_dataset(f: h5py.File, path: Path, key: str) -> np.ndarray:
    if key not in f:
        raise CacheError(f"{path}: dataset {key!r} is missing; the file is not a complete "
                         f"eenet exit cache (rebuild it with `eenet cache` or `eenet import`)")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise CacheError(f"{path}: {key!r} is not a dataset")
    try:
        if ds.ndim == 3:
            out = np.empty(ds.shape, dtype=ds.dtype)
            rows = _rows_per_block(ds.shape[1], ds.shape[2], ds.dtype.itemsize,
                                   _READ_ROWS_BYTES)
            for start in range(0, ds.shape[0], rows):
                ds.read_direct(out, np.s_[start:start + rows], np.s_[start:start + rows])
            return out
        return ds[()]
    except (OSError, ValueError, TypeError) as err:
        raise CacheError(f"{path}: dataset {key!r} cannot be read, the file is corrupt "
                         f"({str(err).splitlines()[0]}); rebuild it") from None


def read_cache(path: str | os.PathLike) -> ExitCache:
    """Read and validate an exit cache written by :func:`write_cache` or ``eenet cache``.

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
        f = h5py.File(path, "r")
    except OSError as err:
        raise CacheError(f"{path}: cannot open the HDF5 file ({str(err).splitlines()[0]}); "
                         f"it is corrupt, rebuild it") from None
    with f:
        fmt = f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT_NAME:
            raise CacheError(f"{path}: attribute 'format' is {fmt!r}, expected "
                             f"{FORMAT_NAME!r}; this HDF5 file is not an eenet exit cache")
        version = int(_attr(f, path, "format_version"))
        if version > FORMAT_VERSION:
            raise CacheError(f"{path}: format_version {version} is newer than this eenet "
                             f"reads ({FORMAT_VERSION}); upgrade eenet")
        logits = _read_dataset(f, path, "logits")
        labels = _read_dataset(f, path, "labels")
        costs = _read_dataset(f, path, "costs")
        ids = _read_dataset(f, path, "sample_ids") if "sample_ids" in f else None
        try:
            names = tuple(json.loads(_attr(f, path, "exit_names", "[]")))
            vector_names = json.loads(_attr(f, path, "cost_vectors", "[]"))
        except json.JSONDecodeError:
            raise CacheError(f"{path}: attribute 'exit_names' or 'cost_vectors' is not "
                             f"valid JSON") from None
        extra = {name: _read_dataset(f, path, name) for name in vector_names}
        known = {"format", "format_version", "cost_unit", "cost_source", "logits_kind",
                 "exit_names", "cost_vectors", "model", "dataset", "split"}
        attrs = {k: _attr(f, path, k) for k in f.attrs if k not in known}
        meta = {k: str(_attr(f, path, k, "")) for k in ("model", "dataset", "split")}
        cost_unit = str(_attr(f, path, "cost_unit"))
        cost_source = str(_attr(f, path, "cost_source", "given"))
        logits_kind = str(_attr(f, path, "logits_kind", "logits"))
    if logits.ndim != 3:
        raise CacheError(f"{path}: dataset 'logits' has shape {logits.shape}, expected "
                         f"[n_samples, n_exits, n_classes]")
    try:
        return ExitCache(logits=logits, labels=labels, costs=costs, cost_unit=cost_unit,
                         cost_source=cost_source, exit_names=names, logits_kind=logits_kind,
                         extra_costs=extra, sample_ids=ids, attrs=attrs, path=str(path),
                         **meta)
    except CacheError:
        raise
    except EenetError as err:
        raise CacheError(str(err)) from None
