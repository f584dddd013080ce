"""Bad input on the command line, by class: an output that would destroy an input, a
network or data that do not fit the policy, output that would be invalid or misleading,
options that would be ignored, and leftovers of a killed run. Each gets one line (exit 1,
or 2 for a usage error) and nothing on disk changes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from eenet._validation import network_fingerprint
from eenet.cache import read_cache, write_cache
from eenet.cli import main
from eenet.policy import ExitPolicy
from eenet.synthetic import synthetic_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared test helpers
import _toy_models  # noqa: E402

MODEL = "_toy_models:staged"


def run(*args):
    """``eenet -q ARGS`` in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(main, ["-q", *(str(a) for a in args)])


def error_line(res, code: int = 1) -> str:
    """The one line a refused command prints (its exit code checked)."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == code, res.output
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in res.output
    if code == 1:
        assert len(lines) == 1, res.output
    return lines[-1]


def save_inputs(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def net(tmp_path, monkeypatch):
    """The toy staged network's cache (3 exits x 3 classes, costs 1/2/3), a maxprob policy
    fitted on it, and the data it was made from; the working directory is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    data = save_inputs(tmp_path / "x.npz", rng.normal(size=(60, 6)).astype(np.float32),
                       rng.integers(0, 3, 60))
    res = run("cache", "--model", MODEL, "--data", data, "--costs", "1,2,3",
              "--out", tmp_path / "net.h5")
    assert res.exit_code == 0, res.output
    res = run("fit", tmp_path / "net.h5", "--method", "maxprob", "--budget", 2,
              "--out", tmp_path / "p.pt")
    assert res.exit_code == 0, res.output
    return {"cache": tmp_path / "net.h5", "policy": tmp_path / "p.pt", "data": data}


@pytest.fixture
def val(tmp_path):
    return write_cache(tmp_path / "val.h5", synthetic_cache(300, n_exits=3, n_classes=3))


def serve_args(net, *extra):
    return [net["policy"], "--model", MODEL, "--data", net["data"], *extra]


