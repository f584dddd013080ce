"""`eenet import` and its library function: every accepted layout, shared costs, full disks."""
from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eenet.cli import main
from eenet._validation import EenetError
from eenet.cache import read_cache, write_cache
from eenet.ingest.arrays import import_exit_outputs, load_exit_outputs
from eenet.synthetic import synthetic_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy_models import mount_tmpfs  # noqa: E402


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(30, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 30)
    return logits, labels, np.array([1.0, 2.5, 4.0])


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class TestLayouts:
    def test_npz_with_costs(self, tmp_path, arrays):
        logits, labels, costs = arrays
        np.savez(tmp_path / "a.npz", logits=logits, labels=labels, costs=costs)
        c = import_exit_outputs(tmp_path / "a.npz", tmp_path / "a.h5")
        back = read_cache(tmp_path / "a.h5")
        np.testing.assert_array_equal(back.logits, logits)
        np.testing.assert_array_equal(back.costs, costs)
        assert c.logits_kind == "logits" and back.cost_source == "given"

    def test_npz_probs_become_log_probs(self, tmp_path, arrays):
        logits, labels, costs = arrays
        probs = _softmax(logits)
        np.savez(tmp_path / "p.npz", probs=probs, labels=labels)
        import_exit_outputs(tmp_path / "p.npz", tmp_path / "p.h5", costs=costs)
        back = read_cache(tmp_path / "p.h5")
        assert back.logits_kind == "log_probs"
        np.testing.assert_allclose(back.probs(), probs, rtol=1e-5, atol=1e-6)

    def test_npy_with_separate_labels_knc(self, tmp_path, arrays):
        logits, labels, costs = arrays
        np.save(tmp_path / "l.npy", np.swapaxes(logits, 0, 1))  # [n_exits, n_samples, n_classes]
        np.save(tmp_path / "y.npy", labels)
        c = load_exit_outputs(tmp_path / "l.npy", labels=tmp_path / "y.npy", costs=costs,
                              layout="knc")
        np.testing.assert_array_equal(c.logits, logits)

    def test_pt_tensor_list_and_dict(self, tmp_path, arrays):
        logits, labels, costs = arrays
        per_exit = [torch.from_numpy(logits[:, k]) for k in range(3)]
        torch.save({"logits": per_exit, "labels": torch.from_numpy(labels),
                    "costs": torch.tensor(costs)}, tmp_path / "d.pt")
        c = load_exit_outputs(tmp_path / "d.pt")
        np.testing.assert_array_equal(c.logits, logits)
        torch.save(torch.from_numpy(logits), tmp_path / "t.pt")
        np.savetxt(tmp_path / "y.txt", labels, fmt="%d")
        c2 = load_exit_outputs(tmp_path / "t.pt", labels=tmp_path / "y.txt", costs="1,2.5,4")
        np.testing.assert_array_equal(c2.labels, labels)


class TestRejections:
    def test_wrong_key(self, tmp_path, arrays):
        np.savez(tmp_path / "w.npz", scores=arrays[0], labels=arrays[1])
        with pytest.raises(EenetError, match=r"expected a key 'logits' or 'probs'.*\['labels', "
                                             r"'scores'\]"):
            load_exit_outputs(tmp_path / "w.npz", costs=arrays[2])

    def test_wrong_rank(self, tmp_path, arrays):
        np.savez(tmp_path / "r.npz", logits=arrays[0][:, 0], labels=arrays[1])
        with pytest.raises(EenetError, match="expected 3 dimensions"):
            load_exit_outputs(tmp_path / "r.npz", costs=arrays[2])

    def test_label_count_hints_layout(self, tmp_path, arrays):
        logits, labels, costs = arrays
        np.savez(tmp_path / "k.npz", logits=np.swapaxes(logits, 0, 1), labels=labels)
        with pytest.raises(EenetError, match="is the layout 'knc'"):
            load_exit_outputs(tmp_path / "k.npz", costs=costs)

    def test_missing_costs_and_labels(self, tmp_path, arrays):
        np.savez(tmp_path / "c.npz", logits=arrays[0], labels=arrays[1])
        with pytest.raises(EenetError, match="no per-exit costs; pass --costs"):
            load_exit_outputs(tmp_path / "c.npz")
        np.save(tmp_path / "n.npy", arrays[0])
        with pytest.raises(EenetError, match="no labels"):
            load_exit_outputs(tmp_path / "n.npy", costs=arrays[2])

    def test_not_probabilities(self, tmp_path, arrays):
        np.savez(tmp_path / "np.npz", logits=arrays[0], labels=arrays[1])
        with pytest.raises(EenetError, match="not probabilities"):
            load_exit_outputs(tmp_path / "np.npz", costs=arrays[2], probs=True)

    def test_nan_logits_leave_no_file(self, tmp_path, arrays):
        logits, labels, costs = arrays
        logits = logits.copy()
        logits[3, 1, 2] = np.nan
        np.savez(tmp_path / "nan.npz", logits=logits, labels=labels, costs=costs)
        with pytest.raises(EenetError, match="non-finite"):
            import_exit_outputs(tmp_path / "nan.npz", tmp_path / "nan.h5")
        assert not (tmp_path / "nan.h5").exists()

    def test_corrupt_pt(self, tmp_path):
        (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 20)
        with pytest.raises(EenetError, match="bad.pt"):
            load_exit_outputs(tmp_path / "bad.pt", costs=[1, 2])


