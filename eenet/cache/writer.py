"""Writing an exit cache: :class:`CacheWriter` (streamed, atomic), :func:`write_cache`
(a whole :class:`~eenet.cache.exit_cache.ExitCache`) and :func:`merge_shards`.

HDF5 writes through a guarded file object, so a failed write (a full disk)
becomes one line and no half-written file is left.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import h5py
import numpy as np

from eenet import __version__
from eenet._validation import (CacheError, EenetError, atomic_output, check_costs,
                               first_line)
from eenet.cache.chunks import ChunkBuffer
from eenet.cache.exit_cache import ExitCache
from eenet.cache.features import check_features
from eenet.cache.layout import (FORMAT_NAME, FORMAT_VERSION, SHARD_FORMAT, LogitsKind,
                                chunk_rows_for)
from eenet.cache.reader import iter_encoded_chunks, open_checked

__all__ = ["CacheWriter", "check_output_path", "merge_shards", "write_cache"]

_MIN_LABEL_CHUNK = 8192


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``, refused at once if it is a directory or its directory is missing.

    Raises:
        CacheError: naming the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise CacheError(f"{path}: is a directory; give a file name such as "
                         f"{path / 'val.h5'}")
    if not path.parent.is_dir():
        raise CacheError(f"{path}: output directory {path.parent} does not exist; create it "
                         f"first (mkdir -p {path.parent})")
    return path


class _GuardedFile:
    """The file object HDF5 writes through: the first failed write is kept, later ones dropped.

    Written by hand because HDF5 (2.0 with h5py 3.16) crashes the process when
    a file whose write failed is closed twice, and h5py closes it again at
    exit: after a full disk, ``eenet import`` ended in a segmentation fault.
    Here HDF5 never sees a failed write: once one fails, writes are discarded,
    HDF5 finishes and closes normally, and the writer re-raises the first error
    (the file is deleted; its contents no longer matter).
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = os.fstat(self.fd).st_size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = os.preadv(self.fd, [buf], self.pos)
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self.fd).st_size - self.pos)
        data = os.pread(self.fd, size, self.pos)
        self.pos += len(data)
        return data

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as err:
                self.error = err
        self.pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self.error = err
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def _attr_value(value: Any) -> Any:
    if isinstance(value, str):
        # h5py refuses str subclasses such as torch.__version__, and text HDF5 cannot store
        # as UTF-8: a file name of bytes that are not UTF-8 keeps them as \xNN escapes
        return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, (int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value)