class TestOutputsNeverReplaceInputs:
    @pytest.mark.parametrize("spelling", ["same", "dot", "link", "hardlink"])
    def test_fit_refuses_its_cache_however_spelled(self, tmp_path, val, spelling,
                                                  monkeypatch):
        monkeypatch.chdir(tmp_path)
        out = {"same": "val.h5", "dot": "./val.h5", "link": "link.h5",
               "hardlink": "hard.h5"}[spelling]
        if spelling == "link":
            os.symlink("val.h5", "link.h5")
        if spelling == "hardlink":
            os.link("val.h5", "hard.h5")
        before = val.read_bytes()
        line = error_line(run("fit", "val.h5", "--budget", 2, "--out", out,
                              "--method", "maxprob"))
        assert f"--out {Path(out)} is the input VAL (val.h5)" in line
        assert "destroy" in line and val.read_bytes() == before

    def test_every_command_refuses_an_input_as_output(self, tmp_path, net, val):
        npz = tmp_path / "s.npz"
        c = synthetic_cache(40, n_exits=3, n_classes=3)
        np.savez(npz, logits=c.logits, labels=c.labels, costs=c.costs)
        cases = [
            (["import", npz, "--out", npz], "SRC", npz),
            (["import", npz, "--costs-from", val, "--out", val], "--costs-from", val),
            (["sweep", val, "--holdout", 0.5, "--out", val], "VAL", val),
            (["sweep", val, net["cache"], "--out", "r.csv", "--plot", net["cache"]], "TEST",
             net["cache"]),
            (["calibrate", net["policy"], net["cache"], "--out", net["cache"]], "VAL",
             net["cache"]),
            (["cache", "--model", MODEL, "--data", net["data"], "--costs-from", net["cache"],
              "--out", net["cache"]], "--costs-from", net["cache"]),
            (["cache", "--model", MODEL, "--data", net["data"], "--costs", "1,2,3", "--out",
              net["data"]], "--data", net["data"]),
            (["run", *serve_args(net, "--out", net["policy"])], "POLICY", net["policy"]),
            (["run", *serve_args(net, "--out", net["data"])], "--data", net["data"]),
        ]
        for args, name, victim in cases:
            before = Path(victim).read_bytes()
            line = error_line(run(*args))
            assert f"is the input {name}" in line, (args, line)
            assert Path(victim).read_bytes() == before, args

    def test_sweep_refuses_one_file_for_csv_and_plot(self, tmp_path, val):
        line = error_line(run("sweep", val, "--holdout", 0.5, "--out", tmp_path / "a.csv",
                              "--plot", tmp_path / "a.csv"), code=2)
        assert "--out and --plot both name" in line
        assert not (tmp_path / "a.csv").exists()

    def test_calibrate_may_overwrite_its_policy_by_default(self, net):
        res = run("calibrate", net["policy"], net["cache"], "--budget", 2.5)
        assert res.exit_code == 0, res.output
        assert ExitPolicy.load(net["policy"]).budget == 2.5

    def test_a_symlink_output_is_written_through(self, tmp_path, val, monkeypatch):
        monkeypatch.chdir(tmp_path)
        os.mkdir("store")
        os.symlink("store/policy.pt", "latest.pt")  # dangling until written
        res = run("fit", "val.h5", "--budget", 2, "--method", "maxprob", "--out", "latest.pt")
        assert res.exit_code == 0, res.output
        assert os.path.islink("latest.pt") and Path("store/policy.pt").is_file()
        assert ExitPolicy.load("latest.pt").budget == 2

    def test_a_fifo_output_is_refused_and_kept(self, tmp_path, net):
        fifo = tmp_path / "pipe.csv"
        os.mkfifo(fifo)
        for args in (["run", *serve_args(net, "--out", fifo)],
                     ["fit", net["cache"], "--budget", 2, "--out", fifo]):
            line = error_line(run(*args))
            assert "is a FIFO (named pipe), not a regular file" in line
            assert fifo.is_fifo()

    def test_the_library_writers_follow_the_same_rules(self, tmp_path):
        from eenet._validation import EenetError, atomic_output
        from eenet.ingest.arrays import import_exit_outputs

        (tmp_path / "real.txt").write_text("old")
        os.symlink("real.txt", tmp_path / "link.txt")
        with atomic_output(tmp_path / "link.txt") as tmp:
            tmp.write_text("new")
        assert (tmp_path / "link.txt").is_symlink()
        assert (tmp_path / "real.txt").read_text() == "new"
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(EenetError, match="is a FIFO"):
            with atomic_output(tmp_path / "fifo"):
                pass
        c = synthetic_cache(20, n_exits=3, n_classes=3)
        np.savez(tmp_path / "s.npz", logits=c.logits, labels=c.labels, costs=c.costs)
        before = (tmp_path / "s.npz").read_bytes()
        with pytest.raises(EenetError, match="is the input src"):
            import_exit_outputs(tmp_path / "s.npz", tmp_path / "." / "s.npz")
        assert (tmp_path / "s.npz").read_bytes() == before

    def test_out_dash_writes_csv_to_stdout(self, tmp_path, net, val):
        res = run("run", *serve_args(net, "--out", "-"))
        assert res.exit_code == 0, res.output
        table = pd.read_csv(pd.io.common.StringIO(res.stdout))
        assert list(table.columns) == ["sample", "prediction", "exit", "score", "label"]
        assert len(table) == 60 and "served 60 samples" in res.stderr
        res = run("sweep", val, "--holdout", 0.5, "--methods", "maxprob", "--n-budgets", 2,
                  "--out", "-")
        assert res.exit_code == 0, res.output
        assert pd.read_csv(pd.io.common.StringIO(res.stdout))["method"].iloc[0] == "maxprob"
        assert "test accuracy" in res.stderr
        assert not (tmp_path / "-").exists()

    @pytest.mark.parametrize("command, what", [
        (["fit", "val.h5", "--budget", 2], "a policy file"),
        (["calibrate", "p.pt", "val.h5"], "a policy file"),
        (["import", "x.npz"], "an HDF5 cache"),
        (["cache", "--model", MODEL, "--data", "x.npz"], "an HDF5 cache"),
    ])
    def test_out_dash_is_refused_for_binary_outputs(self, tmp_path, net, val, command, what):
        line = error_line(run(*command, "--out", "-"))
        assert f"--out -: the output is {what}, which is not written to stdout" in line
        assert not (tmp_path / "-").exists()

    def test_plot_dash_is_refused(self, tmp_path, val):
        line = error_line(run("sweep", val, "--holdout", 0.5, "--out", tmp_path / "a.csv",
                              "--plot", "-"))
        assert "--plot -: the output is a PNG image" in line


