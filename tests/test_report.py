"""eenet.report: the summary table and its tie marks, the budget gaps, the plot."""
from __future__ import annotations

import errno
import math

import numpy as np
import pandas as pd
import pytest

from eenet._validation import EenetError
from eenet.report import MIN_TIE, budget_gaps, format_summary, plot_sweep, tie_margin
from eenet.sweep import COLUMNS


def make_table(cells, singles=True):
    """A sweep table from ``{(method, budget, seed): accuracy}`` (cost = 0.99 budget)."""
    rows = []
    for (method, budget, seed), acc in cells.items():
        rows.append({"method": method, "budget": budget, "accuracy": acc,
                     "avg_cost": 0.99 * budget, "val_accuracy": acc, "val_avg_cost": budget,
                     "exit_fractions": "0.5;0.5", "n_samples": 100, "seed": seed,
                     "risk_consistency": 0.0, "risk_gap": 0.0, "risk_brier": 0.0})
    if singles:
        for k, (cost, acc) in enumerate([(1.0, 0.99), (4.0, 0.999)]):  # never compared
            rows.append({"method": f"exit{k}", "budget": cost, "accuracy": acc,
                         "avg_cost": cost, "val_accuracy": acc, "val_avg_cost": cost,
                         "exit_fractions": "1;0", "n_samples": 100, "seed": 0,
                         "risk_consistency": 0.0, "risk_gap": 0.0, "risk_brier": 0.0})
    return pd.DataFrame(rows, columns=COLUMNS)


def _body(text):
    """{budget: {method: cell}} from the summary's rows (the header row names the methods)."""
    lines = text.splitlines()
    methods = lines[1].split()[1:]
    out = {}
    for line in lines[2:-1]:
        cells = line.split()
        out[float(cells[0])] = dict(zip(methods, cells[1:]))
    return out


ONE_SEED = {
    ("eenet", 2.0, 0): 0.8000, ("maxprob", 2.0, 0): 0.7995, ("entropy", 2.0, 0): 0.7900,
    ("patience", 2.0, 0): 0.7989, ("oracle", 2.0, 0): 0.9500,
    ("eenet", 3.0, 0): 0.8500, ("maxprob", 3.0, 0): 0.8600, ("entropy", 3.0, 0): 0.8591,
    ("oracle", 3.0, 0): 0.9700,
}


