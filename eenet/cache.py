"""HDF5 exit cache: every exit's output for one dataset split, in one file.

A multi-exit network is run once per split; every policy and budget after
that works on this file alone. This module is the only one that imports
h5py; it holds the reader and the writer together so the layout below is
defined in one place (hence its length, above the usual ~500 lines).

File layout (``format = "eenet-exit-cache"``, ``format_version = 1``)::

    /logits        float32 or float16 [n_samples, n_exits, n_classes]
                   chunked along samples (``chunk_rows`` rows per chunk),
                   shuffle + deflate (HDF5's gzip filter). Raw logits, or log-probabilities
                   when the root attribute ``logits_kind == "log_probs"``.
    /labels        int64 [n_samples], in [0, n_classes)
    /costs         float64 [n_exits], cumulative cost of reaching each exit
                   (backbone up to the exit plus every head at or before it),
                   in ``cost_unit``
    /sample_ids    int64 [n_samples]: the dataset index of each row (optional)
    /<name>        float64 [n_exits], every other cost vector computed, named
                   in the root attribute ``cost_vectors`` (for example
                   ``latency_ms_batch1``, ``latency_ms_batchB``, ``flops``)

Root attributes: ``format``, ``format_version``, ``eenet_version``,
``model``, ``dataset``, ``split``, ``cost_unit``, ``cost_source``
(``measured`` / ``flops`` / ``given``), ``device``, ``created`` (ISO 8601),
``exit_names`` (a JSON list), ``cost_vectors`` (a JSON list), ``logits_kind``,
``seed``, ``chunk_rows``, and any extra string or number attributes the writer
was given (``costs_from`` when the costs were copied from another cache;
``world_size`` and ``cost_rank`` when several processes made it).

Writing. Rows are gathered into whole chunks, each compressed once (by
:func:`encode_chunk`, outside HDF5, so a writer thread compresses while the
model computes) and stored with HDF5's direct chunk write. The file is
written under a temporary name (:func:`eenet._validation.atomic_output`) and
renamed only once complete, so an interrupted run never leaves a file that
looks valid. HDF5 writes through a guarded file object: when the disk fills
(or any write fails), later writes are discarded, HDF5 closes cleanly, the
temporary file is deleted and the caller gets one line naming the problem.

Shards and the merged file. ``eenet cache`` run by ``torchrun`` gives each
rank a contiguous range of whole chunks; each rank writes its range to its
own shard file, a file of this layout (``format = "eenet-exit-cache-shard"``,
no costs) whose chunk ``i`` is chunk ``first_chunk + i`` of the whole split.
Rank 0 then copies the shards' compressed chunks, in rank order, into one
ordinary cache (:func:`merge_shards`, no recompression) and the shards are
deleted. The merged file is byte for byte the layout above, so it can be
moved or copied alone, and its rows are in the dataset's order, as a
single-process run writes them.

:func:`read_cache` checks the format name and version before it reads
anything else, and every error names the file and the key.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import h5py
import numpy as np

from eenet import __version__
from eenet._validation import (CacheError, EenetError, atomic_output, check_costs,
                               check_labels, check_number)

__all__ = ["CacheCosts", "CacheWriter", "ChunkBuffer", "ExitCache", "FORMAT_NAME",
           "FORMAT_VERSION", "check_output_path", "chunk_rows_for", "encode_chunk",
           "iter_encoded_chunks", "merge_shards", "read_cache", "read_costs", "stratified_split",
           "summarize_cache", "write_cache"]

FORMAT_NAME = "eenet-exit-cache"
SHARD_FORMAT = "eenet-exit-cache-shard"
FORMAT_VERSION = 1
LogitsKind = Literal["logits", "log_probs"]
_CHUNK_BYTES = 1 << 20  # ~1 MiB of logits per HDF5 chunk
_READ_ROWS_BYTES = 64 << 20  # rows per block when reading or scanning
_SUMMARY_ROWS_BYTES = 4 << 20  # rows per block when only arg-max is kept
_MIN_LABEL_CHUNK = 8192


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def _rows_per_block(n_exits: int, n_classes: int, itemsize: int, target: int) -> int:
    return max(1, target // max(1, n_exits * n_classes * itemsize))


def chunk_rows_for(n_exits: int, n_classes: int, itemsize: int = 4,
                   multiple_of: int = 1) -> int:
    """Rows per HDF5 chunk: about 1 MiB of logits, a multiple of ``multiple_of``.

    A multiple of the batch size keeps every batch inside one chunk, so a run
    resumed (or sharded) at a chunk boundary sees the same batches as one run.

    Example:
        >>> chunk_rows_for(4, 10), chunk_rows_for(4, 10, multiple_of=256)
        (6553, 6400)
    """
    rows = _rows_per_block(n_exits, n_classes, itemsize, _CHUNK_BYTES)
    return max(multiple_of, rows - rows % multiple_of)


# ---------------------------------------------------------------------------
# the in-memory cache
# ---------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (rest, held-out) indices, stratified by label.

    The held-out part has ``round(fraction * n_samples)`` samples, and every
    class gives it about ``fraction`` of its members (within a sample or so).
    Each sample gets a within-class quantile, its random rank in its class
    plus a uniform jitter, over the class size; the lowest quantiles are held
    out. (A per-class ``round`` would hold out nothing from classes of one or
    two samples, and nothing at all with many small classes.) The held-out
    part is empty when ``fraction`` is 0 or one side would be empty.

    Args:
        labels: int [n_samples] class labels.
        fraction: share held out, in [0, 1].
        seed: seed of the shuffle and the jitter.

    Returns:
        ``(rest_idx, held_idx)``: sorted int64 arrays that partition ``range(n_samples)``.

    Example:
        >>> rest, held = stratified_split(np.repeat([0, 1], 10), 0.3, seed=0)
        >>> len(rest), len(held), int((held >= 10).sum())
        (14, 6, 3)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise EenetError(f"labels must be 1-D [n_samples], got shape {labels.shape}")
    fraction = check_number("holdout fraction", fraction, low=0.0, high=1.0)
    n = labels.size
    everyone = np.arange(n)
    n_held = int(round(fraction * n))
    if n_held == 0 or n_held >= n:
        return everyone, everyone[:0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    by_class = order[np.argsort(labels[order], kind="stable")]  # grouped, shuffled within
    _, starts, sizes = np.unique(labels[by_class], return_index=True, return_counts=True)
    rank = np.arange(n) - np.repeat(starts, sizes)
    quantile = (rank + rng.random(n)) / np.repeat(sizes, sizes)
    held = np.sort(by_class[np.argsort(quantile, kind="stable")[:n_held]])
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def _summary(meta: Mapping[str, Any], correct: np.ndarray) -> dict[str, Any]:
    """What ``eenet info`` shows, from provenance and correctness [n_samples, n_exits]."""
    n, k = correct.shape
    return {
        "path": meta.get("path"), "model": meta.get("model", ""),
        "dataset": meta.get("dataset", ""), "split": meta.get("split", ""),
        "n_samples": int(n), "n_exits": int(k), "n_classes": int(meta["n_classes"]),
        "exit_names": list(meta["exit_names"]),
        "costs": [float(c) for c in meta["costs"]], "cost_unit": meta["cost_unit"],
        "cost_source": meta["cost_source"],
        "cost_vectors": {name: [float(x) for x in v]
                         for name, v in dict(meta["extra_costs"]).items()},
        "exit_accuracy": [float(a) for a in correct.mean(axis=0)],
        "last_exit_accuracy": float(correct[:, -1].mean()),
        "oracle_accuracy": float(correct.any(axis=1).mean()),
        "logits_dtype": str(meta["logits_dtype"]), "logits_kind": meta["logits_kind"],
        "device": meta["attrs"].get("device", ""), "created": meta["attrs"].get("created", ""),
        "eenet_version": meta["attrs"].get("eenet_version", ""),
    }


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
        labels = check_labels(self.labels, n, c, where=where)
        costs = check_costs(self.costs, k, name=f"{where}costs")
        names = tuple(str(s) for s in self.exit_names) or tuple(f"exit{i}" for i in range(k))
        if len(names) != k:
            raise EenetError(f"{where}exit_names has {len(names)} names for {k} exits; give "
                             f"one name per exit")
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
        """Split into (rest, held_out) with :func:`stratified_split`.

        Args:
            fraction: share of samples held out, in (0, 1).
            seed: seed of the split.

        Returns:
            Two caches over disjoint samples; the second holds about
            ``fraction`` of every class.

        Raises:
            EenetError: a fraction outside (0, 1), or one that leaves a side empty.
        """
        if not 0 < fraction < 1:
            raise EenetError(f"holdout fraction must lie in (0, 1), got {fraction}")
        rest, held = stratified_split(self.labels, fraction, seed)
        if held.size == 0 or rest.size == 0:
            raise EenetError(f"holdout fraction {fraction} leaves one side empty for "
                             f"{self.n_samples} samples; choose a fraction between "
                             f"{1 / self.n_samples:.3g} and {1 - 1 / self.n_samples:.3g}")
        return self.subset(rest), self.subset(held)

    def summary(self) -> dict[str, Any]:
        """What ``eenet info`` shows: sizes, costs, per-exit and oracle accuracy."""
        meta = {"path": self.path, "model": self.model, "dataset": self.dataset,
                "split": self.split, "n_classes": self.n_classes,
                "exit_names": self.exit_names, "costs": self.costs,
                "cost_unit": self.cost_unit, "cost_source": self.cost_source,
                "extra_costs": self.extra_costs, "logits_dtype": self.logits.dtype,
                "logits_kind": self.logits_kind, "attrs": self.attrs}
        return _summary(meta, self.correct())


def _scan_finite(logits: Any, name: str, offset: int = 0) -> None:
    rows = _rows_per_block(logits.shape[1], logits.shape[2], 4, _READ_ROWS_BYTES)
    for start in range(0, logits.shape[0], rows):
        bad = ~np.isfinite(logits[start:start + rows])
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise EenetError(f"{name} contains non-finite values (NaN or inf), first at "
                             f"[sample {offset + start + first[0]}, exit {first[1]}, class "
                             f"{first[2]}]; fix the model or drop those samples")


# ---------------------------------------------------------------------------
# chunks
# ---------------------------------------------------------------------------
def encode_chunk(block: np.ndarray, compression: str | None = "gzip") -> bytes:
    """The stored bytes of one logits chunk: HDF5's shuffle filter, then deflate.

    Written by hand so compression runs outside HDF5 (zlib releases the GIL,
    so writer threads compress while the model computes): the shuffle filter
    stores byte ``j`` of every element together, byte plane by byte plane,
    which is a transpose of the ``[n_elements, itemsize]`` byte matrix. The
    deflate stream uses Huffman coding only (zlib's ``Z_HUFFMAN_ONLY``): the
    byte planes of float logits have skewed byte frequencies but few repeats
    to match. Measured against level 1: twice as fast on the bundled
    network's logits (0.82 of the raw bytes against 0.84), 3.5 times on the
    1,000-class synthetic ones of ``benchmarks/cache_speed.py`` (0.84 against
    0.86). Any deflate reader, HDF5's filter included, decodes it.

    Args:
        block: a full chunk [chunk_rows, n_exits, n_classes] of the storage dtype.
        compression: ``"gzip"`` (shuffle + deflate) or ``None`` (raw bytes).
    """
    raw = np.ascontiguousarray(block)
    if compression is None:
        return raw.tobytes()
    planes = raw.view(np.uint8).reshape(-1, raw.dtype.itemsize).T  # [itemsize, n_elements]
    # One plane at a time: the same zlib stream as compressing them joined, with a
    # quarter of the temporary memory for float32.
    z = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_HUFFMAN_ONLY)
    parts = [z.compress(np.ascontiguousarray(plane)) for plane in planes]
    return b"".join(parts + [z.flush()])


class ChunkBuffer:
    """Gather batches of rows into whole chunks of the storage dtype, compressed once each.

    Checks every batch as it comes (shape, labels in range, finite values
    after the cast, which catches float16 overflow) and names the bad row.
    Whole chunks are compressed on ``workers`` threads (zlib releases the
    GIL), and come back in order, a few chunks behind the rows added.

    Args:
        chunk_rows, n_exits, n_classes: the chunk shape.
        dtype: the storage dtype (float32 or float16).
        compression: ``"gzip"`` or ``None``, as :func:`encode_chunk`.
        where: prefix of error messages (the file being written).
        workers: compression threads; ``None`` uses up to 4, one per core.

    Example:
        >>> buf = ChunkBuffer(4, 2, 3, np.float32, workers=1)
        >>> ready = [len(lab) for _, lab, _ in buf.add(np.zeros((10, 2, 3)), np.zeros(10, int))]
        >>> ready + [len(lab) for _, lab, _ in buf.finish()]
        [4, 4, 2]
    """

    def __init__(self, chunk_rows: int, n_exits: int, n_classes: int, dtype: Any,
                 compression: str | None = "gzip", where: str = "",
                 workers: int | None = None) -> None:
        self.chunk_rows, self.n_exits, self.n_classes = chunk_rows, n_exits, n_classes
        self.dtype = np.dtype(dtype)
        self.compression, self.where = compression, where
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.block = np.zeros((chunk_rows, n_exits, n_classes), self.dtype)
        self.labels = np.zeros(chunk_rows, np.int64)
        self.ids = np.zeros(chunk_rows, np.int64)
        self.filled = 0
        self.rows_seen = 0
        self._pending: collections.deque = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self._spare: list[np.ndarray] = []  # blocks back from compression, for reuse

    def _cast(self, logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the fix
            cast = logits.astype(self.dtype, copy=False)
        bad = ~np.isfinite(cast)
        if bad.any():
            first = np.argwhere(bad)[0]
            hint = ("the values overflow float16; use dtype float32"
                    if np.isfinite(logits).all() else "fix the model or the data")
            raise EenetError(f"{self.where}logits of sample {int(ids[first[0]])} exit "
                             f"{int(first[1])} are not finite; {hint}")
        return cast

    def add(self, logits: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray | None = None
            ) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
        """Add a batch; yields the compressed chunks that are ready, in order.

        Each chunk is ``(data, labels, sample_ids)``: its stored bytes and its
        rows' int64 labels and ids.

        Args:
            logits: [batch, n_exits, n_classes].
            labels: [batch] class indices.
            sample_ids: [batch]; default the rows' positions in the stream.
        """
        logits = np.asarray(logits)
        b = logits.shape[0] if logits.ndim == 3 else -1
        if logits.ndim != 3 or logits.shape[1:] != (self.n_exits, self.n_classes):
            raise EenetError(f"{self.where}a batch of logits has shape {logits.shape}, "
                             f"expected [batch, {self.n_exits}, {self.n_classes}]")
        labels = check_labels(labels, b, self.n_classes, where=self.where)
        ids = np.arange(self.rows_seen, self.rows_seen + b) if sample_ids is None \
            else np.asarray(sample_ids, dtype=np.int64)
        cast = self._cast(logits, ids)
        self.rows_seen += b
        done = 0
        while done < b:
            take = min(b - done, self.chunk_rows - self.filled)
            rows = slice(self.filled, self.filled + take)
            self.block[rows] = cast[done:done + take]
            self.labels[rows] = labels[done:done + take]
            self.ids[rows] = ids[done:done + take]
            self.filled += take
            done += take
            if self.filled == self.chunk_rows:
                self._submit()
                while len(self._pending) > self.workers:
                    yield self._next()

    def _submit(self) -> None:
        """Hand the gathered rows, zero-padded to a full chunk, to a compression thread."""
        n, self.filled = self.filled, 0
        if n < self.chunk_rows:
            self.block[n:] = 0  # an edge chunk is stored full size
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="eenet-compress")
        # The filled block goes to a thread; the next rows go to a spare one. Reusing
        # blocks keeps large buffers from being allocated (and retained) per chunk.
        full, self.block = self.block, self._spare.pop() if self._spare else \
            np.empty_like(self.block)
        data = self._pool.submit(encode_chunk, full, self.compression)
        self._pending.append((data, full, self.labels[:n].copy(), self.ids[:n].copy()))

    def _next(self) -> tuple[bytes, np.ndarray, np.ndarray]:
        data, block, labels, ids = self._pending.popleft()
        out = data.result()
        self._spare.append(block)
        return out, labels, ids

    def finish(self, partial: bool = True) -> list[tuple[bytes, np.ndarray, np.ndarray]]:
        """Every chunk still to come, in order; with ``partial`` the last, short one too."""
        if self.filled and partial:
            self._submit()
        self.filled = 0
        out = [self._next() for _ in range(len(self._pending))]
        self.close()
        return out

    def close(self) -> None:
        """Stop the compression threads (pending chunks are dropped)."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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
        return str(value)  # h5py refuses str subclasses such as torch.__version__
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
                 with_sample_ids: bool = False, chunk_rows: int | None = None,
                 expected_rows: int | None = None, shard: bool = False) -> None:
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
            raise CacheError(f"{self.path}: HDF5 could not {what} ({_first_line(err)}); check "
                             f"the disk and write to another path") from None
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
            self._h5(self._finish, "write the costs and attributes")
            f, self._file = self._file, None
            self._h5(f.close, "close the file")
            if self._guard is not None and self._guard.error is not None:
                raise self._guard.error
        return False

    # ---- rows ----------------------------------------------------------------
    def write(self, logits: np.ndarray, labels: np.ndarray,
              sample_ids: np.ndarray | None = None) -> None:
        """Append a batch: ``logits`` [batch, n_exits, n_classes], ``labels`` [batch].

        ``sample_ids`` [batch] default to the rows' positions.
        """
        if self._file is None:
            raise RuntimeError("CacheWriter.write() called outside its `with` block")
        for chunk in self._buffer.add(logits, labels, sample_ids):
            self._store(*chunk)

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
        attrs.update({k: v for k, v in self.attrs.items() if k not in reserved})
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
                     expected_rows=cache.n_samples) as w:
        rows = w.chunk_rows
        for start in range(0, cache.n_samples, rows):
            sl = slice(start, start + rows)
            w.write(cache.logits[sl], cache.labels[sl],
                    None if cache.sample_ids is None else cache.sample_ids[sl])
        w.set_costs(cache.costs, cost_unit=cache.cost_unit, cost_source=cache.cost_source,
                    extra=cache.extra_costs)
    return Path(path)