class TestServingWhatDoesNotFit:
    def test_a_policy_of_another_class_count_is_refused(self, tmp_path, net):
        five = write_cache(tmp_path / "five.h5", synthetic_cache(300, n_exits=3, n_classes=5))
        assert run("fit", five, "--method", "maxprob", "--budget", 2,
                   "--out", tmp_path / "p5.pt").exit_code == 0
        for command in ("run", "bench"):
            extra = ["--out", tmp_path / "r.csv"] if command == "run" else []
            line = error_line(run(command, tmp_path / "p5.pt", "--model", MODEL,
                                  "--data", net["data"], *extra))
            assert "logits of shape [" in line and "fitted for 5 classes" in line
        assert not (tmp_path / "r.csv").exists()

    def test_labels_outside_the_classes_are_refused(self, tmp_path, net):
        data = save_inputs(tmp_path / "y99.npz", np.zeros((20, 6), np.float32),
                           np.full(20, 99))
        for command in ("run", "bench"):
            extra = ["--out", tmp_path / "r.csv"] if command == "run" else []
            line = error_line(run(command, net["policy"], "--model", MODEL, "--data", data,
                                  *extra))
            assert "labels must lie in [0, 3)" in line and "[99, 99]" in line

    @pytest.mark.parametrize("x", [np.zeros((20, 3, 32, 32), np.float32),
                                   np.zeros((20, 784), np.float32),
                                   np.zeros((20, 6), np.uint8)], ids=["image", "flat", "uint8"])
    def test_inputs_the_network_cannot_take_are_one_line(self, tmp_path, net, x):
        data = save_inputs(tmp_path / "bad.npz", x, np.zeros(len(x), np.int64))
        line = error_line(run("run", net["policy"], "--model", MODEL, "--data", data,
                              "--out", tmp_path / "r.csv"))
        assert "the network failed on the batch from sample 0" in line
        assert f"dtype={str(torch.from_numpy(x).dtype).split('.')[-1]}" in line or \
            "shape" in line

    def test_the_cache_records_the_networks_fingerprint(self, net):
        assert read_cache(net["cache"]).attrs["network_sha256"] == network_fingerprint(
            _toy_models.staged())
        assert ExitPolicy.load(net["policy"]).reference["network_sha256"] == \
            network_fingerprint(_toy_models.staged())

    def test_another_networks_parameters_are_refused(self, tmp_path, net):
        torch.manual_seed(1)
        torch.save(_toy_models.StagedMLP().state_dict(), tmp_path / "other.pt")
        other = tmp_path / "other.h5"
        assert run("cache", "--model", MODEL, "--weights", tmp_path / "other.pt", "--data",
                   net["data"], "--costs", "1,2,3", "--out", other).exit_code == 0
        refusals = [["evaluate", net["policy"], other],
                    ["calibrate", net["policy"], other, "--out", tmp_path / "p2.pt"],
                    ["run", *serve_args(net, "--weights", tmp_path / "other.pt",
                                        "--out", tmp_path / "r.csv")],
                    ["bench", *serve_args(net, "--weights", tmp_path / "other.pt")]]
        for args in refusals:
            line = error_line(run(*args))
            assert "are not those of the network the policy was fitted on" in line, args
        assert not (tmp_path / "r.csv").exists() and not (tmp_path / "p2.pt").exists()

    def test_caches_and_policies_without_a_fingerprint_still_work(self, tmp_path, net):
        state = torch.load(net["policy"], weights_only=True)
        del state["reference"]["network_sha256"]  # a policy of an older eenet
        torch.save(state, tmp_path / "old.pt")
        res = run("run", tmp_path / "old.pt", "--model", MODEL, "--data", net["data"],
                  "--out", tmp_path / "r.csv")
        assert res.exit_code == 0, res.output
        unmarked = write_cache(tmp_path / "u.h5", synthetic_cache(200, n_exits=3,
                                                                  n_classes=3,
                                                                  costs=[1.0, 2.0, 3.0]))
        res = run("evaluate", net["policy"], unmarked)  # an imported or older cache
        assert res.exit_code == 0, res.output


