"""Where the rows go while the model runs: a writer thread, and the state of a resumable run.

:class:`BackgroundWriter` hands each batch to a sink (a
:class:`~eenet.cache.CacheWriter`, or a :class:`ChunkDirWriter`) on a thread
behind a bounded queue, so casting, compressing and writing overlap the
next forward; an error on the thread reaches the caller at its next batch.

A resumable run (``eenet cache --resume``) keeps its progress in a directory
next to the target, ``.NAME.eenet-partial/``::

    spec.json              the arguments that decide the cache's contents
    costs.json             the chosen cost vectors, once measured
    chunk-00000012.npz     one complete chunk: its compressed logits (``data``),
                           ``labels`` and ``sample_ids``; chunk i holds rows
                           [i * chunk_rows, (i + 1) * chunk_rows)

Each chunk file is written under a temporary name and renamed when whole,
so a killed run leaves only complete chunks (zip CRCs catch the rest). A
later run with ``--resume`` and the same arguments computes only the missing
chunks, reuses ``costs.json``, copies every chunk into the cache (no
recompression) and removes the directory. Chunk boundaries fall on batch
boundaries, so the resumed cache equals an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from eenet._validation import EenetError, atomic_output
from eenet.cache import ChunkBuffer

logger = logging.getLogger(__name__)

__all__ = ["BackgroundWriter", "ChunkDirWriter", "PartialRun"]

_STOP = object()


class BackgroundWriter:
    """Feed ``sink.write(logits, labels, sample_ids)`` from a thread with a bounded queue.

    Use as a context manager around the loop that produces batches. Leaving
    the block normally, or with an error, waits for the queued batches to be
    written; leaving it on Ctrl-C or SIGTERM drops them. Either way the thread
    has stopped before the block is left, so the sink can be cleaned up from
    the caller's thread.

    Args:
        sink: an object with ``write(logits, labels, sample_ids)``.
        depth: batches that may wait in the queue (bounds the memory held).

    Example:
        >>> class Sink:
        ...     rows = 0
        ...     def write(self, logits, labels, ids):
        ...         self.rows += len(labels)
        >>> s = Sink()
        >>> with BackgroundWriter(s) as bg:
        ...     for _ in range(3):
        ...         bg.put(np.zeros((2, 1, 2)), np.zeros(2, int), np.arange(2))
        >>> s.rows
        6
    """

    def __init__(self, sink: Any, depth: int = 2) -> None:
        self.sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eenet-cache-writer",
                                        daemon=True)

    def __enter__(self) -> "BackgroundWriter":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._abort.is_set():
                return
            logits, labels, ids, ready, features = item
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copy of this batch is done
                more = {} if features is None else {"features": features}
                self.sink.write(_numpy(logits), _numpy(labels), _numpy(ids), **more)
            except BaseException as err:  # handed to the caller's thread
                self._error = err
                return

    def put(self, logits: Any, labels: Any, sample_ids: Any, ready: Any = None,
            features: Any = None) -> None:
        """Queue one batch (numpy arrays or CPU tensors); ``ready`` is an event to wait on.

        ``features`` (per-exit arrays), when given, reach ``sink.write`` as a keyword.

        Raises:
            Exception: the error that stopped the writer thread, if any.
        """
        item = (logits, labels, sample_ids, ready, features)
        while True:
            self._raise_error()
            try:
                # A short timeout keeps the main thread responsive to signals.
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C or SIGTERM: stop at once. After an error the queued batches are
            # still written, so a resumable run keeps every chunk it completed.
            self._abort.set()
            _drain(self._queue)
        self._put_stop()
        self._thread.join()
        if exc_type is None:
            self._raise_error()
        return False

    def _put_stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                return
            except queue.Full:
                if self._abort.is_set():
                    _drain(self._queue)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _numpy(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)


# ---------------------------------------------------------------------------
# resumable runs
# ---------------------------------------------------------------------------
class PartialRun:
    """The on-disk state of a resumable ``eenet cache`` run (see the module docstring).

    Args:
        out: the cache the run will produce; the state lives next to it.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.dir = self.out.with_name(f".{self.out.name}.eenet-partial")

    def exists(self) -> bool:
        return (self.dir / "spec.json").is_file()

    def check(self, spec: Mapping[str, Any]) -> bool:
        """Whether an earlier run's state exists; it must have been started with ``spec``.

        Raises:
            EenetError: the earlier run was started with other arguments.
        """
        if not self.exists():
            return False
        spec = json.loads(json.dumps(dict(spec)))  # plain JSON values, as stored
        try:
            old = json.loads((self.dir / "spec.json").read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise EenetError(f"{self.dir}: spec.json is damaged; delete {self.dir} to start "
                             f"over")
        diff = sorted(k for k in set(spec) | set(old) if spec.get(k) != old.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} then, {spec.get(k)!r} now"
                              for k in diff[:4])
            raise EenetError(f"--resume: the interrupted run in {self.dir} was started with "
                             f"other arguments ({shown}); rerun with the same arguments or "
                             f"delete {self.dir} to start over")
        return True

    def start(self, spec: Mapping[str, Any]) -> None:
        """Create the state directory for a run of ``spec``."""
        self.dir.mkdir(exist_ok=True)
        with atomic_output(self.dir / "spec.json") as tmp:
            tmp.write_text(json.dumps(dict(spec), indent=1, sort_keys=True))

    # ---- costs -----------------------------------------------------------------
    def load_costs(self) -> dict[str, Any] | None:
        path = self.dir / "costs.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def save_costs(self, costs: Mapping[str, Any]) -> None:
        with atomic_output(self.dir / "costs.json") as tmp:
            tmp.write_text(json.dumps(dict(costs), indent=1))

    # ---- chunks ----------------------------------------------------------------
    def chunk_path(self, index: int) -> Path:
        return self.dir / f"chunk-{index:08d}.npz"

    def write_chunk(self, index: int, data: bytes, labels: np.ndarray,
                    sample_ids: np.ndarray) -> None:
        with atomic_output(self.chunk_path(index)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, data=np.frombuffer(data, dtype=np.uint8), labels=labels,
                     sample_ids=sample_ids)

    def read_chunk(self, index: int) -> tuple[bytes, np.ndarray, np.ndarray] | None:
        """A complete chunk, or ``None`` when it is missing or damaged."""
        path = self.chunk_path(index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                data, labels, ids = z["data"].tobytes(), z["labels"], z["sample_ids"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if labels.shape != ids.shape or labels.ndim != 1:
            return None
        return data, labels, ids

    def done(self, indices: Iterable[int], rows_of: Any) -> set[int]:
        """The chunks among ``indices`` whose files are complete and hold ``rows_of(i)`` rows."""
        found = set()
        for i in indices:
            chunk = self.read_chunk(i)
            if chunk is not None and chunk[1].shape[0] == rows_of(i):
                found.add(i)
            elif self.chunk_path(i).exists():
                logger.warning("%s is damaged; computing it again", self.chunk_path(i))
                self.chunk_path(i).unlink(missing_ok=True)
        return found

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ChunkDirWriter:
    """A sink that stores each completed chunk as a file of a :class:`PartialRun`.

    Batches must arrive in row order, whole chunks at a time (``chunk_rows``
    rows; only the split's last chunk may be short); each chunk is compressed
    and saved once complete. Use as a context manager around the stream.

    Args:
        run: the partial run to write into.
        chunk_rows, n_exits, n_classes, dtype, compression: the cache's chunk layout.
    """

    def __init__(self, run: PartialRun, *, chunk_rows: int, n_exits: int, n_classes: int,
                 dtype: Any, compression: str | None = "gzip") -> None:
        self.run, self.chunk_rows = run, chunk_rows
        self.buffer = ChunkBuffer(chunk_rows, n_exits, n_classes, dtype, compression,
                                  where=f"{run.out}: ")

    def write(self, logits: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray) -> None:
        for chunk in self.buffer.add(logits, labels, np.asarray(sample_ids, dtype=np.int64)):
            self._save(*chunk)

    def _save(self, data: bytes, labels: np.ndarray, ids: np.ndarray) -> None:
        index = int(ids[0]) // self.chunk_rows
        if ids[0] != index * self.chunk_rows or ids[-1] - ids[0] != ids.size - 1:
            raise EenetError(f"rows {ids[0]}..{ids[-1]} do not form chunk {index}; resumable "
                             f"runs need the dataset's rows in order")
        self.run.write_chunk(index, data, labels, ids)

    def close(self, complete_only: bool = False) -> None:
        """Save every chunk still being compressed, and the rows gathered after them as a
        last, short chunk unless ``complete_only`` (a run that stopped part-way)."""
        for chunk in self.buffer.finish(partial=not complete_only):
            self._save(*chunk)

    def __enter__(self) -> "ChunkDirWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Save what is complete: everything after a whole stream, whole chunks otherwise."""
        if exc_type is None:
            self.close()
        else:
            try:
                self.close(complete_only=True)
            except Exception:  # the stream's own error is the one to report
                pass
        return False