class TestFormatSummary:
    def test_one_seed_marks_policies_within_a_tenth_of_a_point(self):
        text = format_summary(make_table(ONE_SEED), cost_unit="ms")
        header = text.splitlines()[0]
        assert "(ms), mean over 1 seed(s)" in header
        assert "within 0.10 points of the best policy" in header
        assert "one seed: run --seeds 3 for the spread" in header
        body = _body(text)
        assert list(body) == [2.0, 3.0]
        # 0.0005 below the best is a tie, 0.0011 below is not; the oracle is never marked
        assert body[2.0] == {"eenet": "80.00*", "maxprob": "79.95*", "entropy": "79.00",
                             "patience": "79.89", "oracle": "95.00"}
        assert body[3.0] == {"eenet": "85.00", "maxprob": "86.00*", "entropy": "85.91*",
                             "patience": "-", "oracle": "97.00"}

    def test_several_seeds_use_the_seed_spread_and_ignore_the_oracle(self):
        cells = {}
        for seed, (e, m, n, o) in enumerate([(0.80, 0.81, 0.79, 0.50), (0.82, 0.81, 0.79, 0.99),
                                             (0.84, 0.81, 0.79, 0.70)]):
            cells.update({("eenet", 2.0, seed): e, ("maxprob", 2.0, seed): m,
                          ("entropy", 2.0, seed): n, ("oracle", 2.0, seed): o})
        table = make_table(cells)
        assert tie_margin(table) == pytest.approx(0.02, rel=1e-12)  # sd of eenet's 3 seeds
        text = format_summary(table)
        header = text.splitlines()[0]
        assert "mean over 3 seed(s)" in header and "within 2.00 points" in header
        assert "the largest seed-to-seed sd over 3 seeds" in header
        # eenet 82.00 is best; maxprob 81.00 is within 2 points; entropy 79.00 is not
        assert _body(text)[2.0] == {"eenet": "82.00*", "maxprob": "81.00*",
                                    "entropy": "79.00", "oracle": "73.00"}

    def test_methods_in_table_order_and_others_after(self):
        cells = {("maxprob:search", 2.0, 0): 0.7, ("static", 2.0, 0): 0.6,
                 ("eenet", 2.0, 0): 0.65, ("maxprob", 2.0, 0): 0.5}
        text = format_summary(make_table(cells))
        assert text.splitlines()[1].split() == ["budget", "eenet", "maxprob", "static",
                                                "maxprob:search"]
        assert _body(text)[2.0]["maxprob:search"] == "70.00*"

    def test_max_cost_over_budget_row(self):
        table = make_table(ONE_SEED)
        table.loc[(table["method"] == "maxprob") & (table["budget"] == 3.0), "avg_cost"] = 3.03
        last = format_summary(table).splitlines()[-1].split()
        assert last[:2] == ["max", "cost/B"]
        assert dict(zip(["eenet", "maxprob", "entropy", "patience", "oracle"], last[2:])) == {
            "eenet": "0.990", "maxprob": "1.010", "entropy": "0.990", "patience": "0.990",
            "oracle": "0.990"}

    def test_missing_cells_and_no_policies(self):
        cells = dict(ONE_SEED)
        del cells[("entropy", 3.0, 0)]
        assert _body(format_summary(make_table(cells)))[3.0]["entropy"] == "-"
        assert format_summary(make_table({})) == "(no policies in the table)"
        # a cell the sweep could not serve (NaN) shows as '-' and takes no part in the ties
        table = make_table({("eenet", 1.0, 0): 0.7, ("maxprob", 1.0, 0): math.nan,
                            ("maxprob", 2.0, 0): 0.8})
        table.loc[table["accuracy"].isna(), "avg_cost"] = math.nan
        text = format_summary(table)
        assert _body(text)[1.0] == {"eenet": "70.00*", "maxprob": "-"}
        assert text.splitlines()[-1].split()[2:] == ["0.990", "0.990"]


class TestTieMargin:
    def test_floor_with_one_seed_and_sd_with_several(self):
        assert tie_margin(make_table(ONE_SEED)) == MIN_TIE == 0.001
        cells = {("maxprob", 2.0, 0): 0.70, ("maxprob", 2.0, 1): 0.71,
                 ("maxprob", 3.0, 0): 0.75, ("maxprob", 3.0, 1): 0.79,
                 ("oracle", 3.0, 0): 0.1, ("oracle", 3.0, 1): 0.9}
        assert tie_margin(make_table(cells)) == pytest.approx(np.std([0.75, 0.79], ddof=1),
                                                              rel=1e-12)
        tiny = {("maxprob", 2.0, 0): 0.7000, ("maxprob", 2.0, 1): 0.7001}
        assert tie_margin(make_table(tiny)) == MIN_TIE