class TestHonestOutput:
    def test_bench_json_is_valid_json_without_a_budget(self, tmp_path, net, val):
        assert run("fit", val, "--method", "maxprob", "--risk", "consistency", "--epsilon",
                   0.2, "--out", tmp_path / "risk.pt").exit_code == 0
        res = run("bench", tmp_path / "risk.pt", "--model", MODEL, "--data", net["data"],
                  "--batch1-samples", 3, "--json")
        assert res.exit_code == 0, res.output

        def refuse(constant):
            raise ValueError(f"not JSON: {constant}")

        row = json.loads(res.stdout, parse_constant=refuse)
        assert row["budget"] is None and row["method"] == "maxprob"
        res = run("bench", tmp_path / "risk.pt", "--model", MODEL, "--data", net["data"],
                  "--batch1-samples", 3)
        assert "budget none" in res.stdout and "risk control alone" in res.stdout

    def test_a_file_name_that_is_not_utf8_is_no_disk_problem(self, tmp_path):
        c = synthetic_cache(30, n_exits=3, n_classes=3)
        src = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff.npz")
        np.savez(src, logits=c.logits, labels=c.labels, costs=c.costs)
        res = run("import", src, "--out", tmp_path / "out.h5")
        assert res.exit_code == 0, res.output
        assert read_cache(tmp_path / "out.h5").model == "\\xff"

    def test_random_bytes_as_pt_get_eenets_own_line(self, tmp_path):
        bad = tmp_path / "junk.pt"
        bad.write_bytes(np.random.default_rng(0).bytes(3000))
        line = error_line(run("import", bad, "--out", tmp_path / "o.h5"))
        assert "not a torch.save archive, or a damaged one" in line
        assert "weights_only" not in line and "Re-running" not in line

    def test_probabilities_by_key_are_not_told_to_drop_probs(self, tmp_path):
        np.savez(tmp_path / "p.npz", probs=np.full((10, 3, 3), 0.5), labels=np.zeros(10, int),
                 costs=[1.0, 2.0, 3.0])
        line = error_line(run("import", tmp_path / "p.npz", "--out", tmp_path / "o.h5"))
        assert "store logits under the key 'logits'" in line and "--probs" not in line
        np.save(tmp_path / "p.npy", np.full((10, 3, 3), 0.5))
        line = error_line(run("import", tmp_path / "p.npy", "--probs", "--labels",
                              tmp_path / "p.npz", "--costs", "1,2,3",
                              "--out", tmp_path / "o.h5"))
        assert "drop --probs for logits" in line

    @pytest.mark.parametrize("value, dtype", [(1e39, "float32"), (1e5, "float16")])
    def test_a_finite_logit_too_large_to_store_is_named(self, tmp_path, value, dtype):
        logits = np.zeros((10, 3, 3))
        logits[2, 1, 0] = value
        np.savez(tmp_path / "big.npz", logits=logits, labels=np.zeros(10, int),
                 costs=[1.0, 2.0, 3.0])
        line = error_line(run("import", tmp_path / "big.npz", "--dtype", dtype,
                              "--out", tmp_path / "o.h5"))
        assert f"beyond the largest {dtype}" in line and "(2, 1, 0)" in line
        assert "NaN" not in line and not (tmp_path / "o.h5").exists()

    @pytest.mark.parametrize("field, value", [("n_classes", "ten"), ("n_exits", 2.5),
                                              ("costs", [1.0, "x", 3.0]), ("cost_unit", 3)])
    def test_a_hand_edited_policy_is_one_line(self, tmp_path, net, field, value):
        state = torch.load(net["policy"], weights_only=True)
        state["reference"][field] = value
        torch.save(state, tmp_path / "edited.pt")
        for args in (["run", tmp_path / "edited.pt", "--model", MODEL, "--data", net["data"],
                      "--out", tmp_path / "r.csv"],
                     ["evaluate", tmp_path / "edited.pt", net["cache"]]):
            line = error_line(run(*args))
            assert "damaged or edited by hand" in line and field in line

    def test_usage_errors_exit_2(self, val):
        error_line(run("fit", val, "--budget"), code=2)


