"""The command line end to end (fit -> calibrate -> evaluate, sweep) and its error contract:
eenet's errors and OSError are one line and exit 1, bugs keep their traceback, --debug shows
tracebacks, Ctrl-C exits 130 leaving nothing behind."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import eenet.policy
from eenet._validation import EenetError
from eenet.cache import ExitCache, write_cache
from eenet.cli import main
from eenet.scores import METHODS
from eenet.scores.eenet import EENetConfig
from eenet.sweep import COLUMNS
from eenet.synthetic import synthetic_cache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared test helpers (_toy_models)
EENET_FAST = ["--epochs", "60", "--lr", "0.01"]


def known_answer_cache(n=1200, seed=0) -> ExitCache:
    """3 exits, costs 1/2/3 ms. 60% easy samples: exit 0 right and confident. 40% hard:
    exits 0 and 1 wrong (exit 0 unsure), exit 2 always right. At B = 1.8 the perfect
    policy (easy at exit 0, hard at exit 2) is right on every sample."""
    rng = np.random.default_rng(seed)
    c = 5
    labels = rng.integers(0, c, n)
    easy = rng.random(n) < 0.6
    logits = rng.normal(0, 0.3, (n, 3, c)).astype(np.float32)
    wrong = (labels + 1 + rng.integers(0, c - 1, n)) % c
    rows = np.arange(n)
    logits[rows, 0, np.where(easy, labels, wrong)] += np.where(easy, 6.0, 0.8)
    logits[rows, 1, np.where(easy, labels, wrong)] += 2.0
    logits[rows, 2, labels] += 3.0
    return ExitCache(logits, labels, np.array([1.0, 2.0, 3.0]), model="toy", dataset="toy")


@pytest.fixture
def caches(tmp_path):
    val = write_cache(tmp_path / "val.h5", known_answer_cache(seed=0))
    test = write_cache(tmp_path / "test.h5", known_answer_cache(seed=1))
    return val, test


def run(*args, **kwargs):
    """``eenet -q ARGS`` in-process (no progress bars: stderr holds only what matters)."""
    return CliRunner().invoke(main, ["-q", *(str(a) for a in args)], **kwargs)


def one_error_line(res) -> str:
    """The output of a failed command: exactly one line, click's 'Error: ...'."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error: ") and "Traceback" not in res.output
    return lines[0]


def fit(val, out, *extra, budget=1.8):
    res = run("fit", val, "--budget", budget, "--out", out, *extra)
    assert res.exit_code == 0, res.output
    return res


