"""Budget sweeps: default budgets, method specs, and the tidy table run_sweep builds."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from eenet._validation import EenetError
from eenet.evaluate import evaluate_oracle
from eenet.policy import ExitPolicy
from eenet.sweep import COLUMNS, MethodSpec, default_budgets, parse_method_spec, run_sweep
from eenet.synthetic import synthetic_cache

FAST_EENET = {"epochs": 10, "hidden": 8, "batch_size": 512, "lr": 1e-2, "patience": 10}


class TestDefaultBudgets:
    def test_inside_the_cost_range_and_increasing(self, small_cache):
        b = default_budgets(small_cache, 12)
        assert len(b) == 12 and np.all(np.diff(b) > 0)
        assert b[0] > small_cache.costs[0]
        assert b[-1] == pytest.approx(small_cache.costs[-1], rel=1e-12)

    def test_denser_where_accuracy_climbs(self):
        # accuracy jumps between exit 0 and 1 and is flat after: budgets crowd that segment
        c = synthetic_cache(3000, n_exits=4, base_acc=(0.3, 0.8, 0.81, 0.82),
                            costs=[1.0, 2.0, 3.0, 4.0])
        b = default_budgets(c, 12)
        assert (b <= 2.0).sum() > 2 * (b > 3.0).sum()

    def test_refusals(self, small_cache):
        with pytest.raises(EenetError, match="every exit costs the same"):
            default_budgets(synthetic_cache(50, costs=[1.0, 1.0, 1.0, 1.0]), 3)
        with pytest.raises(EenetError, match="n_budgets must be at least 1, got 0"):
            default_budgets(small_cache, 0)


class TestParseMethodSpec:
    @pytest.mark.parametrize("spec, calibration, expected", [
        ("pabee", None, MethodSpec("patience", None, "patience")),
        ("MSDNet:search", None, MethodSpec("maxprob", "search", "maxprob:search")),
        (" BranchyNet : geometric ", None, MethodSpec("entropy", "geometric",
                                                       "entropy:geometric")),
        ("eenet:assignment", None, MethodSpec("eenet", "assignment", "eenet:assignment")),
        ("maxprob", "search", MethodSpec("maxprob", "search", "maxprob")),
        ("static", "search", MethodSpec("static", None, "static")),  # not accepted: default
        ("Oracle", "search", MethodSpec("oracle", None, "oracle")),
        ("maxprob:geometric", "search", MethodSpec("maxprob", "geometric",
                                                   "maxprob:geometric")),
    ])
    def test_names_aliases_and_calibrations(self, spec, calibration, expected):
        assert parse_method_spec(spec, calibration) == expected

    @pytest.mark.parametrize("spec, match", [
        ("static:search", "unknown calibration for static 'search'; choose one of: static"),
        ("oracle:search", "oracle has no calibration; write it as 'oracle'"),
        ("magic", "unknown method 'magic'; choose one of: eenet"),
        ("pabee:assignment", "unknown calibration for patience 'assignment'"),
    ])
    def test_refusals(self, spec, match):
        with pytest.raises(EenetError, match=match):
            parse_method_spec(spec)


@pytest.fixture(scope="module")
def caches():
    return (synthetic_cache(1500, seed=21, split="val"),
            synthetic_cache(1500, seed=22, split="test"))


@pytest.fixture(scope="module")
def table(caches):
    val, test = caches
    return run_sweep(val, test, budgets=[4.0, 2.5, 2.5, 4.0],
                     methods=["eenet", "maxprob", "MSDNet", "maxprob:search", "static",
                              "oracle"],
                     seeds=[0, 1], jobs=1, hparams=FAST_EENET, verbose=False)


POLICIES = ["eenet", "maxprob", "maxprob:search", "static", "oracle"]


class TestRunSweep:
    def test_schema_and_one_row_per_cell(self, table, caches):
        val, _ = caches
        assert list(table.columns) == COLUMNS
        assert not table.duplicated(["method", "budget", "seed"]).any()
        singles = [f"exit{k}" for k in range(val.n_exits)]
        assert set(table["method"]) == set(POLICIES) | set(singles)
        pol = table[table["method"].isin(POLICIES)]
        assert sorted(set(pol["budget"])) == [2.5, 4.0]
        assert len(pol) == len(POLICIES) * 2 * 2 and len(table) == len(pol) + val.n_exits
        fractions = table["exit_fractions"].str.split(";").apply(lambda v: sum(map(float, v)))
        np.testing.assert_allclose(fractions, 1.0, rtol=0, atol=2e-4)
        assert (pol["avg_cost"] <= pol["budget"] * 1.01).all()
        assert (table["n_samples"] == 1500).all()

    @pytest.mark.parametrize("label, method, calibration", [
        ("maxprob", "maxprob", None), ("maxprob:search", "maxprob", "search"),
        ("static", "static", None), ("eenet", "eenet", None)])
    @pytest.mark.parametrize("seed", [0, 1])
    def test_rows_equal_fitting_each_policy_alone(self, table, caches, label, method,
                                                  calibration, seed):
        val, test = caches
        hp = FAST_EENET if method == "eenet" else {}
        for budget in (2.5, 4.0):
            row = table[(table["method"] == label) & (table["budget"] == budget)
                        & (table["seed"] == seed)].iloc[0]
            policy = ExitPolicy(method, calibration=calibration, seed=seed, **hp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the sweep reports every cell silently
                policy.fit(val, budget)
                alone = policy.evaluate(test).to_row()
            for key in ("accuracy", "avg_cost", "exit_fractions", "risk_gap"):
                assert row[key] == alone[key], key
            assert row["val_accuracy"] == policy.val_accuracy
            assert row["val_avg_cost"] == policy.val_cost

    def test_oracle_and_single_exit_rows(self, table, caches):
        val, test = caches
        for budget in (2.5, 4.0):
            row = table[(table["method"] == "oracle") & (table["budget"] == budget)].iloc[0]
            assert row["accuracy"] == evaluate_oracle(test, budget).accuracy
            assert row["val_accuracy"] == evaluate_oracle(val, budget).accuracy
        for k in range(test.n_exits):
            row = table[table["method"] == f"exit{k}"].iloc[0]
            assert row["budget"] == test.costs[k]
            assert row["avg_cost"] == pytest.approx(test.costs[k], rel=1e-12)
            assert row["accuracy"] == pytest.approx(test.correct()[:, k].mean(), rel=1e-12)
            assert row["val_accuracy"] == pytest.approx(val.correct()[:, k].mean(), rel=1e-12)
        means = table.groupby(["budget", "method"])["accuracy"].mean().unstack()
        assert (means.loc[[2.5, 4.0], "oracle"]
                >= means.loc[[2.5, 4.0], ["eenet", "maxprob", "static"]].max(axis=1)).all()

    def test_refusals(self, small_cache):
        with pytest.raises(EenetError, match="validation and test caches differ"):
            run_sweep(small_cache, synthetic_cache(50, n_exits=3), budgets=[3.0], jobs=1,
                      verbose=False)
        one = synthetic_cache(20, n_exits=1, costs=[1.0])
        with pytest.raises(EenetError, match="at least two exits"):
            run_sweep(one, one, budgets=[1.0], jobs=1, verbose=False)
        with pytest.raises(EenetError, match="budget 0.5 ms is below the cheapest"):
            run_sweep(small_cache, small_cache, budgets=[0.5], methods=["static"], jobs=1,
                      verbose=False)
        with pytest.raises(EenetError, match="unknown method 'magic'"):
            run_sweep(small_cache, small_cache, budgets=[3.0], methods=["magic"], jobs=1,
                      verbose=False)

    def test_cost_mismatch_warns(self, small_cache):
        test = dataclasses.replace(synthetic_cache(200, seed=3), costs=small_cache.costs * 10)
        with pytest.warns(UserWarning, match="differ from the validation cache's by up to 900%"
                                             ".*--costs-from VAL.h5"):
            run_sweep(small_cache, test, budgets=[3.0], methods=["static"], jobs=1,
                      verbose=False)

    def test_parallel_matches_serial(self):
        val = synthetic_cache(500, seed=31)
        test = synthetic_cache(500, seed=32)
        kw = dict(budgets=[2.0, 3.0, 4.5], methods=["eenet", "maxprob"], seeds=[0],
                  hparams={**FAST_EENET, "epochs": 3}, verbose=False)
        serial = run_sweep(val, test, jobs=1, **kw)
        parallel = run_sweep(val, test, jobs=2, **kw)
        pd.testing.assert_frame_equal(serial, parallel)