class TestNoOptionIgnored:
    @pytest.mark.parametrize("extra, named", [
        (["--epsilons", "0.02", "--budgets", "2"], "--budgets"),
        (["--epsilons", "0.02", "--n-budgets", "3"], "--n-budgets"),
        (["--delta", "0.3"], "--delta"),
        (["--bound", "ltt"], "--bound"),
    ])
    def test_sweep_refuses_options_it_would_ignore(self, tmp_path, val, extra, named):
        line = error_line(run("sweep", val, "--holdout", 0.5, "--methods", "maxprob", *extra,
                              "--out", tmp_path / "s.csv"), code=2)
        assert named in line and not (tmp_path / "s.csv").exists()

    @pytest.mark.parametrize("extra, named", [
        (["--delta", "0.2"], "--delta"), (["--bound", "ltt"], "--bound"),
        (["--certify-fraction", "0.3"], "--certify-fraction"),
        (["--cost-bound", "hoeffding"], "--cost-bound"),
        (["--risk", "consistency", "--epsilon", "0.1", "--cost-bound", "hoeffding"],
         "--cost-bound"),
    ])
    def test_fit_refuses_guarantee_options_without_a_guarantee(self, tmp_path, val, extra,
                                                              named):
        line = error_line(run("fit", val, "--method", "maxprob", "--budget", 2, *extra,
                              "--out", tmp_path / "p.pt"), code=2)
        assert named in line and not (tmp_path / "p.pt").exists()

    def test_a_cost_unit_that_would_be_ignored_is_refused(self, tmp_path, net):
        line = error_line(run("cache", "--model", MODEL, "--data", net["data"], "--costs",
                              "flops", "--cost-unit", "us", "--out", tmp_path / "c.h5"), code=2)
        assert "--cost-unit is the unit of given --costs values" in line
        line = error_line(run("cache", "--model", MODEL, "--data", net["data"], "--costs-from",
                              net["cache"], "--cost-unit", "us", "--out", tmp_path / "c.h5"),
                          code=2)
        assert "--costs-from copies the unit" in line
        c = synthetic_cache(30, n_exits=3, n_classes=3)
        np.savez(tmp_path / "s.npz", logits=c.logits, labels=c.labels)
        line = error_line(run("import", tmp_path / "s.npz", "--costs-from", net["cache"],
                              "--cost-unit", "us", "--out", tmp_path / "c.h5"), code=2)
        assert "drop --cost-unit" in line
        assert not (tmp_path / "c.h5").exists()

    @pytest.mark.parametrize("command", ["sweep", "quickstart"])
    def test_an_empty_method_list_is_refused(self, tmp_path, val, command):
        args = ([val, "--holdout", 0.5, "--out", tmp_path / "s.csv"] if command == "sweep"
                else ["--results-dir", tmp_path])
        line = error_line(run(command, *args, "--methods", ""), code=2)
        assert "--methods" in line and "at least one" in line

    def test_shared_options_work_after_the_command(self, tmp_path, net):
        for args in (["run", *serve_args(net, "--out", tmp_path / "r.csv", "--device", "cpu",
                                         "--seed", 0, "--debug")],
                     ["evaluate", net["policy"], net["cache"], "--seed", 3, "-q"],
                     ["fit", net["cache"], "--method", "maxprob", "--budget", 2, "--out",
                      tmp_path / "q.pt", "--device", "cpu", "-v"],
                     ["info", net["cache"], "--device", "cpu"]):
            res = run(*args)
            assert res.exit_code == 0, (args, res.output)

    def test_a_seed_after_the_command_is_the_one_used(self, tmp_path, val):
        for where in ("before", "after"):
            seed = ["--seed", "5"]
            args = ["fit", val, "--method", "maxprob", "--budget", 2, "--holdout", 0.5,
                    "--out", tmp_path / f"{where}.pt"]
            res = run(*(seed + args if where == "before" else args + seed))
            assert res.exit_code == 0, res.output
        assert ExitPolicy.load(tmp_path / "before.pt").seed == 5
        assert ExitPolicy.load(tmp_path / "after.pt").seed == 5

    @pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
    def test_an_unavailable_device_after_the_command_is_one_line(self, net):
        line = error_line(run("evaluate", net["policy"], net["cache"], "--device", "cuda"))
        assert "CUDA is not available" in line


class TestLeftovers:
    def test_a_complete_run_deletes_an_interrupted_runs_progress(self, tmp_path, net):
        from eenet.ingest.stream import PartialRun

        out = tmp_path / "again.h5"
        partial = PartialRun(out)
        partial.start({"model": MODEL})  # what a killed --resume run leaves
        assert partial.exists()
        res = run("cache", "--model", MODEL, "--data", net["data"], "--costs", "1,2,3",
                  "--out", out)
        assert res.exit_code == 0, res.output
        assert "deleted once" in res.stderr and "--resume" in res.stderr
        assert out.is_file() and not partial.dir.exists()