class TestChain:
    @pytest.mark.parametrize("method, extra, perfect", [
        ("eenet", [*EENET_FAST, "--calibration", "search"], True),
        ("eenet", EENET_FAST, False),  # its default calibration
        ("eenet-paper", ["--epochs", "30"], False),
        ("maxprob", ["--calibration", "search"], True),
        ("MSDNet", ["--calibration", "search", "--no-guard"], True),
        ("entropy", ["--calibration", "search"], True),
        ("patience", [], False),
        ("static", [], False),
    ])
    def test_fit_calibrate_evaluate(self, tmp_path, caches, method, extra, perfect):
        val, test = caches
        pol = tmp_path / "p.pt"
        res = fit(val, pol, "--method", method, *extra)
        name = "maxprob" if method == "MSDNet" else method
        assert res.stdout.startswith(f"wrote {pol}: {name}, budget 1.8 ms")
        out = json.loads(run("evaluate", pol, test, "--json").output)
        assert set(out) >= {"method", "budget", "accuracy", "avg_cost", "cost_unit",
                            "exit_fractions", "exit_accuracy", "exit_counts", "n_samples",
                            "risk_consistency", "risk_gap", "risk_brier", "cost_over_budget"}
        assert out["n_samples"] == 1200 and out["budget"] == 1.8 and out["cost_unit"] == "ms"
        assert sum(out["exit_counts"]) == 1200
        assert out["avg_cost"] <= 1.8 * 1.01
        if perfect:  # easy samples are separable by confidence: near perfect
            assert out["accuracy"] >= 0.95
        # recalibrate to a new budget into another file, then evaluate it as a table
        res = run("calibrate", pol, val, "--budget", 1.5, "--out", tmp_path / "p15.pt")
        assert res.exit_code == 0, res.output
        res = run("evaluate", tmp_path / "p15.pt", test)
        assert res.exit_code == 0, res.output
        assert "budget    1.5 ms" in res.output
        assert float(res.output.split("avg cost")[1].split()[0]) <= 1.5 * 1.01
        assert json.loads(run("evaluate", pol, test, "--json").output)["budget"] == 1.8

    def test_published_geometric_rule_meets_budget(self, tmp_path, caches):
        # MSDNet's geometric exit distribution sends a share to exit 1, which is wrong on
        # every hard sample: it meets the budget but cannot be perfect here.
        # The default would select the search here; --calibration forces the published rule.
        val, test = caches
        res = fit(val, tmp_path / "g.pt", "--method", "maxprob", "--calibration", "geometric")
        assert "calibration geometric + guard" in res.stdout
        state = torch.load(tmp_path / "g.pt", weights_only=True)
        assert state["calibration"] == "geometric" and state["rule"]["mode"] == "geometric"
        assert "selected" not in state["rule"]["diagnostics"]
        out = json.loads(run("evaluate", tmp_path / "g.pt", test, "--json").output)
        assert out["avg_cost"] <= 1.8 * 1.01 and 0.6 < out["accuracy"] < 0.95

    def test_the_default_calibration_says_what_it_chose(self, tmp_path, caches):
        val, _ = caches
        res = fit(val, tmp_path / "d.pt", "--method", "maxprob")
        chosen = torch.load(tmp_path / "d.pt", weights_only=True)["rule"]["diagnostics"]
        assert f"calibration select ({chosen['selected']}, " in res.stdout
        assert "on held-out folds: accuracy" in res.stdout

    def test_calibrate_in_place_with_another_mode(self, tmp_path, caches):
        val, _ = caches
        pol = tmp_path / "p.pt"
        fit(val, pol, "--method", "maxprob")
        res = run("calibrate", pol, val, "--mode", "search", "--no-guard")
        assert res.exit_code == 0, res.output
        assert "calibration search;" in res.output and "budget 1.8 ms" in res.output
        state = torch.load(pol, weights_only=True)
        assert state["calibration"] == "search" and state["guard"] is False
        assert state["rule"]["target"] == 1.8

    def test_holdout_on_one_cache(self, tmp_path, caches):
        val, _ = caches
        pol = tmp_path / "h.pt"
        fit(val, pol, "--method", "entropy", "--holdout", 0.5, budget=2.0)
        res = run("evaluate", pol, val, "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["n_samples"] == 600  # the held-out half, recorded
        assert "used to fit" not in res.output
        # another split of the same cache overlaps the fitted half: a warning with the count
        res = run("evaluate", pol, val, "--holdout", 0.9, "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["n_samples"] == 1080
        warning = [line for line in res.stderr.splitlines() if "used to fit" in line]
        assert len(warning) == 1 and warning[0].startswith("warning: ")
        seen = re.search(r"(\d+) of the 1080 samples evaluated were used", warning[0])
        assert 400 < int(seen.group(1)) < 700  # about half of the 1080 were fitted on

    def test_budget_above_the_full_cost_warns_and_uses_everything(self, tmp_path, caches):
        val, test = caches
        res = fit(val, tmp_path / "p.pt", "--method", "maxprob", budget=10)
        assert "warning: budget 10 is above the last exit's cost 3" in res.stderr
        out = json.loads(run("evaluate", tmp_path / "p.pt", test, "--json").stdout)
        assert out["exit_counts"] == [0, 0, 1200] and out["accuracy"] == 1.0

    def test_sweep_on_one_cache_with_holdout(self, tmp_path, caches):
        val, _ = caches
        res = run("sweep", val, "--holdout", 0.25, "--budgets", "1.8", "--methods",
                  "static,oracle", "--out", tmp_path / "s.csv", "--jobs", 1)
        assert res.exit_code == 0, res.output
        table = pd.read_csv(tmp_path / "s.csv")
        assert (table["n_samples"] == 300).all() and len(table) == 2 + 3

    def test_holdout_at_evaluate_does_not_hide_a_whole_cache_fit(self, tmp_path, caches):
        val, _ = caches
        fit(val, tmp_path / "w.pt", "--method", "maxprob")
        res = run("evaluate", tmp_path / "w.pt", val, "--holdout", 0.5, "--json")
        assert res.exit_code == 0, res.output
        assert "600 of the 600 samples evaluated were used to fit the policy" in res.stderr

    def test_cost_mismatch_warns_with_the_fix(self, tmp_path, caches):
        val, test = caches
        fit(val, tmp_path / "p.pt", "--method", "maxprob")
        tenfold = known_answer_cache(seed=1)
        tenfold = ExitCache(tenfold.logits, tenfold.labels, tenfold.costs * 10)
        write_cache(tmp_path / "slow.h5", tenfold)
        res = run("evaluate", tmp_path / "p.pt", tmp_path / "slow.h5")
        assert res.exit_code == 0, res.output
        assert "warning: " in res.stderr and "--costs-from VAL.h5" in res.stderr

    def test_sweep_csv_plot_and_summary(self, tmp_path, caches):
        val, test = caches
        res = run("sweep", val, test, "--budgets", "2.4,1.4,1.4,1.8", "--methods",
                  "maxprob,MSDNet,entropy,patience,static,oracle,maxprob:search", "--out",
                  tmp_path / "s.csv", "--plot", tmp_path / "s.png", "--jobs", 1)
        assert res.exit_code == 0, res.output
        table = pd.read_csv(tmp_path / "s.csv")
        assert list(table.columns) == COLUMNS
        assert not table.duplicated(["method", "budget", "seed"]).any()
        assert set(table["method"]) == {"maxprob", "entropy", "patience", "static", "oracle",
                                        "maxprob:search", "exit0", "exit1", "exit2"}
        assert len(table) == 6 * 3 + 3  # labels x budgets + single exits
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "test accuracy (%) by budget (ms)" in res.stdout and "*" in res.stdout
        assert res.stdout.splitlines()[-1] == f"wrote {tmp_path / 's.csv'} and " \
                                              f"{tmp_path / 's.png'}"

    def test_sweep_full_disk_at_the_plot_writes_neither_file(self, tmp_path, caches,
                                                               monkeypatch):
        import matplotlib.figure

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
        val, test = caches
        res = run("sweep", val, test, "--budgets", "1.8", "--methods", "static", "--out",
                  tmp_path / "s.csv", "--plot", tmp_path / "s.png", "--jobs", 1)
        assert res.exit_code == 1
        assert "no space left on device" in one_error_line(res)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["test.h5", "val.h5"]


class TestHelp:
    def test_fit_shows_the_eenet_defaults(self):
        res = run("fit", "--help")
        assert res.exit_code == 0
        text = " ".join(res.output.split())
        defaults = {f.name: f.default for f in fields(EENetConfig)}
        for name in ("epochs", "lr", "hidden", "alpha_ce", "alpha_budget"):
            option = "--" + name.replace("_", "-")
            after = text.split(option, 1)[1]
            assert f"[default: {defaults[name]}" in after.split("--", 1)[0], name

    def test_method_choices_come_from_the_method_table(self):
        text = " ".join(run("fit", "--help").output.split())
        choices = text.split("--method [", 1)[1].split("]", 1)[0].split("|")
        expected = {a for m in METHODS.values() if m.deployable for a in (m.name, *m.aliases)}
        assert set(choices) == expected | {"auto"} and "oracle" not in choices

    @pytest.mark.parametrize("command", ["fit", "calibrate", "evaluate", "sweep"])
    def test_help_ends_with_an_example(self, command):
        text = " ".join(run(command, "--help").output.split())
        tail = text.rsplit("Example: ", 1)[1]
        assert tail.startswith(f"eenet {command} ") and "Show this message" not in tail


class TestErrors:
    def test_unknown_method_lists_the_valid_names(self, tmp_path, caches):
        res = run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                  "--method", "magic")
        assert res.exit_code == 2 and "'magic' is not one of" in res.output
        for name in ("eenet", "eenet-paper", "maxprob", "msdnet", "entropy", "branchynet",
                     "patience", "pabee", "static"):
            assert f"'{name}'" in res.output
        assert fit(caches[0], tmp_path / "p.pt", "--method", "PABEE").exit_code == 0

    def test_budget_below_the_cheapest_exit_is_one_line(self, tmp_path, caches):
        res = run("fit", caches[0], "--budget", 0.5, "--out", tmp_path / "p.pt")
        assert res.exit_code == 1
        assert one_error_line(res) == ("Error: budget 0.5 ms is below the cheapest exit's "
                                       "cost 1 ms; choose a budget between 1 and 3 ms")
        assert not (tmp_path / "p.pt").exists()

    def test_debug_lets_an_eenet_error_through(self, tmp_path, caches):
        with pytest.raises(EenetError, match="below the cheapest exit"):
            run("--debug", "fit", caches[0], "--budget", 0.5, "--out", tmp_path / "p.pt",
                catch_exceptions=False)
        res = run("--debug", "fit", caches[0], "--budget", 0.5, "--out", tmp_path / "p.pt")
        assert isinstance(res.exception, EenetError) and res.exc_info[2] is not None

    def test_debug_prints_the_traceback_from_python_m_eenet(self, tmp_path, caches):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "eenet", "--debug", "fit", str(caches[0]),
                               "--budget", "0.5", "--out", str(tmp_path / "p.pt")],
                              capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr
        assert "EenetError: budget 0.5 ms is below the cheapest exit's cost" in proc.stderr
        assert not (tmp_path / "p.pt").exists()

    def test_a_bug_is_not_turned_into_one_line(self, tmp_path, caches, monkeypatch):
        def broken(self, *args, **kwargs):
            raise RuntimeError("boom: a bug in eenet")

        monkeypatch.setattr(eenet.policy.ExitPolicy, "fit", broken)
        with pytest.raises(RuntimeError, match="boom: a bug in eenet"):
            run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                "--method", "maxprob", catch_exceptions=False)
        res = run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                  "--method", "maxprob")
        assert isinstance(res.exception, RuntimeError)
        assert "Error: boom" not in res.output
        assert not (tmp_path / "p.pt").exists()

    def test_ctrl_c_exits_130_and_writes_nothing(self, tmp_path, caches, monkeypatch):
        def interrupted(self, *args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(eenet.policy.ExitPolicy, "fit", interrupted)
        res = run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                  "--method", "maxprob")
        assert res.exit_code == 130
        assert "interrupted; nothing was written" in res.stderr
        assert not (tmp_path / "p.pt").exists()

    def test_ctrl_c_while_saving_leaves_no_file(self, tmp_path, caches, monkeypatch):
        """Interrupted after the temporary file is complete, before its rename."""
        import eenet._validation as validation

        def interrupted(src, dst):
            assert Path(src).stat().st_size > 0 and not Path(dst).exists()
            raise KeyboardInterrupt

        monkeypatch.setattr(validation.os, "replace", interrupted)
        res = run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                  "--method", "maxprob")
        assert res.exit_code == 130
        assert sorted(p.name for p in tmp_path.iterdir()) == ["test.h5", "val.h5"]

    def test_full_disk_while_saving_is_one_line(self, tmp_path, caches):
        """A real 4 KiB disk (a tmpfs; skipped where the test may not mount one)."""
        from _toy_models import mount_tmpfs

        with mount_tmpfs(tmp_path / "small", "4k") as small:
            res = run("fit", caches[0], "--budget", 2, "--out", small / "p.pt",
                      "--method", "maxprob")
            assert res.exit_code == 1
            line = one_error_line(res)
            assert "no space left on device" in line.lower() and "p.pt" in line
            assert list(small.iterdir()) == []

    def test_injected_full_disk_at_the_writer_is_one_line(self, tmp_path, caches,
                                                          monkeypatch):
        import eenet._validation as validation

        def full(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(validation.os, "replace", full)
        res = run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                  "--method", "maxprob")
        assert res.exit_code == 1
        assert "p.pt: no space left on device while writing" in one_error_line(res)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["test.h5", "val.h5"]

    def test_corrupt_foreign_and_old_policy_files(self, tmp_path, caches):
        (tmp_path / "bad.pt").write_bytes(b"garbage" * 50)
        res = run("evaluate", tmp_path / "bad.pt", caches[1])
        assert res.exit_code == 1 and "not a readable policy file" in one_error_line(res)
        fit(caches[0], tmp_path / "whole.pt", "--method", "maxprob")
        (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
        res = run("evaluate", tmp_path / "cut.pt", caches[1])
        line = one_error_line(res)  # whole, not cut mid-word
        assert res.exit_code == 1 and line.startswith(f"Error: {tmp_path / 'cut.pt'}: not a "
                                                      f"readable policy file (")
        assert line.endswith("); it is corrupt or not made by `eenet fit`")
        torch.save({"hello": 1}, tmp_path / "foreign.pt")
        res = run("evaluate", tmp_path / "foreign.pt", caches[1])
        assert res.exit_code == 1 and "not an eenet policy file" in one_error_line(res)
        fit(caches[0], tmp_path / "p.pt", "--method", "maxprob")
        state = torch.load(tmp_path / "p.pt", weights_only=True)
        state["format_version"] = 1
        torch.save(state, tmp_path / "old.pt")
        res = run("calibrate", tmp_path / "old.pt", caches[0])
        assert res.exit_code == 1
        assert "policy format version 1 is not the version this eenet reads" in \
            one_error_line(res)

    def test_policy_from_another_network(self, tmp_path, caches):
        fit(caches[0], tmp_path / "p.pt", "--method", "maxprob")
        write_cache(tmp_path / "other.h5", synthetic_cache(30, n_exits=3, n_classes=7,
                                                           costs=[1.0, 2.0, 3.0]))
        res = run("evaluate", tmp_path / "p.pt", tmp_path / "other.h5")
        assert res.exit_code == 1
        assert "3 exits x 7 classes but the policy was fitted on 3 x 5" in one_error_line(res)

    def test_one_exit_cache(self, tmp_path):
        write_cache(tmp_path / "one.h5", synthetic_cache(20, n_exits=1, costs=[1.0]))
        res = run("fit", tmp_path / "one.h5", "--budget", 1.0, "--out", tmp_path / "p.pt")
        assert res.exit_code == 1 and "single exit" in one_error_line(res)

    def test_usage_errors_exit_2(self, tmp_path, caches):
        res = run("fit", tmp_path / "nope.h5", "--budget", 1, "--out", tmp_path / "p.pt")
        assert res.exit_code == 2 and "does not exist" in res.output
        res = run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                  "--method", "maxprob", "--epochs", 5)
        assert res.exit_code == 2
        assert "--epochs apply to learned methods (eenet, eenet-paper) only" in res.output
        res = run("sweep", caches[0], caches[1], "--holdout", 0.5, "--out", tmp_path / "s.csv")
        assert res.exit_code == 2 and "not both" in res.output
        assert not (tmp_path / "p.pt").exists() and not (tmp_path / "s.csv").exists()

    def test_calibration_the_method_does_not_accept(self, tmp_path, caches):
        fit(caches[0], tmp_path / "p.pt", "--method", "static")
        res = run("calibrate", tmp_path / "p.pt", caches[0], "--mode", "search")
        assert res.exit_code == 1
        assert "unknown calibration for static 'search'; choose one of: static" in \
            one_error_line(res)