def _unlink_on_error(path: Path) -> Any:
    def exit_(exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            path.unlink(missing_ok=True)
        return False
    return exit_


class CacheWriter:
    """Stream an exit cache to disk batch by batch; the file appears only when complete.

    Use as a context manager. Rows are appended with :meth:`write` (or whole
    compressed chunks with :meth:`write_chunk`); costs are set with
    :meth:`set_costs` before the block ends. On an exception inside the block,
    or when no rows or no costs were written, the temporary file is deleted
    and nothing is left at ``path``. A write that fails (a full disk) becomes
    one line naming the path and the fix, with nothing left behind.

    Args:
        path: target ``.h5`` path; its directory must exist.
        n_exits, n_classes: the logits' trailing dimensions.
        dtype: ``"float32"`` (default) or ``"float16"``.
        logits_kind: ``"logits"`` or ``"log_probs"``.
        model, dataset, split, exit_names, attrs: provenance written as root
            attributes.
        compression: ``"gzip"`` (shuffle + deflate, default) or ``None``.
        with_sample_ids: store ``sample_ids`` (the rows' dataset indices).
        chunk_rows: rows per chunk (default about 1 MiB of logits).
        expected_rows: the number of rows to come, if known: once the first
            chunk is compressed the file's size is extrapolated, and a disk
            too small for it stops the run at once.
        shard: write a shard (no costs; merged by :func:`merge_shards`)
            straight to ``path`` instead of a finished cache.
        feature_dims: store per-exit features, ``d_k`` columns for exit ``k``
            (float16 datasets ``features_k``); every :meth:`write` then
            passes them. ``None``: no features.
        feature_projections: per exit, the ``[d_in_k, d_k]`` matrix the
            features were projected with (stored as ``feature_projection_k``)
            or ``None``.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from eenet.cache import read_cache
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
                 with_sample_ids: bool = False, chunk_rows: int | None = None,
                 expected_rows: int | None = None, shard: bool = False,
                 feature_dims: Sequence[int] | None = None,
                 feature_projections: Sequence[np.ndarray | None] | None = None) -> None:
        self.path = check_output_path(path)
        if dtype not in ("float32", "float16"):
            raise EenetError(f"unknown dtype {dtype!r}; choose one of: float16, float32")
        if compression not in ("gzip", None):
            raise EenetError(f"compression must be 'gzip' or None, got {compression!r}")
        self.n_exits, self.n_classes = int(n_exits), int(n_classes)
        self.dtype = np.dtype(dtype)
        self.logits_kind = logits_kind
        self.meta = {"model": model, "dataset": dataset, "split": split}
        self.exit_names = list(exit_names) if exit_names else [f"exit{i}"
                                                               for i in range(self.n_exits)]
        if len(self.exit_names) != self.n_exits:
            raise EenetError(f"exit_names has {len(self.exit_names)} names for "
                             f"{self.n_exits} exits; give one name per exit")
        self.attrs = dict(attrs or {})
        self.compression = compression
        self.with_sample_ids = with_sample_ids
        self.chunk_rows = int(chunk_rows or chunk_rows_for(self.n_exits, self.n_classes,
                                                           self.dtype.itemsize))
        self.expected_rows = expected_rows
        self.shard = shard
        self.feature_dims = None if feature_dims is None else [int(d) for d in feature_dims]
        if self.feature_dims is not None and len(self.feature_dims) != self.n_exits:
            raise EenetError(f"feature_dims has {len(self.feature_dims)} sizes for "
                             f"{self.n_exits} exits; give one per exit")
        self.feature_projections = list(feature_projections or [None] * self.n_exits)
        self.n_feature_rows = 0
        self.n_written = 0
        self._costs: dict[str, Any] | None = None
        self._file: h5py.File | None = None
        self._guard: _GuardedFile | None = None
        self._stack = ExitStack()
        self._buffer = ChunkBuffer(self.chunk_rows, self.n_exits, self.n_classes, self.dtype,
                                   compression, where=f"{self.path}: ")

    # ---- opening and closing ----------------------------------------------
    def __enter__(self) -> "CacheWriter":
        with ExitStack() as stack:
            if self.shard:
                tmp = self.path
                stack.push(_unlink_on_error(tmp))
            else:
                tmp = stack.enter_context(atomic_output(self.path))
            self._guard = _GuardedFile(tmp)
            stack.callback(self._guard.close)
            self._file = self._h5(lambda: h5py.File(self._guard, "w"), "create the file")
            stack.callback(self._close_h5)
            self._h5(self._create_datasets, "create the datasets")
            self._stack = stack.pop_all()
        return self

    def _create_datasets(self) -> None:
        f, r = self._file, self.chunk_rows
        comp: dict[str, Any] = {"compression": "gzip", "compression_opts": 1,
                                "shuffle": True} if self.compression == "gzip" else {}
        f.create_dataset("logits", shape=(0, self.n_exits, self.n_classes), dtype=self.dtype,
                         maxshape=(None, self.n_exits, self.n_classes),
                         chunks=(r, self.n_exits, self.n_classes), **comp)
        label_chunk = max(r, _MIN_LABEL_CHUNK)
        names = ["labels"] + (["sample_ids"] if self.with_sample_ids else [])
        for name in names:
            f.create_dataset(name, shape=(0,), dtype=np.int64, maxshape=(None,),
                             chunks=(label_chunk,))
        for k, d in enumerate(self.feature_dims or ()):
            # float16 hidden features compress poorly: stored plainly, in chunks of about
            # 128 KiB, so the padding of the last chunk stays small
            f.create_dataset(f"features_{k}", shape=(0, d), dtype=np.float16,
                             maxshape=(None, d), chunks=(max(1, min(r, (1 << 16) // d)), d))

    def _close_h5(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # nothing is kept of a failed file; the guard holds the cause
                pass

    def _h5(self, fn: Any, what: str) -> Any:
        """Run one h5py step; a failed disk write or an HDF5 error becomes one line."""
        try:
            out = fn()
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            if self._guard is not None and self._guard.error is not None:
                raise self._guard.error from None
            fix = ("check the disk and write to another path" if isinstance(err, OSError)
                   else "not a disk problem: rerun with --debug and report it")
            raise CacheError(f"{self.path}: HDF5 could not {what} ({first_line(err)}); "
                             f"{fix}") from None
        if self._guard is not None and self._guard.error is not None:
            raise self._guard.error
        return out

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stack, self._stack = self._stack, ExitStack()
        stack.callback(self._buffer.close)
        if exc_type is not None:
            # The temporary file goes; an OSError (a full disk) becomes one line.
            return bool(stack.__exit__(exc_type, exc, tb))
        with stack:
            if self.n_written + self._buffer.filled == 0:
                raise EenetError(f"{self.path}: no samples were written; the dataset is "
                                 f"empty")
            if self._costs is None and not self.shard:
                raise EenetError(f"{self.path}: no per-exit costs were set; call "
                                 f"set_costs() before the block ends")
            for chunk in self._buffer.finish():
                self._store(*chunk)
            if self.feature_dims is not None and self.n_feature_rows != self.n_written:
                raise EenetError(f"{self.path}: {self.n_feature_rows} rows of features for "
                                 f"{self.n_written} samples; give features with every batch")
            self._h5(self._finish, "write the costs and attributes")
            f, self._file = self._file, None
            self._h5(f.close, "close the file")
            if self._guard is not None and self._guard.error is not None:
                raise self._guard.error
        return False

    # ---- rows ----------------------------------------------------------------
    def write(self, logits: np.ndarray, labels: np.ndarray,
              sample_ids: np.ndarray | None = None,
              features: Sequence[np.ndarray] | None = None) -> None:
        """Append a batch: ``logits`` [batch, n_exits, n_classes], ``labels`` [batch].

        ``sample_ids`` [batch] default to the rows' positions; ``features``
        (one ``[batch, d_k]`` array per exit) are required when the writer
        was made with ``feature_dims`` and refused otherwise.
        """
        if self._file is None:
            raise RuntimeError("CacheWriter.write() called outside its `with` block")
        if (features is None) != (self.feature_dims is None):
            raise EenetError(f"{self.path}: give features with every batch exactly when the "
                             f"writer has feature_dims ({self.feature_dims})")
        if features is not None:
            self._write_features(features, np.asarray(labels).shape[0])
        for chunk in self._buffer.add(logits, labels, sample_ids):
            self._store(*chunk)

    def _write_features(self, features: Sequence[np.ndarray], batch: int) -> None:
        assert self.feature_dims is not None
        half, _ = check_features(features, None, batch, self.n_exits, f"{self.path}: ")
        for k, d in enumerate(self.feature_dims):
            if half[k].shape[1] != d:
                raise EenetError(f"{self.path}: features of exit {k} have {half[k].shape[1]} "
                                 f"columns, expected {d}")
        start, stop = self.n_feature_rows, self.n_feature_rows + batch

        def put() -> None:
            for k, rows in enumerate(half):
                ds = self._file[f"features_{k}"]
                ds.resize(stop, axis=0)
                ds[start:stop] = rows

        self._h5(put, "write the features")
        self.n_feature_rows = stop

    def write_chunk(self, data: bytes, labels: np.ndarray, sample_ids: np.ndarray) -> None:
        """Append one compressed chunk as :func:`encode_chunk` made it (for merges).

        Args:
            data: the chunk's stored bytes, ``chunk_rows`` rows of this writer's
                dtype and compression.
            labels, sample_ids: int64 [rows], ``rows <= chunk_rows``; only the
                last chunk of a file may be short.
        """
        if self._file is None:
            raise RuntimeError("CacheWriter.write_chunk() called outside its `with` block")
        if self._buffer.filled or self.n_written % self.chunk_rows:
            raise RuntimeError("write_chunk() after a short chunk or a partial write()")
        if self.feature_dims is not None:
            raise EenetError(f"{self.path}: whole chunks carry no features; write features "
                             f"with write()")
        self._store(data, np.asarray(labels, np.int64), np.asarray(sample_ids, np.int64))

    def _store(self, data: bytes, labels: np.ndarray, ids: np.ndarray) -> None:
        start, stop = self.n_written, self.n_written + labels.shape[0]
        self._check_space(len(data))

        def put() -> None:
            f = self._file
            f["logits"].resize(stop, axis=0)
            f["logits"].id.write_direct_chunk((start, 0, 0), data, 0)
            f["labels"].resize(stop, axis=0)
            f["labels"][start:stop] = labels
            if self.with_sample_ids:
                f["sample_ids"].resize(stop, axis=0)
                f["sample_ids"][start:stop] = ids

        self._h5(put, "write a chunk")
        self.n_written = stop

    def _check_space(self, chunk_bytes: int) -> None:
        """After the first chunk: stop at once if the disk cannot hold the whole file."""
        if self.n_written or not self.expected_rows or self.expected_rows <= self.chunk_rows:
            return
        need = chunk_bytes * -(-self.expected_rows // self.chunk_rows) + \
            16 * self.expected_rows + (1 << 20)
        free = shutil.disk_usage(self.path.parent).free
        if need > free:
            raise CacheError(f"{self.path}: the cache needs about {need / 2**20:.0f} MiB but "
                             f"{free / 2**20:.0f} MiB are free on that disk; free some space "
                             f"or write to another disk")

    # ---- costs and attributes --------------------------------------------
    def set_costs(self, costs: Sequence[float], *, cost_unit: str, cost_source: str,
                  extra: Mapping[str, Sequence[float]] | None = None) -> None:
        """Record the chosen cumulative cost vector and every other one computed."""
        self._costs = {
            "costs": check_costs(costs, self.n_exits, name=f"{self.path}: costs"),
            "cost_unit": str(cost_unit), "cost_source": str(cost_source),
            "extra": {k: check_costs(v, self.n_exits, name=f"{self.path}: {k}")
                      for k, v in dict(extra or {}).items()},
        }

    def _finish(self) -> None:
        f = self._file
        costs = self._costs or {"costs": None, "cost_unit": "", "cost_source": "",
                                "extra": {}}
        if costs["costs"] is not None:
            f.create_dataset("costs", data=costs["costs"])
        for name, vec in costs["extra"].items():
            if name in f:
                raise EenetError(f"{self.path}: cost vector name {name!r} clashes with a "
                                 f"dataset of the cache; rename it")
            f.create_dataset(name, data=vec)
        for k, proj in enumerate(self.feature_projections if self.feature_dims else ()):
            if proj is not None:
                f.create_dataset(f"feature_projection_{k}", data=np.asarray(proj, np.float32))
        attrs = {
            "format": SHARD_FORMAT if self.shard else FORMAT_NAME,
            "format_version": FORMAT_VERSION, "eenet_version": __version__,
            "cost_unit": costs["cost_unit"], "cost_source": costs["cost_source"],
            "logits_kind": self.logits_kind, "exit_names": json.dumps(self.exit_names),
            "cost_vectors": json.dumps(sorted(costs["extra"])),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "chunk_rows": self.chunk_rows, "device": "", "seed": -1, **self.meta,
        }
        reserved = set(attrs) - {"device", "seed", "created"}
        attrs.update({k: v for k, v in self.attrs.items()
                      if k not in reserved and k != "feature_dims"})  # a copy's, stale here
        if self.feature_dims is not None:
            attrs["feature_dims"] = json.dumps(self.feature_dims)
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
    with CacheWriter(path, n_exits=cache.n_exits, n_classes=cache.n_classes, dtype=dtype,
                     logits_kind=cache.logits_kind, model=cache.model, dataset=cache.dataset,
                     split=cache.split, exit_names=cache.exit_names, attrs=dict(cache.attrs),
                     with_sample_ids=cache.sample_ids is not None,
                     expected_rows=cache.n_samples,
                     feature_dims=None if cache.features is None else
                     [f.shape[1] for f in cache.features],
                     feature_projections=cache.feature_projections) as w:
        rows = w.chunk_rows
        for start in range(0, cache.n_samples, rows):
            sl = slice(start, start + rows)
            w.write(cache.logits[sl], cache.labels[sl],
                    None if cache.sample_ids is None else cache.sample_ids[sl],
                    None if cache.features is None else [f[sl] for f in cache.features])
        w.set_costs(cache.costs, cost_unit=cache.cost_unit, cost_source=cache.cost_source,
                    extra=cache.extra_costs)
    return Path(path)


def merge_shards(out: str | os.PathLike, shards: Sequence[str | os.PathLike], *,
                 costs: Sequence[float], cost_unit: str, cost_source: str,
                 extra: Mapping[str, Sequence[float]] | None = None,
                 **writer_args: Any) -> Path:
    """Copy shards' compressed chunks, in order, into one cache at ``out`` (atomically).

    Args:
        out: the merged cache.
        shards: shard files in sample order; every one but the last holds whole chunks.
        costs, cost_unit, cost_source, extra: the merged cache's costs.
        **writer_args: :class:`CacheWriter` arguments (dims, dtype, provenance);
            ``chunk_rows`` must equal the shards'.

    Raises:
        CacheError: a shard is missing, damaged, or has another chunk layout.
    """
    writer = CacheWriter(out, **writer_args)
    with writer:
        for i, shard in enumerate(shards):
            shard = Path(shard)
            if not shard.is_file():
                raise CacheError(f"{shard}: shard {i} is missing; every rank must write to a "
                                 f"directory rank 0 can read (a shared filesystem)")
            with open_checked(shard, (SHARD_FORMAT,)) as f:
                ds = f["logits"]
                layout = (ds.chunks, ds.dtype, ds.compression)
            want = ((writer.chunk_rows, writer.n_exits, writer.n_classes), writer.dtype,
                    writer.compression)
            if layout != want:
                raise CacheError(f"{shard}: chunk layout {layout} differs from the merged "
                                 f"file's {want}; rerun all ranks with the same arguments")
            for data, labels, ids in iter_encoded_chunks(shard):
                writer.write_chunk(data, labels, ids)
        writer.set_costs(costs, cost_unit=cost_unit, cost_source=cost_source, extra=extra)
    return Path(out)