class TestCli:
    def test_import_then_info(self, tmp_path, arrays):
        logits, labels, costs = arrays
        np.savez(tmp_path / "v.npz", logits=logits, labels=labels)
        runner = CliRunner()
        res = runner.invoke(main, ["import", str(tmp_path / "v.npz"), "--out",
                                   str(tmp_path / "v.h5"), "--costs", "1,2.5,4"])
        assert res.exit_code == 0, res.output
        assert "30 samples x 3 exits x 5 classes" in res.output
        res = runner.invoke(main, ["info", str(tmp_path / "v.h5")])
        assert res.exit_code == 0, res.output
        acc = (logits.argmax(-1) == labels[:, None]).mean(0)
        assert f"{acc[-1]:.4f}" in res.output
        res = runner.invoke(main, ["info", str(tmp_path / "v.h5"), "--json"])
        import json

        info = json.loads(res.output)
        assert info["n_samples"] == 30 and info["costs"] == [1.0, 2.5, 4.0]
        np.testing.assert_allclose(info["exit_accuracy"], acc)
        assert info["oracle_accuracy"] == pytest.approx(
            (logits.argmax(-1) == labels[:, None]).any(1).mean())

    def test_bad_input_is_one_line(self, tmp_path, arrays):
        np.savez(tmp_path / "v.npz", logits=arrays[0], labels=arrays[1])
        runner = CliRunner()
        res = runner.invoke(main, ["import", str(tmp_path / "v.npz"), "--out",
                                   str(tmp_path / "v.h5")])
        assert res.exit_code != 0
        assert "Traceback" not in res.output
        assert "no per-exit costs" in res.output
        res = runner.invoke(main, ["import", str(tmp_path / "v.npz"), "--out",
                                   str(tmp_path / "missing" / "v.h5"), "--costs", "1,2,3"])
        assert res.exit_code != 0 and "does not exist" in res.output
        (tmp_path / "junk.h5").write_bytes(b"junk")
        res = runner.invoke(main, ["info", str(tmp_path / "junk.h5")])
        assert res.exit_code != 0 and "not an HDF5 file" in res.output
        assert list(tmp_path.glob("*.tmp")) == [] and not (tmp_path / "v.h5").exists()


class TestCostsFrom:
    def test_import_reuses_a_caches_costs(self, tmp_path, arrays):
        logits, labels, _ = arrays
        val = synthetic_cache(20, n_exits=3, n_classes=5, seed=1, costs=[0.5, 1.5, 2.0],
                              extra_costs={"latency_ms_batchB": [0.1, 0.2, 0.3]})
        write_cache(tmp_path / "val.h5", dataclasses.replace(val, cost_source="measured"))
        np.savez(tmp_path / "t.npz", logits=logits, labels=labels)
        res = CliRunner().invoke(main, ["import", str(tmp_path / "t.npz"), "--out",
                                        str(tmp_path / "t.h5"), "--costs-from",
                                        str(tmp_path / "val.h5")])
        assert res.exit_code == 0, res.output
        c = read_cache(tmp_path / "t.h5")
        np.testing.assert_array_equal(c.costs, [0.5, 1.5, 2.0])
        assert c.cost_source == "measured" and c.cost_unit == "ms"
        np.testing.assert_array_equal(c.extra_costs["latency_ms_batchB"], [0.1, 0.2, 0.3])
        assert c.attrs["costs_from"] == str((tmp_path / "val.h5").resolve())

    def test_refusals(self, tmp_path, arrays):
        np.savez(tmp_path / "t.npz", logits=arrays[0], labels=arrays[1])
        write_cache(tmp_path / "four.h5", synthetic_cache(10, n_exits=4, seed=0))
        with pytest.raises(EenetError, match="costs for 4 exits but this network has 3"):
            load_exit_outputs(tmp_path / "t.npz", costs_from=tmp_path / "four.h5")
        with pytest.raises(EenetError, match="either --costs or --costs-from"):
            load_exit_outputs(tmp_path / "t.npz", costs=[1, 2, 3],
                              costs_from=tmp_path / "four.h5")


class TestFullDisk:
    def test_injected_enospc_is_one_line(self, tmp_path, arrays, monkeypatch):
        np.savez(tmp_path / "v.npz", logits=arrays[0], labels=arrays[1])
        out = tmp_path / "out"
        out.mkdir()

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "pwrite", full)
        res = CliRunner().invoke(main, ["import", str(tmp_path / "v.npz"), "--out",
                                        str(out / "v.h5"), "--costs", "1,2,3"])
        assert res.exit_code == 1
        assert res.output.strip().splitlines() == [
            f"Error: {out / 'v.h5'}: no space left on device while writing; free some space "
            f"or write to another disk"]
        assert list(out.iterdir()) == []

    def test_real_small_disk(self, tmp_path):
        # one chunk of 50 x 5 x 1000 (1 MB): no size estimate, the disk fills mid-write
        # (this ended in a segmentation fault, exit 139, before the guarded writer)
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "one.npz", logits=rng.normal(size=(50, 5, 1000)).astype("f4"),
                 labels=rng.integers(0, 1000, 50))
        with mount_tmpfs(tmp_path / "small", "2m") as small:
            (small / "filler").write_bytes(b"\0" * 1_600_000)
            res = subprocess.run([sys.executable, "-m", "eenet", "import",
                                  str(tmp_path / "one.npz"), "--out", str(small / "x.h5"),
                                  "--costs", "1,2,3,4,5"],
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 1, res.stderr[-2000:]
            assert res.stderr.strip().splitlines() == [
                f"Error: {small / 'x.h5'}: no space left on device while writing; free some "
                f"space or write to another disk"]
            assert sorted(p.name for p in small.iterdir()) == ["filler"]
