"""Distributed caching: shards without duplicates, torchrun on gloo, failing ranks, stale shards.

The process tests start real processes (2 ranks on the CPU with gloo), each
importing torch, so they take a few seconds each.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet._validation import EenetError
from eenet.cache import read_cache
from eenet.ingest.distributed import ShardSampler, remove_stale_shards, shard_chunks
from eenet.ingest.model import cache_model

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the factories live in tests/_toy_models.py
    sys.path.insert(0, str(HERE))

import _toy_models as toy  # noqa: E402

ARGS = ["--model", "_toy_models:wide", "--batch-size", "16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestShards:
    @settings(max_examples=80, deadline=None)
    @given(n_rows=st.integers(1, 2000), chunk_rows=st.integers(1, 300),
           world=st.integers(1, 9))
    def test_ranks_cover_every_row_once_in_order(self, n_rows, chunk_rows, world):
        n_chunks = -(-n_rows // chunk_rows)
        rows = []
        for rank in range(world):
            chunks = shard_chunks(n_chunks, rank, world)
            assert len(chunks) in (n_chunks // world, -(-n_chunks // world))
            rows.extend(ShardSampler(chunks, chunk_rows, n_rows))
        assert rows == list(range(n_rows))

    def test_stale_shards(self, tmp_path):
        out = tmp_path / "c.h5"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        here, alive = socket.gethostname(), os.getpid()
        mine = tmp_path / f".c.h5.eenet-shard.{here}.{dead}.1-of-2"
        live = tmp_path / f".c.h5.eenet-shard.{here}.{alive}.0-of-2"
        remote = tmp_path / ".c.h5.eenet-shard.other-node.123.1-of-2"
        for p in (mine, live, remote):
            p.write_bytes(b"x")
        with pytest.warns(UserWarning) as record:
            assert remove_stale_shards(out) == [mine]
        messages = " ".join(str(w.message) for w in record)
        assert "was left by a run on host other-node" in messages and "killed" in messages
        assert live.exists() and remote.exists() and not mine.exists()


    def test_a_single_process_run_cleans_up_too(self, tmp_path):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        left = tmp_path / f".w.h5.eenet-shard.{socket.gethostname()}.{dead}.0-of-2"
        left.write_bytes(b"x")
        with pytest.warns(UserWarning, match="left by an earlier distributed run"):
            cache_model("_toy_models:wide", "_toy_models:wide_data", tmp_path / "w.h5",
                        costs=[1, 2, 3], limit=20, device="cpu", verbose=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]

    def test_distributed_needs_torchrun(self, tmp_path, monkeypatch):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(EenetError, match="--distributed needs the variable RANK that "
                                             "torchrun sets; launch with torchrun"):
            cache_model("_toy_models:wide", "_toy_models:wide_data", tmp_path / "w.h5",
                        costs=[1, 2, 3], distributed=True, device="cpu", verbose=False)
        assert list(tmp_path.iterdir()) == []


class TestTorchrun:
    def test_two_ranks_on_gloo_equal_one_process(self, tmp_path):
        out = tmp_path / "d.h5"
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", "-m", "eenet", "-q", "cache", *ARGS,
                              "--data", "_toy_models:wide_data", "--out", str(out)],
                             cwd=HERE, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("wrote ") == 1  # rank 0 reports
        merged = read_cache(out)
        single = read_cache(cache_model("_toy_models:wide", "_toy_models:wide_data",
                                        tmp_path / "s.h5", costs=[1, 2, 3], batch_size=16,
                                        device="cpu", verbose=False))
        np.testing.assert_array_equal(merged.labels, single.labels)
        np.testing.assert_array_equal(merged.sample_ids, np.arange(480))
        np.testing.assert_allclose(merged.logits, single.logits, rtol=1e-5, atol=1e-6)
        assert merged.cost_source == "measured" and merged.attrs["timing"] == "stages"
        assert (merged.attrs["world_size"], merged.attrs["cost_rank"],
                merged.attrs["distributed_backend"]) == (2, 0, "gloo")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "s.h5"]

    def test_a_failing_rank_leaves_no_file(self, tmp_path):
        # Rank 1 holds rows 240..479 and its dataset fails at row 250.
        marker = tmp_path / "flaky-marker"
        marker.touch()
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        port = _free_port()
        procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       **{toy.FLAKY_ENV: str(marker)})
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "eenet", "-q", "cache", *ARGS, "--costs", "1,2,3",
                 "--data", "_toy_models:flaky_wide", "--out", str(out_dir / "d.h5")],
                cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errors = [p.communicate(timeout=180)[1] for p in procs]
        assert [p.returncode for p in procs] == [1, 1], errors
        assert errors[1].strip().splitlines() == [
            "Error: reading batch 0 of the dataset raised RuntimeError: read failed at item "
            "250; check the dataset"]
        assert errors[0].strip().splitlines() == [
            "Error: rank 1 failed while writing its shard (its message is above); nothing "
            "was written"]
        assert list(out_dir.iterdir()) == []
