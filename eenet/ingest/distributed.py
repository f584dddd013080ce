"""Caching on several processes with ``torch.distributed``: shard a split, merge the shards.

``torchrun --nproc_per_node=P -m eenet cache ...`` starts P ranks. Each rank
gets a contiguous range of whole chunks of the split (:class:`ShardSampler`:
no rank pads its share with duplicates, so every sample is run exactly
once), writes its rows to its own shard file next to the output, and rank 0
copies the shards' compressed chunks, in rank order, into the one cache
(:func:`eenet.cache.merge_shards`). Ranks agree on every step's outcome with
small collectives, so a rank that fails makes every rank stop with an error,
no merged file, and no shard left behind.

Backends: NCCL when the ranks run on CUDA (rank ``r`` uses GPU
``LOCAL_RANK``), gloo on CPU. Waiting ranks poll their collectives, so
SIGTERM from torchrun (sent when another rank dies) still reaches them and
their shard files are deleted. Several nodes need the output directory on a
filesystem every node can read (rank 0 merges the shards from there).
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from eenet._validation import EenetError, pid_alive, resolve_device

__all__ = ["DistContext", "ShardSampler", "distributed_context", "remove_stale_shards",
           "run_sharded", "shard_chunks", "step"]

T = TypeVar("T")
#: how long a rank waits for the others (cost timing on rank 0, the merge)
TIMEOUT = datetime.timedelta(hours=2)
_SHARD_TAG = "eenet-shard"


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them.
        backend: ``"nccl"`` or ``"gloo"``.
        device: this rank's device (``cuda:LOCAL_RANK`` or ``cpu``).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def tensor_device(self) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise EenetError(f"--distributed needs the variable {name} that torchrun sets; "
                         f"launch with torchrun --nproc_per_node=P -m eenet cache ...") from None


def distributed_context(requested: bool | None, device: Any) -> DistContext | None:
    """The distributed setting to run under, or ``None`` for one process.

    Args:
        requested: ``True`` (``--distributed``) insists on torchrun's
            variables; ``None`` runs distributed when ``WORLD_SIZE > 1``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; CUDA ranks take GPU ``LOCAL_RANK``.

    Raises:
        EenetError: ``--distributed`` without torchrun, or fewer GPUs than local ranks.
    """
    if not requested and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise EenetError(f"local rank {local} has no GPU ({torch.cuda.device_count()} "
                             f"visible); start at most that many processes per node "
                             f"(--nproc_per_node)")
        return DistContext(rank, world, local, "nccl", torch.device("cuda", local))
    return DistContext(rank, world, local, "gloo", torch.device("cpu"))


class process_group:
    """Join the process group for the block (unless one exists) and leave it after."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx, self.owner = ctx, False

    def __enter__(self) -> DistContext:
        if self.ctx.device.type == "cuda":
            torch.cuda.set_device(self.ctx.device)
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {}
            if self.ctx.backend == "nccl":
                kwargs["device_id"] = self.ctx.device
            dist.init_process_group(self.ctx.backend, timeout=TIMEOUT, **kwargs)
            self.owner = True
        if dist.get_world_size() != self.ctx.world_size:
            raise EenetError(f"the process group has {dist.get_world_size()} ranks but "
                             f"WORLD_SIZE is {self.ctx.world_size}; launch with torchrun")
        return self.ctx

    def __exit__(self, *exc: Any) -> None:
        if self.owner and dist.is_initialized():
            dist.destroy_process_group()


def _wait(work: Any) -> None:
    # Polling (not work.wait()) keeps the interpreter, and so signal handlers, running.
    while not work.is_completed():
        time.sleep(0.02)
    work.wait()


