"""Budget sweeps: default budgets, the CSV table, the summary, the plot and the gap report."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eenet._validation import EenetError
from eenet.sweep import (COLUMNS, budget_gaps, default_budgets, format_summary,
                         parse_method_spec, plot_sweep, run_sweep)
from eenet.synthetic import synthetic_cache


class TestDefaultBudgets:
    def test_inside_the_cost_range_and_increasing(self, small_cache):
        b = default_budgets(small_cache, 12)
        assert len(b) == 12 and np.all(np.diff(b) > 0)
        assert b[0] > small_cache.costs[0] and b[-1] == pytest.approx(small_cache.costs[-1])

    def test_denser_where_accuracy_climbs(self):
        # accuracy jumps between exit 0 and 1, flat after: budgets crowd the first segment
        c = synthetic_cache(3000, n_exits=4, base_acc=(0.3, 0.8, 0.81, 0.82),
                            costs=[1.0, 2.0, 3.0, 4.0])
        b = default_budgets(c, 12)
        assert (b <= 2.0).sum() > (b > 3.0).sum()

    def test_refuses_flat_costs(self):
        with pytest.raises(EenetError, match="same"):
            default_budgets(synthetic_cache(50, costs=[1.0, 1.0, 1.0, 1.0]), 3)


def test_parse_method_spec():
    assert parse_method_spec("pabee") == ("patience", None, "patience")
    assert parse_method_spec("eenet:assignment") == ("eenet", "assignment", "eenet:assignment")
    with pytest.raises(EenetError, match="calibration for static"):
        parse_method_spec("static:search")


@pytest.fixture(scope="module")
def table():
    val = synthetic_cache(2000, seed=21)
    test = synthetic_cache(2000, seed=22)
    return run_sweep(val, test, budgets=[2.5, 4.0], methods=["eenet", "maxprob", "static",
                                                             "oracle"],
                     seeds=[0, 1], jobs=1, hparams={"epochs": 30}, verbose=False), val


class TestRunSweep:
    def test_schema_and_rows(self, table):
        t, val = table
        assert list(t.columns) == COLUMNS
        assert len(t) == 4 * 2 * 2 + val.n_exits
        fr = t["exit_fractions"].str.split(";").apply(lambda v: sum(map(float, v)))
        np.testing.assert_allclose(fr, 1.0, atol=2e-4)
        pol = t[t["method"].isin(["eenet", "maxprob", "static", "oracle"])]
        assert (pol["avg_cost"] <= pol["budget"] * 1.01).all()

    def test_oracle_on_top(self, table):
        t, _ = table
        pol = t[~t["method"].str.startswith("exit")]
        m = pol.groupby(["budget", "method"])["accuracy"].mean().unstack()
        assert (m["oracle"] >= m[["eenet", "maxprob", "static"]].max(axis=1)).all()

    def test_summary_marks_best_and_gaps(self, table):
        t, _ = table
        text = format_summary(t, cost_unit="ms")
        body = text.splitlines()[2:-1]  # one line per budget
        assert len(body) == 2 and all(line.count("*") >= 1 for line in body)
        best = t[t["method"].isin(["eenet", "maxprob", "static"])].groupby("budget")[
            "accuracy"].mean()
        assert best.notna().all()
        assert "oracle" in text
        gaps = budget_gaps(t)
        assert list(gaps["budget"]) == [2.5, 4.0]
        np.testing.assert_allclose(gaps["gain"], gaps["eenet"] - gaps["best_baseline"])

    def test_plot_is_png(self, table, tmp_path):
        t, val = table
        path = plot_sweep(t, tmp_path / "p.png", val)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [p.name for p in tmp_path.iterdir()] == ["p.png"]

    def test_mismatched_caches(self, small_cache):
        with pytest.raises(EenetError, match="differ"):
            run_sweep(small_cache, synthetic_cache(50, n_exits=3), budgets=[3.0], jobs=1,
                      verbose=False)

    def test_parallel_matches_serial(self):
        val = synthetic_cache(800, seed=31)
        test = synthetic_cache(800, seed=32)
        kw = dict(budgets=[3.0, 4.5], methods=["eenet", "maxprob"], seeds=[0],
                  hparams={"epochs": 15}, verbose=False)
        serial = run_sweep(val, test, jobs=1, **kw)
        parallel = run_sweep(val, test, jobs=2, **kw)
        pd.testing.assert_frame_equal(serial, parallel)
