"""The command line end to end: import -> fit -> calibrate -> evaluate -> sweep, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from eenet.cli import main


def known_answer_npz(path, n=1200, seed=0):
    """3 exits, costs 1/2/3. 60% easy samples: exit 0 right and confident. 40% hard:
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
    np.savez(path, logits=logits, labels=labels, costs=np.array([1.0, 2.0, 3.0]))
    return path


@pytest.fixture
def caches(tmp_path):
    runner = CliRunner()
    for split, seed in (("val", 0), ("test", 1)):
        src = known_answer_npz(tmp_path / f"{split}.npz", seed=seed)
        res = runner.invoke(main, ["import", str(src), "--out", str(tmp_path / f"{split}.h5")])
        assert res.exit_code == 0, res.output
    return tmp_path / "val.h5", tmp_path / "test.h5"


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


class TestChain:
    @pytest.mark.parametrize("method,extra", [
        ("eenet", ["--epochs", 60]),
        ("maxprob", ["--calibration", "search"]),
        ("entropy", ["--calibration", "search"]),
    ])
    def test_fit_evaluate_finds_the_known_policy(self, tmp_path, caches, method, extra):
        val, test = caches
        pol = tmp_path / f"{method}.pt"
        res = _run("fit", val, "--budget", 1.8, "--out", pol, "--method", method, *extra)
        assert res.exit_code == 0, res.output
        res = _run("evaluate", pol, test, "--json")
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert set(out) >= {"method", "budget", "accuracy", "avg_cost", "cost_unit",
                            "exit_fractions", "exit_accuracy", "n_samples"}
        assert out["n_samples"] == 1200 and out["budget"] == 1.8
        assert sum(out["exit_fractions"]) == pytest.approx(1.0, abs=1e-9)
        # easy samples are separable by confidence: any sane policy is near perfect
        assert out["accuracy"] >= 0.95
        assert out["avg_cost"] <= 1.8 * 1.01

    def test_published_geometric_rule_meets_budget(self, tmp_path, caches):
        # MSDNet's geometric exit distribution sends a share to exit 1, which is wrong on
        # every hard sample: it meets the budget but cannot be perfect here.
        val, test = caches
        pol = tmp_path / "g.pt"
        assert _run("fit", val, "--budget", 1.8, "--out", pol, "--method", "maxprob"
                    ).exit_code == 0
        out = json.loads(_run("evaluate", pol, test, "--json").output)
        assert out["avg_cost"] <= 1.8 * 1.01 and 0.6 < out["accuracy"] < 0.95

    def test_calibrate_to_new_budget_and_table(self, tmp_path, caches):
        val, test = caches
        pol = tmp_path / "p.pt"
        assert _run("fit", val, "--budget", 2.5, "--out", pol, "--method", "maxprob"
                    ).exit_code == 0
        res = _run("calibrate", pol, val, "--budget", 1.5, "--out", tmp_path / "p15.pt")
        assert res.exit_code == 0, res.output
        res = _run("evaluate", tmp_path / "p15.pt", test)
        assert res.exit_code == 0, res.output
        assert "budget    1.5 ms" in res.output
        cost = float(res.output.split("avg cost")[1].split()[0])
        assert cost <= 1.5 * 1.01

    def test_holdout_on_one_cache(self, tmp_path, caches):
        val, _ = caches
        pol = tmp_path / "h.pt"
        res = _run("fit", val, "--budget", 2.0, "--out", pol, "--method", "entropy",
                   "--holdout", 0.5)
        assert res.exit_code == 0, res.output
        out = json.loads(_run("evaluate", pol, val, "--json").output)
        assert out["n_samples"] == 600  # the held-out half, recorded in the policy

    def test_sweep_csv_plot_and_summary(self, tmp_path, caches):
        val, test = caches
        res = _run("sweep", val, test, "--budgets", "1.4,1.8,2.4", "--methods",
                   "maxprob,entropy,patience,static,oracle,maxprob:search", "--out",
                   tmp_path / "s.csv", "--plot", tmp_path / "s.png", "--jobs", 1)
        assert res.exit_code == 0, res.output
        table = pd.read_csv(tmp_path / "s.csv")
        assert list(table.columns) == ["method", "budget", "accuracy", "avg_cost",
                                       "val_accuracy", "val_avg_cost", "exit_fractions",
                                       "n_samples", "seed"]
        assert len(table) == 6 * 3 + 3  # methods x budgets + single exits
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "test accuracy (%) by budget" in res.output and "*" in res.output


class TestBadInput:
    def test_budget_below_cheapest_exit(self, tmp_path, caches):
        res = _run("fit", caches[0], "--budget", 0.5, "--out", tmp_path / "p.pt")
        assert res.exit_code != 0
        assert "below the cheapest exit" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "p.pt").exists()

    def test_budget_above_full_cost_warns_and_uses_everything(self, tmp_path, caches):
        res = _run("fit", caches[0], "--budget", 10, "--out", tmp_path / "p.pt",
                   "--method", "maxprob")
        assert res.exit_code == 0, res.output
        assert "above the last exit's cost" in res.output
        out = json.loads(_run("evaluate", tmp_path / "p.pt", caches[1], "--json").output)
        assert out["accuracy"] >= 0.99

    def test_unknown_method_lists_valid_ones(self, tmp_path, caches):
        res = _run("fit", caches[0], "--budget", 2, "--out", tmp_path / "p.pt",
                   "--method", "magic")
        assert res.exit_code != 0 and "unknown method 'magic'" in res.output
        assert "maxprob" in res.output

    def test_one_exit_cache(self, tmp_path):
        np.savez(tmp_path / "one.npz", logits=np.random.randn(20, 1, 3),
                 labels=np.arange(20) % 3, costs=[1.0])
        assert _run("import", tmp_path / "one.npz", "--out", tmp_path / "one.h5").exit_code == 0
        res = _run("fit", tmp_path / "one.h5", "--budget", 1.0, "--out", tmp_path / "p.pt")
        assert res.exit_code != 0 and "single exit" in res.output

    def test_policy_from_another_network(self, tmp_path, caches):
        pol = tmp_path / "p.pt"
        assert _run("fit", caches[0], "--budget", 2, "--out", pol, "--method", "maxprob"
                    ).exit_code == 0
        np.savez(tmp_path / "four.npz", logits=np.random.randn(30, 4, 5),
                 labels=np.arange(30) % 5, costs=[1.0, 2, 3, 4])
        assert _run("import", tmp_path / "four.npz", "--out", tmp_path / "four.h5"
                    ).exit_code == 0
        res = _run("evaluate", pol, tmp_path / "four.h5")
        assert res.exit_code != 0 and "4 exits" in res.output and "3" in res.output

    def test_corrupt_policy_file(self, tmp_path, caches):
        (tmp_path / "bad.pt").write_bytes(b"garbage" * 50)
        res = _run("evaluate", tmp_path / "bad.pt", caches[1])
        assert res.exit_code != 0 and "not a readable policy file" in res.output
        torch.save({"hello": 1}, tmp_path / "foreign.pt")
        res = _run("evaluate", tmp_path / "foreign.pt", caches[1])
        assert res.exit_code != 0 and "not an eenet policy file" in res.output

    def test_missing_cache_file(self, tmp_path):
        res = _run("fit", tmp_path / "nope.h5", "--budget", 1, "--out", tmp_path / "p.pt")
        assert res.exit_code != 0 and "does not exist" in res.output