class TestBudgetGaps:
    def test_hand_numbers(self):
        cells = {("eenet", 2.0, 0): 0.80, ("maxprob", 2.0, 0): 0.78, ("entropy", 2.0, 0): 0.77,
                 ("patience", 2.0, 0): 0.70, ("oracle", 2.0, 0): 0.90,
                 ("eenet", 3.0, 0): 0.84, ("maxprob", 3.0, 0): 0.85, ("static", 3.0, 0): 0.86,
                 ("oracle", 3.0, 0): 0.96,
                 ("eenet", 4.0, 0): 0.90, ("maxprob", 4.0, 0): 0.90, ("oracle", 4.0, 0): 0.90}
        gaps = budget_gaps(make_table(cells))
        assert list(gaps.columns) == ["budget", "eenet", "best_baseline", "best_baseline_name",
                                      "oracle", "gain", "gap_closed"]
        assert gaps["budget"].tolist() == [2.0, 3.0, 4.0]
        assert gaps["best_baseline_name"].tolist() == ["maxprob", "static", "maxprob"]
        np.testing.assert_allclose(gaps["best_baseline"], [0.78, 0.86, 0.90], rtol=1e-12)
        np.testing.assert_allclose(gaps["gain"], [0.02, -0.02, 0.0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(gaps["gap_closed"][:2], [0.02 / 0.12, -0.02 / 0.10],
                                   rtol=1e-9)
        assert math.isnan(gaps["gap_closed"][2])  # no gap left to close

    def test_means_over_seeds(self):
        cells = {("eenet", 2.0, 0): 0.80, ("eenet", 2.0, 1): 0.84, ("maxprob", 2.0, 0): 0.80,
                 ("maxprob", 2.0, 1): 0.80, ("oracle", 2.0, 0): 0.92, ("oracle", 2.0, 1): 0.92}
        gaps = budget_gaps(make_table(cells))
        np.testing.assert_allclose(gaps[["eenet", "gain", "gap_closed"]].iloc[0],
                                   [0.82, 0.02, 0.02 / 0.12], rtol=1e-9)

    def test_needs_the_learned_method_and_the_oracle(self):
        with pytest.raises(EenetError, match="budget_gaps needs eenet and oracle rows"):
            budget_gaps(make_table({("maxprob", 2.0, 0): 0.8, ("oracle", 2.0, 0): 0.9}))
        gaps = budget_gaps(make_table({("eenet-paper", 2.0, 0): 0.8, ("maxprob", 2.0, 0): 0.7,
                                       ("oracle", 2.0, 0): 0.9}), learned="eenet-paper")
        assert gaps["gain"].tolist() == pytest.approx([0.1])

    def test_a_budget_without_any_baseline_value(self):
        cells = {("eenet", 1.0, 0): 0.70, ("maxprob", 1.0, 0): math.nan,
                 ("oracle", 1.0, 0): 0.80,
                 ("eenet", 2.0, 0): 0.80, ("maxprob", 2.0, 0): 0.78, ("oracle", 2.0, 0): 0.90}
        gaps = budget_gaps(make_table(cells))
        assert gaps["budget"].tolist() == [1.0, 2.0]
        assert math.isnan(gaps["gain"][0]) and math.isnan(gaps["best_baseline"][0])
        assert gaps["gain"][1] == pytest.approx(0.02)


class TestPlotSweep:
    def test_writes_a_png(self, tmp_path):
        path = plot_sweep(make_table(ONE_SEED), tmp_path / "p.png", cost_unit="ms",
                          title="demo")
        assert path == tmp_path / "p.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [p.name for p in tmp_path.iterdir()] == ["p.png"]

    def test_a_full_disk_leaves_nothing(self, tmp_path, monkeypatch):
        import matplotlib.figure

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
        with pytest.raises(EenetError, match="p.png: no space left on device while writing"):
            plot_sweep(make_table(ONE_SEED), tmp_path / "p.png")
        assert list(tmp_path.iterdir()) == []
        (tmp_path / "old.png").write_bytes(b"old")
        with pytest.raises(EenetError, match="no space left"):
            plot_sweep(make_table(ONE_SEED), tmp_path / "old.png")
        assert [p.name for p in tmp_path.iterdir()] == ["old.png"]
        assert (tmp_path / "old.png").read_bytes() == b"old"  # replaced whole or not at all

    def test_missing_directory(self, tmp_path):
        with pytest.raises(EenetError, match="output directory .* does not exist"):
            plot_sweep(make_table(ONE_SEED), tmp_path / "no" / "p.png")
