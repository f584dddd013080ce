"""ExitPolicy: fit, calibrate, apply, persist, refuse what does not fit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from eenet._validation import EenetError
from eenet.exit_policy import ExitPolicy, evaluate_oracle, resolve_method
from eenet.synthetic import synthetic_cache

FAST_EENET = dict(epochs=40)


def _policy(method, **kw):
    return ExitPolicy(method, **({**FAST_EENET, **kw} if method == "eenet" else kw))


class TestFitApply:
    @pytest.mark.parametrize("method", ["eenet", "maxprob", "entropy", "patience", "static"])
    def test_every_sample_exits_once_within_budget(self, val_test_caches, method):
        val, test = val_test_caches
        policy = _policy(method).fit(val, 4.0)
        exits = policy.exits(test)
        assert exits.shape == (test.n_samples,) and exits.dtype == np.int64
        assert exits.min() >= 0 and exits.max() < test.n_exits
        res = policy.evaluate(test)
        assert sum(res.exit_counts) == test.n_samples
        assert res.avg_cost <= 4.0 * 1.01
        # cost on the calibration split itself must meet the budget exactly or below
        assert policy.val_cost <= 4.0 + 1e-9

    @pytest.mark.parametrize("method", ["eenet", "maxprob", "patience", "static"])
    def test_save_load_gives_identical_exits(self, tmp_path, val_test_caches, method):
        val, test = val_test_caches
        policy = _policy(method).fit(val, 3.5)
        policy.save(tmp_path / "p.pt")
        state = torch.load(tmp_path / "p.pt", weights_only=True)  # plain containers only
        assert state["method"] == method and state["budget"] == 3.5
        again = ExitPolicy.load(tmp_path / "p.pt")
        np.testing.assert_array_equal(again.exits(test), policy.exits(test))
        assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]

    def test_more_budget_buys_accuracy(self, val_test_caches):
        val, test = val_test_caches
        accs = [ExitPolicy("maxprob").fit(val, b).evaluate(test).accuracy
                for b in (2.0, 3.5, 5.5)]
        assert accs[0] < accs[1] < accs[2]

    def test_recalibrate_changes_budget_only(self, val_test_caches):
        val, test = val_test_caches
        policy = _policy("eenet").fit(val, 5.0)
        before = policy.scorer.scores(test.probs())
        policy.calibrate(val, 2.5)
        np.testing.assert_array_equal(policy.scorer.scores(test.probs()), before)
        assert policy.budget == 2.5 and policy.evaluate(test).avg_cost <= 2.5 * 1.01


class TestRefusals:
    def test_apply_before_fit_names_the_step(self, small_cache):
        with pytest.raises(EenetError, match=r"call fit\(\) first"):
            ExitPolicy("maxprob").exits(small_cache)
        with pytest.raises(EenetError, match=r"call fit\(\) first"):
            ExitPolicy("eenet").calibrate(small_cache, 3.0)

    def test_other_cost_unit_or_exit_count(self, small_cache):
        policy = ExitPolicy("maxprob").fit(small_cache, 3.0)
        flops = dataclasses.replace(small_cache, cost_unit="flops")
        with pytest.raises(EenetError, match="costs are in 'flops'"):
            policy.evaluate(flops)
        with pytest.raises(EenetError, match="3 exits.*with 4"):
            policy.evaluate(synthetic_cache(50, n_exits=3))

    def test_oracle_is_not_a_policy(self):
        with pytest.raises(EenetError, match="upper bound"):
            ExitPolicy("oracle")

    def test_unknown_method_and_calibration(self):
        with pytest.raises(EenetError, match="unknown method 'nope'.*maxprob"):
            resolve_method("nope")
        with pytest.raises(EenetError, match="calibration for static"):
            ExitPolicy("static", calibration="search")

    def test_aliases(self):
        assert [resolve_method(a) for a in ("msdnet", "branchynet", "pabee")] == \
            ["maxprob", "entropy", "patience"]


def test_oracle_bounds_every_policy(val_test_caches):
    val, test = val_test_caches
    for budget in (2.0, 4.0):
        oracle = evaluate_oracle(test, budget)
        assert oracle.avg_cost <= budget + 1e-9
        for method in ("maxprob", "entropy", "static"):
            assert ExitPolicy(method).fit(val, budget).evaluate(test).accuracy <= \
                oracle.accuracy


def test_paper_recipe_preset(val_test_caches, tmp_path):
    val, test = val_test_caches
    policy = ExitPolicy("eenet-paper", epochs=30).fit(val, 4.0)
    assert policy.calibration == "assignment"
    hp = policy.scorer.hparams()
    assert (hp["target"], hp["features"]) == ("correct", "paper")
    assert policy.evaluate(test).avg_cost <= 4.0 * 1.01
    policy.save(tmp_path / "paper.pt")
    again = ExitPolicy.load(tmp_path / "paper.pt")
    assert again.method == "eenet-paper" and again.scorer.hparams()["target"] == "correct"
    np.testing.assert_array_equal(again.exits(test), policy.exits(test))


def test_full_budget_is_the_full_model(val_test_caches):
    val, test = val_test_caches
    for method in ("eenet", "maxprob"):
        exits = _policy(method, calibration="search").fit(val, float(val.costs[-1])).exits(test)
        assert (exits == val.n_exits - 1).all()