def iter_encoded_chunks(path: str | os.PathLike
                        ) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
    """The stored chunks of a cache or shard, in order: ``(data, labels, sample_ids)``.

    ``data`` is a chunk's compressed bytes as :func:`encode_chunk` makes them;
    labels and ids are int64 [rows] (ids are the row positions when the file
    stores none).
    """
    path = Path(path)
    with _open_checked(path, (FORMAT_NAME, SHARD_FORMAT)) as f:
        ds = f["logits"]
        rows = ds.chunks[0]
        n = ds.shape[0]
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            try:
                mask, data = ds.id.read_direct_chunk((start, 0, 0))
            except (OSError, RuntimeError, KeyError) as err:
                raise CacheError(f"{path}: chunk at row {start} of 'logits' cannot be read "
                                 f"({_first_line(err)}); the file is damaged, "
                                 f"rebuild it") from None
            if mask:
                raise CacheError(f"{path}: chunk at row {start} was stored with filters "
                                 f"skipped; it cannot be copied, rebuild the file")
            ids = f["sample_ids"][start:stop] if "sample_ids" in f else np.arange(start, stop)
            yield bytes(data), f["labels"][start:stop], ids


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
            with _open_checked(shard, (SHARD_FORMAT,)) as f:
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


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
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


class _open_checked:
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
            raise CacheError(f"{path}: cannot open the HDF5 file ({_first_line(err)});"
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
            step = _rows_per_block(ds.shape[1], ds.shape[2], ds.dtype.itemsize,
                                   _READ_ROWS_BYTES)
            for start in range(0, ds.shape[0], step):
                ds.read_direct(out, np.s_[start:start + step], np.s_[start:start + step])
            return out
        return ds[()] if rows is None else ds[rows]
    except (OSError, ValueError, TypeError) as err:
        raise CacheError(f"{path}: dataset {key!r} cannot be read, the file is corrupt "
                         f"({_first_line(err)}); rebuild it") from None


def _read_meta(f: h5py.File, path: Path) -> dict[str, Any]:
    """Everything but the logits: labels, costs, ids, cost vectors and attributes."""
    try:
        names = tuple(json.loads(_attr(f, path, "exit_names", "[]")))
        vector_names = json.loads(_attr(f, path, "cost_vectors", "[]"))
    except json.JSONDecodeError:
        raise CacheError(f"{path}: attribute 'exit_names' or 'cost_vectors' is not "
                         f"valid JSON; rebuild the file") from None
    known = {"format", "format_version", "cost_unit", "cost_source", "logits_kind",
             "exit_names", "cost_vectors", "model", "dataset", "split"}
    return {
        "costs": _read_dataset(f, path, "costs"),
        "extra_costs": {name: _read_dataset(f, path, name) for name in vector_names},
        "exit_names": names, "attrs": {k: _attr(f, path, k) for k in f.attrs if k not in known},
        "cost_unit": str(_attr(f, path, "cost_unit")),
        "cost_source": str(_attr(f, path, "cost_source", "given")),
        "logits_kind": str(_attr(f, path, "logits_kind", "logits")),
        **{k: str(_attr(f, path, k, "")) for k in ("model", "dataset", "split")},
    }


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
    with _open_checked(path) as f:
        logits = _read_dataset(f, path, "logits")
        labels = _read_dataset(f, path, "labels")
        ids = _read_dataset(f, path, "sample_ids") if "sample_ids" in f else None
        meta = _read_meta(f, path)
    if logits.ndim != 3:
        raise CacheError(f"{path}: dataset 'logits' has shape {logits.shape}, expected "
                         f"[n_samples, n_exits, n_classes]; rebuild the file")
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
    with _open_checked(path) as f:
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
    with _open_checked(path) as f:
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
        step = _rows_per_block(k, c, ds.dtype.itemsize, _SUMMARY_ROWS_BYTES)
        step = max(ds.chunks[0], step - step % ds.chunks[0])  # whole chunks per read
        correct = np.empty((n, k), dtype=bool)
        for start in range(0, n, step):
            block = _read_dataset(f, path, "logits", slice(start, start + step))
            try:
                _scan_finite(block, f"{path}: logits", offset=start)
            except EenetError as err:
                raise CacheError(str(err)) from None
            correct[start:start + step] = block.argmax(axis=2) == \
                labels[start:start + step, None]
        meta.update(path=str(path), n_classes=c, logits_dtype=ds.dtype,
                    exit_names=meta["exit_names"] or tuple(f"exit{i}" for i in range(k)))
    return _summary(meta, correct)
