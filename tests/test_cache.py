"""The HDF5 exit cache: round trips, streaming, atomic writes, full disks, chunks and shards,
the stratified splitter, and reader rejections."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eenet._validation import CacheError, EenetError
from eenet.cache import (FORMAT_VERSION, CacheWriter, ExitCache, chunk_rows_for, merge_shards,
                         read_cache, read_costs, stratified_split, summarize_cache, write_cache)

from conftest import synthetic_cache


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


class TestRoundTrip:
    def test_float32_round_trip_is_exact(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "c.h5", small_cache)
        back = read_cache(path)
        np.testing.assert_array_equal(back.logits, small_cache.logits)
        np.testing.assert_array_equal(back.labels, small_cache.labels)
        np.testing.assert_array_equal(back.costs, small_cache.costs)
        assert back.logits.dtype == np.float32
        assert (back.model, back.dataset, back.cost_unit) == ("synthetic", "synthetic", "ms")
        assert back.exit_names == ("exit0", "exit1", "exit2", "exit3")
        assert back.path == str(path)

    def test_float16_storage_keeps_predictions(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "c16.h5", small_cache, dtype="float16")
        back = read_cache(path)
        assert back.logits.dtype == np.float16
        np.testing.assert_allclose(back.logits.astype(np.float32), small_cache.logits,
                                   rtol=1e-3, atol=1e-2)
        # half precision may flip an arg-max only on near-ties; allow 0.5% of entries
        agree = (back.predictions() == small_cache.predictions()).mean()
        assert agree > 0.995

    def test_extra_costs_ids_and_attrs_survive(self, tmp_path):
        c = synthetic_cache(50, n_exits=3, extra_costs={"flops": [10.0, 20.0, 30.0]},
                            sample_ids=np.arange(100, 150), attrs={"device": "cpu", "seed": 7},
                            exit_names=("a", "b", "c"))
        back = read_cache(write_cache(tmp_path / "x.h5", c))
        np.testing.assert_array_equal(back.extra_costs["flops"], [10.0, 20.0, 30.0])
        np.testing.assert_array_equal(back.sample_ids, np.arange(100, 150))
        assert back.attrs["device"] == "cpu" and back.attrs["seed"] == 7
        assert back.exit_names == ("a", "b", "c")
        with h5py.File(tmp_path / "x.h5") as f:
            assert f.attrs["format"] == "eenet-exit-cache"
            assert f.attrs["format_version"] == FORMAT_VERSION
            assert f["logits"].chunks[1:] == (3, 10)
            assert f["logits"].compression == "gzip"

    def test_streamed_write_spans_many_chunks(self, tmp_path):
        n_exits, n_classes = 3, 700
        rows = chunk_rows_for(n_exits, n_classes)  # the default: about 1 MiB of float32
        n = 3 * rows + 17  # more rows than three chunks, not a multiple of the chunk
        rng = np.random.default_rng(0)
        full = rng.normal(size=(n, n_exits, n_classes)).astype(np.float32)
        labels = rng.integers(0, n_classes, n)
        with CacheWriter(tmp_path / "s.h5", n_exits=n_exits, n_classes=n_classes) as w:
            for start in range(0, n, 97):
                w.write(full[start:start + 97], labels[start:start + 97])
            w.set_costs([1, 2, 3], cost_unit="ms", cost_source="given")
        back = read_cache(tmp_path / "s.h5")
        assert back.n_samples == n
        np.testing.assert_array_equal(back.logits, full)
        with h5py.File(tmp_path / "s.h5") as f:
            assert f["logits"].chunks[0] == rows

    def test_probs_softmax_and_correct(self, small_cache):
        p = small_cache.probs()
        np.testing.assert_allclose(p.sum(axis=2), 1.0, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(small_cache.correct(),
                                      p.argmax(axis=2) == small_cache.labels[:, None])


class TestAtomicWrite:
    def test_exception_inside_block_leaves_nothing(self, tmp_path):
        with pytest.raises(RuntimeError, match="boom"):
            with CacheWriter(tmp_path / "a.h5", n_exits=2, n_classes=3) as w:
                w.write(np.zeros((4, 2, 3)), np.zeros(4, int))
                raise RuntimeError("boom")
        assert _leftovers(tmp_path) == []

    def test_nan_batch_is_refused_and_nothing_left(self, tmp_path):
        bad = np.zeros((4, 2, 3))
        bad[2, 1, 0] = np.nan
        with pytest.raises(EenetError, match="sample 6 exit 1 are not finite"):
            with CacheWriter(tmp_path / "a.h5", n_exits=2, n_classes=3) as w:
                w.write(np.zeros((4, 2, 3)), np.zeros(4, int))
                w.write(bad, np.zeros(4, int))
        assert _leftovers(tmp_path) == []

    def test_float16_overflow_names_the_fix(self, tmp_path):
        big = np.full((2, 2, 3), 1e6)
        with pytest.raises(EenetError, match="overflow float16; use dtype float32"):
            with CacheWriter(tmp_path / "a.h5", n_exits=2, n_classes=3, dtype="float16") as w:
                w.write(big, np.zeros(2, int))
        assert _leftovers(tmp_path) == []

    def test_missing_costs_or_rows_leave_nothing(self, tmp_path):
        with pytest.raises(EenetError, match="no per-exit costs"):
            with CacheWriter(tmp_path / "a.h5", n_exits=2, n_classes=3) as w:
                w.write(np.zeros((4, 2, 3)), np.zeros(4, int))
        with pytest.raises(EenetError, match="no samples"):
            with CacheWriter(tmp_path / "a.h5", n_exits=2, n_classes=3) as w:
                w.set_costs([1, 2], cost_unit="ms", cost_source="given")
        assert _leftovers(tmp_path) == []

    def test_missing_directory(self, tmp_path):
        with pytest.raises(CacheError, match="does not exist; create it first"):
            CacheWriter(tmp_path / "nope" / "a.h5", n_exits=2, n_classes=3)

    def test_overwrite_replaces_whole_file(self, tmp_path):
        write_cache(tmp_path / "c.h5", synthetic_cache(100, seed=0))
        write_cache(tmp_path / "c.h5", synthetic_cache(40, seed=1))
        assert read_cache(tmp_path / "c.h5").n_samples == 40
        assert _leftovers(tmp_path) == ["c.h5"]


class TestReaderRejects:
    def test_missing_file(self, tmp_path):
        with pytest.raises(CacheError, match=r"nope\.h5: no such file"):
            read_cache(tmp_path / "nope.h5")

    def test_not_hdf5(self, tmp_path):
        (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 10)
        with pytest.raises(CacheError, match="junk.h5: not an HDF5 file"):
            read_cache(tmp_path / "junk.h5")

    def test_truncated_file(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "t.h5", small_cache)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CacheError, match="t.h5"):
            read_cache(path)

    def test_foreign_hdf5(self, tmp_path):
        with h5py.File(tmp_path / "other.h5", "w") as f:
            f["x"] = np.zeros(3)
        with pytest.raises(CacheError, match="not an eenet exit cache"):
            read_cache(tmp_path / "other.h5")

    def test_newer_version(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "v.h5", small_cache)
        with h5py.File(path, "a") as f:
            f.attrs["format_version"] = FORMAT_VERSION + 1
        with pytest.raises(CacheError, match="newer than this eenet reads"):
            read_cache(path)

    @pytest.mark.parametrize("key", ["logits", "labels", "costs"])
    def test_missing_dataset_names_key(self, tmp_path, small_cache, key):
        path = write_cache(tmp_path / "m.h5", small_cache)
        with h5py.File(path, "a") as f:
            del f[key]
        with pytest.raises(CacheError, match=rf"m\.h5: dataset '{key}' is missing"):
            read_cache(path)

    def test_label_out_of_range(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "l.h5", small_cache)
        with h5py.File(path, "a") as f:
            f["labels"][0] = 99
        with pytest.raises(CacheError, match=r"l\.h5: labels must lie in \[0, 10\)"):
            read_cache(path)

    def test_nan_logits_in_file(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "n.h5", small_cache)
        with h5py.File(path, "a") as f:
            f["logits"][5, 2, 1] = np.nan
        with pytest.raises(CacheError, match=r"n\.h5: logits contains non-finite.*sample 5, "
                                             r"exit 2"):
            read_cache(path)

    def test_shape_mismatch(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "s.h5", small_cache)
        with h5py.File(path, "a") as f:
            del f["costs"]
            f["costs"] = np.array([1.0, 2.0])
        with pytest.raises(CacheError, match="costs has 2 values but the cache has 4 exits"):
            read_cache(path)


class TestExitCache:
    def test_rejects_decreasing_costs(self):
        with pytest.raises(EenetError, match="cumulative"):
            synthetic_cache(20, n_exits=3, costs=[3.0, 2.0, 4.0])

    def test_holdout_split_is_stratified_disjoint_and_seeded(self):
        c = synthetic_cache(1000, seed=3, sample_ids=np.arange(1000))
        a, b = c.holdout_split(0.3, seed=5)
        assert a.n_samples + b.n_samples == 1000
        assert not set(a.sample_ids) & set(b.sample_ids)
        for cls in range(10):
            share = (b.labels == cls).sum() / (c.labels == cls).sum()
            assert abs(share - 0.3) < 0.03
        a2, b2 = c.holdout_split(0.3, seed=5)
        np.testing.assert_array_equal(b.sample_ids, b2.sample_ids)

    def test_summary_accuracies(self):
        logits = np.zeros((4, 2, 3), np.float32)
        logits[:, 0, 0] = 1  # exit 0 always says class 0
        logits[:, 1, 1] = 1  # exit 1 always says class 1
        c = ExitCache(logits, np.array([0, 1, 1, 2]), np.array([1.0, 2.0]))
        s = c.summary()
        assert s["exit_accuracy"] == [0.25, 0.5]
        assert s["last_exit_accuracy"] == 0.5
        assert s["oracle_accuracy"] == 0.75


# ---------------------------------------------------------------------------
class TestStratifiedSplit:
    @settings(max_examples=60, deadline=None)
    @given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=12),
           fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
    def test_partition_size_and_strata(self, sizes, fraction, seed):
        labels = np.repeat(np.arange(len(sizes)), sizes)
        np.random.default_rng(seed).shuffle(labels)
        rest, held = stratified_split(labels, fraction, seed)
        n = labels.size
        np.testing.assert_array_equal(np.sort(np.concatenate([rest, held])), np.arange(n))
        if held.size == 0:  # only when one side would be empty
            assert round(fraction * n) in (0, n)
            return
        assert held.size == round(fraction * n)
        # Every class gives about `fraction` of its members: the common quantile cut-off
        # is within (n_classes + 1) / n of `fraction`, and ranks add at most one sample.
        slack = (len(sizes) + 1) / n
        for c, size in enumerate(sizes):
            got = int((labels[held] == c).sum())
            assert abs(got - fraction * size) <= 1 + size * slack + 1e-9

    def test_seeded_and_tiny_classes_are_not_skipped(self):
        labels = np.arange(100)  # 100 classes of one sample each
        rest, held = stratified_split(labels, 0.3, seed=4)
        assert held.size == 30 and rest.size == 70
        np.testing.assert_array_equal(held, stratified_split(labels, 0.3, seed=4)[1])
        assert not np.array_equal(held, stratified_split(labels, 0.3, seed=5)[1])

    @pytest.mark.parametrize("labels, fraction", [(np.zeros(2, np.int64), 0.2),
                                                  (np.arange(10), 0.0)])
    def test_degenerate_fractions_hold_out_nothing(self, labels, fraction):
        rest, held = stratified_split(labels, fraction, 0)
        assert held.size == 0 and rest.size == labels.size

    def test_bad_fraction(self):
        with pytest.raises(EenetError, match="holdout fraction must be a finite number in"):
            stratified_split(np.arange(5), 1.5, 0)

    def test_holdout_split_uses_it(self):
        c = synthetic_cache(300, seed=2, sample_ids=np.arange(300))
        _, b = c.holdout_split(0.25, seed=9)
        np.testing.assert_array_equal(b.sample_ids, stratified_split(c.labels, 0.25, 9)[1])
        with pytest.raises(EenetError, match="leaves one side empty.*choose a fraction"):
            synthetic_cache(3, seed=0).holdout_split(0.1)


# ---------------------------------------------------------------------------
def _fail_after(limit_bytes: int):
    """An ``os.pwrite`` that fills a pretend disk of ``limit_bytes``, then raises ENOSPC."""
    real = os.pwrite
    state = {"written": 0}

    def pwrite(fd, data, offset):
        if state["written"] + len(data) > limit_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        state["written"] += len(data)
        return real(fd, data, offset)
    return pwrite


class TestFullDisk:
    @pytest.mark.parametrize("limit", [0, 3000, 400_000])
    def test_injected_enospc_is_one_line_and_leaves_nothing(self, tmp_path, monkeypatch,
                                                             limit):
        big = synthetic_cache(4000, n_classes=100, seed=0)  # ~6 MB of logits, 6 chunks
        monkeypatch.setattr(os, "pwrite", _fail_after(limit))
        with pytest.raises(EenetError, match=r"c\.h5: no space left on device while writing; "
                                             r"free some space or write to another disk"):
            write_cache(tmp_path / "c.h5", big)
        monkeypatch.undo()
        assert _leftovers(tmp_path) == []
        write_cache(tmp_path / "c.h5", big)  # the process is still healthy
        assert read_cache(tmp_path / "c.h5").n_samples == 4000

    def test_process_exits_cleanly_after_a_full_disk(self, tmp_path):
        # HDF5 crashed at exit after a failed close (segfault, exit 139); run it for real.
        script = (
            "import errno, os, sys\n"
            "from eenet.synthetic import synthetic_cache\n"
            "from eenet.cache import write_cache\n"
            "real = os.pwrite\n"
            "def full(fd, data, offset):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "os.pwrite = full\n"
            "try:\n"
            "    write_cache(sys.argv[1], synthetic_cache(3000, n_classes=100))\n"
            "except Exception as err:\n"
            "    print(type(err).__name__, err)\n")
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.h5")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.startswith("EenetError") and "no space left" in res.stdout
        assert res.stderr == ""  # no "Exception ignored" lines from h5py
        assert _leftovers(tmp_path) == []

    def test_preflight_refuses_a_disk_too_small(self, tmp_path, monkeypatch):
        Usage = type(shutil.disk_usage(tmp_path))
        monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**5, 10**5))
        with pytest.raises(CacheError, match=r"needs about \d+ MiB but 0 MiB are free"):
            write_cache(tmp_path / "c.h5", synthetic_cache(4000, n_classes=100, seed=0))
        assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
class TestChunks:
    def test_direct_chunks_read_back_through_hdf5(self, tmp_path):
        rng = np.random.default_rng(3)
        for dtype in ("float32", "float16"):
            logits = rng.normal(size=(57, 3, 5)).astype(dtype)
            with CacheWriter(tmp_path / f"{dtype}.h5", n_exits=3, n_classes=5, dtype=dtype,
                             chunk_rows=8, with_sample_ids=True) as w:
                for start in range(0, 57, 5):
                    w.write(logits[start:start + 5], np.arange(start, min(start + 5, 57)) % 5)
                w.set_costs([1, 2, 3], cost_unit="ms", cost_source="given")
            with h5py.File(tmp_path / f"{dtype}.h5") as f:
                assert f["logits"].chunks == (8, 3, 5)
                np.testing.assert_array_equal(f["logits"][()], logits)
                np.testing.assert_array_equal(f["sample_ids"][()], np.arange(57))

    def test_merge_copies_shards_in_order(self, tmp_path):
        c = synthetic_cache(50, n_exits=2, n_classes=4, seed=5)
        shards = []
        for i, (a, b) in enumerate([(0, 24), (24, 50)]):  # 24 = three chunks of 8
            shards.append(tmp_path / f"s{i}")
            with CacheWriter(shards[-1], n_exits=2, n_classes=4, chunk_rows=8, shard=True,
                             with_sample_ids=True) as w:
                w.write(c.logits[a:b], c.labels[a:b], np.arange(a, b))
        merge_shards(tmp_path / "m.h5", shards, costs=[1, 2], cost_unit="ms",
                     cost_source="given", n_exits=2, n_classes=4, chunk_rows=8,
                     with_sample_ids=True)
        back = read_cache(tmp_path / "m.h5")
        np.testing.assert_array_equal(back.logits, c.logits)
        np.testing.assert_array_equal(back.sample_ids, np.arange(50))
        with pytest.raises(CacheError, match="chunk layout"):
            merge_shards(tmp_path / "x.h5", shards, costs=[1, 2], cost_unit="ms",
                         cost_source="given", n_exits=2, n_classes=4, chunk_rows=16)
        assert not (tmp_path / "x.h5").exists()

    def test_write_chunk_refuses_after_a_partial_write(self, tmp_path):
        with pytest.raises(RuntimeError, match="after a short chunk"):
            with CacheWriter(tmp_path / "a.h5", n_exits=2, n_classes=3, chunk_rows=4) as w:
                w.write(np.zeros((3, 2, 3)), np.zeros(3, int))
                w.write_chunk(b"", np.zeros(4, int), np.arange(4))
        assert _leftovers(tmp_path) == []


class TestReadersWithoutLogits:
    def test_summarize_equals_summary(self, tmp_path):
        c = synthetic_cache(700, n_exits=3, seed=6, extra_costs={"flops": [1.0, 2.0, 5.0]})
        path = write_cache(tmp_path / "c.h5", c, dtype="float16")
        full = read_cache(path).summary()
        streamed = summarize_cache(path)
        assert streamed == full

    def test_summarize_names_non_finite_rows(self, tmp_path, small_cache):
        path = write_cache(tmp_path / "n.h5", small_cache)
        with h5py.File(path, "a") as f:
            f["logits"][433, 1, 2] = np.inf
        with pytest.raises(CacheError, match=r"n\.h5: logits contains non-finite.*sample 433, "
                                             r"exit 1"):
            summarize_cache(path)

    def test_read_costs(self, tmp_path):
        c = synthetic_cache(40, n_exits=3, seed=1, costs=[1.0, 2.0, 4.0],
                            extra_costs={"flops": [5.0, 6.0, 7.0]}, attrs={"device": "cpu"})
        costs = read_costs(write_cache(tmp_path / "c.h5", c))
        np.testing.assert_array_equal(costs.costs, [1.0, 2.0, 4.0])
        assert costs.shape == (40, 3, 10) and costs.device == "cpu"
        assert list(costs.extra_costs) == ["flops"]
        with pytest.raises(EenetError, match="costs for 3 exits but this network has 4"):
            costs.matching(4)