def gather_flags(ctx: DistContext, flag: int) -> list[int]:
    """Every rank's ``flag``, by rank (a barrier that also says who failed)."""
    mine = torch.tensor([flag], dtype=torch.int64, device=ctx.tensor_device)
    out = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    _wait(dist.all_gather(out, mine, async_op=True))
    return [int(t.item()) for t in out]


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small objects only)."""
    box = [obj if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=ctx.tensor_device)
    return box[0]


def step(ctx: DistContext, fn: Callable[[], T], what: str, ranks: Sequence[int] | None = None
         ) -> T | None:
    """Run ``fn`` on ``ranks`` (all by default), then agree on the outcome.

    Every rank waits for the others; when any rank's ``fn`` raised, that rank
    re-raises its own error and the others raise one naming it, so all stop.

    Returns:
        ``fn()``'s result on the ranks that ran it, ``None`` elsewhere.
    """
    result, error = None, None
    if ranks is None or ctx.rank in ranks:
        try:
            result = fn()
        except Exception as err:  # shared with the other ranks below, then re-raised
            error = err
    flags = gather_flags(ctx, int(error is not None))
    if error is not None:
        raise error
    failed = [r for r, f in enumerate(flags) if f]
    if failed:
        raise EenetError(f"rank {', '.join(map(str, failed))} failed while {what} (its "
                         f"message is above); nothing was written")
    return result


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------
def shard_chunks(n_chunks: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``n_chunks`` chunks; shares differ by at most one.

    Example:
        >>> [list(shard_chunks(5, r, 2)) for r in range(2)]
        [[0, 1], [2, 3, 4]]
    """
    return range(rank * n_chunks // world_size, (rank + 1) * n_chunks // world_size)


class ShardSampler(Sampler[int]):
    """The dataset rows of whole chunks, in order; no padding, no duplicates.

    Written by hand: ``DistributedSampler`` pads the last ranks' shares with
    repeated samples (or drops samples) so every rank gets the same count,
    which would put duplicates in a cache. Here each rank takes whole chunks,
    so the ranks' rows together are ``range(n_rows)`` exactly once, batches
    never straddle two chunks, and a shard's chunks are the merged file's.

    Args:
        chunks: chunk indices to produce, in order.
        chunk_rows: rows per chunk.
        n_rows: rows of the whole split (the last chunk may be short).

    Example:
        >>> list(ShardSampler([1, 2], chunk_rows=3, n_rows=8))
        [3, 4, 5, 6, 7]
    """

    def __init__(self, chunks: Sequence[int], chunk_rows: int, n_rows: int) -> None:
        self.chunks, self.chunk_rows, self.n_rows = list(chunks), chunk_rows, n_rows

    def rows(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows))

    def __iter__(self) -> Iterator[int]:
        for c in self.chunks:
            yield from self.rows(c)

    def __len__(self) -> int:
        return sum(len(self.rows(c)) for c in self.chunks)


def _shard_path(out: Path, tag: str, rank: int, world_size: int) -> Path:
    return out.with_name(f".{out.name}.{_SHARD_TAG}.{tag}.{rank}-of-{world_size}")


def remove_stale_shards(out: str | os.PathLike) -> list[Path]:
    """Delete shard files that killed distributed runs left next to ``out``.

    A shard is named ``.NAME.eenet-shard.HOST.PID.R-of-P`` after rank 0's host
    and process; it is stale when that host is this one and the process is
    gone. Shards of another host are reported (a warning), not touched.
    """
    out = Path(out)
    removed = []
    for path in out.parent.glob(f".{out.name}.{_SHARD_TAG}.*"):
        tag = path.name[len(f".{out.name}.{_SHARD_TAG}."):].rsplit(".", 1)[0]
        host, _, pid = tag.rpartition(".")
        if not pid.isdigit():
            continue
        if host != socket.gethostname():
            warnings.warn(f"{path} was left by a run on host {host}; delete it if no run "
                          f"is using it", stacklevel=2)
        elif not pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
            warnings.warn(f"removed {path}, left by an earlier distributed run that was "
                          f"killed", stacklevel=2)
    return removed


def run_sharded(ctx: DistContext, out: Path, n_chunks: int,
                write_part: Callable[[Path, range], None],
                merge: Callable[[list[Path]], None]) -> None:
    """Each rank writes its chunks to its shard; rank 0 merges; shards go in every case.

    Args:
        ctx: the distributed setting.
        out: the merged cache's path (shards live next to it).
        n_chunks: chunks of the whole split.
        write_part: ``write_part(shard_path, chunks)`` writes this rank's chunks.
        merge: ``merge(shard_paths)`` on rank 0, with the shards of every rank
            that had chunks, in rank order.

    Raises:
        EenetError: a rank failed writing its shard, or the merge failed; on
            every rank, with nothing at ``out``.
    """
    tag = broadcast_object(ctx, f"{socket.gethostname()}.{os.getpid()}")
    paths = [_shard_path(out, tag, r, ctx.world_size) for r in range(ctx.world_size)]
    mine = shard_chunks(n_chunks, ctx.rank, ctx.world_size)
    try:
        step(ctx, lambda: write_part(paths[ctx.rank], mine) if len(mine) else None,
             "writing its shard")
        used = [paths[r] for r in range(ctx.world_size)
                if len(shard_chunks(n_chunks, r, ctx.world_size))]
        step(ctx, lambda: merge(used), "merging the shards", ranks=[0])
    finally:
        paths[ctx.rank].unlink(missing_ok=True)
