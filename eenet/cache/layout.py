"""The exit cache's format names and version, and how many rows make a chunk or a block.

Shared by the reader and the writer; the file layout itself is described in
:mod:`eenet.cache`.
"""
from __future__ import annotations

from typing import Literal

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "LogitsKind", "READ_ROWS_BYTES", "SHARD_FORMAT",
           "chunk_rows_for", "rows_per_block"]

FORMAT_NAME = "eenet-exit-cache"
SHARD_FORMAT = "eenet-exit-cache-shard"
FORMAT_VERSION = 1
LogitsKind = Literal["logits", "log_probs"]
_CHUNK_BYTES = 1 << 20  # ~1 MiB of logits per HDF5 chunk
READ_ROWS_BYTES = 64 << 20  # rows per block when reading or scanning


def rows_per_block(n_exits: int, n_classes: int, itemsize: int, target: int) -> int:
    """Rows of ``[n_exits, n_classes]`` elements of ``itemsize`` bytes in about ``target``
    bytes (at least one)."""
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
    rows = rows_per_block(n_exits, n_classes, itemsize, _CHUNK_BYTES)
    return max(multiple_of, rows - rows % multiple_of)
