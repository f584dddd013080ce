"""HDF5 exit cache: every exit's output for one dataset split, in one file.

A multi-exit network is run once per split; every policy and budget after
that works on this file alone. This package is the only part of eenet that
imports h5py, and the layout below is defined here, for all its modules:

- :mod:`~eenet.cache.layout`: the format names and version; rows per chunk.
- :mod:`~eenet.cache.exit_cache`: :class:`ExitCache`, the cache in memory,
  and :func:`stratified_split`.
- :mod:`~eenet.cache.features`: the optional per-exit features' checks and
  :func:`random_projection`.
- :mod:`~eenet.cache.chunks`: :func:`encode_chunk` and :class:`ChunkBuffer`,
  whole chunks compressed outside HDF5.
- :mod:`~eenet.cache.writer`: :class:`CacheWriter`, :func:`write_cache`,
  :func:`merge_shards` and :func:`check_output_path`.
- :mod:`~eenet.cache.reader`: :func:`read_cache`, :func:`read_costs`,
  :func:`summarize_cache` and :func:`iter_encoded_chunks`.

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
    /features_<k>  float16 [n_samples, d_k], one per exit k (optional, all or
                   none; ``eenet cache --features`` or ``eenet import`` with
                   ``features_k``): the input of exit k's last linear layer,
                   the pooled representation its classifier reads. Where that
                   input (d_in_k wide) is wider than ``--feature-dim`` d, it is
                   stored projected, ``x @ P_k`` with d_k = d.
    /feature_projection_<k>
                   float32 [d_in_k, d_k], the projection P_k of exit k, present
                   only where exit k's features were projected:
                   :func:`random_projection` (standard normals / sqrt(d_k),
                   NumPy's PCG64 seeded with ``[seed, k]``), so serving can
                   apply the same matrix to the head's input.

Root attributes: ``format``, ``format_version``, ``eenet_version``,
``model``, ``dataset``, ``split``, ``cost_unit``, ``cost_source``
(``measured`` / ``flops`` / ``given``), ``device``, ``created`` (ISO 8601),
``exit_names`` (a JSON list), ``cost_vectors`` (a JSON list), ``logits_kind``,
``seed``, ``chunk_rows``, ``feature_dims`` (a JSON list of the d_k, only with
features), and any extra string or number attributes the writer
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

from eenet.cache.chunks import ChunkBuffer, encode_chunk
from eenet.cache.exit_cache import ExitCache, stratified_split
from eenet.cache.features import random_projection
from eenet.cache.layout import FORMAT_NAME, FORMAT_VERSION, SHARD_FORMAT, LogitsKind, chunk_rows_for
from eenet.cache.reader import (CacheCosts, iter_encoded_chunks, read_cache, read_costs,
                                summarize_cache)
from eenet.cache.writer import CacheWriter, check_output_path, merge_shards, write_cache

__all__ = ["CacheCosts", "CacheWriter", "ChunkBuffer", "ExitCache", "FORMAT_NAME",
           "FORMAT_VERSION", "LogitsKind", "SHARD_FORMAT", "check_output_path",
           "chunk_rows_for", "encode_chunk", "iter_encoded_chunks", "merge_shards",
           "random_projection", "read_cache", "read_costs", "stratified_split",
           "summarize_cache", "write_cache"]
