"""ExitPolicy: fit, calibrate, apply, persist, and refuse or warn about what does not fit."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from eenet._validation import EenetError
from eenet.cache import ExitCache, stratified_split
from eenet.policy import POLICY_FORMAT, POLICY_VERSION, ExitPolicy, sample_fingerprints
from eenet.scores import METHODS, score_cache
from eenet.synthetic import synthetic_cache, synthetic_example

# learned scorers with their training pinned, so the tests do not move with tuned defaults
FAST_EENET = {"epochs": 20, "hidden": 16, "batch_size": 512, "lr": 1e-2, "patience": 10}
BUDGET = 4.0
PAIRS = [(name, cal) for name, m in METHODS.items() if m.deployable for cal in m.calibrations]
DEPLOYABLE = [name for name, m in METHODS.items() if m.deployable]


class Foreign:
    """Not a plain container: a weights-only load refuses it."""


def make_policy(method: str, **kw) -> ExitPolicy:
    hp = FAST_EENET if METHODS[method].learned else {}
    return ExitPolicy(method, **{**hp, **kw})


@pytest.fixture(scope="module")
def example():
    return synthetic_example(seed=0)  # 4000 validation and 4000 test samples, 4 exits


@pytest.fixture(scope="module")
def fitted(example):
    """One policy per deployable method, default calibration, fitted at BUDGET."""
    val, _ = example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: make_policy(name).fit(val, BUDGET) for name in DEPLOYABLE}


def _no_warning_matching(record, text):
    return not any(text in str(w.message) for w in record)


class TestFitApply:
    @pytest.mark.parametrize("method, calibration", PAIRS)
    def test_every_sample_exits_once_within_the_budget(self, example, fitted, method,
                                                       calibration):
        val, test = example
        if METHODS[method].learned:  # train once; the other calibrations recalibrate it
            policy = copy.deepcopy(fitted[method])
            if calibration != policy.calibration:
                policy.calibrate(val, mode=calibration)
        else:
            policy = make_policy(method, calibration=calibration).fit(val, BUDGET)
        assert policy.calibration == calibration and policy.rule.mode == calibration
        exits = policy.exits(test)
        assert exits.shape == (test.n_samples,) and exits.dtype == np.int64
        assert exits.min() >= 0 and exits.max() < test.n_exits
        res = policy.evaluate(test)
        assert sum(res.exit_counts) == test.n_samples
        np.testing.assert_array_equal(res.exit_counts, np.bincount(exits, minlength=4))
        # never more than 1% over on unseen data; close to it where the scores are not
        # discrete (patience scores tie in blocks, so their quotas stop short)
        assert res.avg_cost <= BUDGET * 1.01
        if calibration != "static" and (method != "patience" or calibration == "patience"):
            assert res.avg_cost >= BUDGET * 0.97
        assert policy.val_cost <= BUDGET * (1 + 1e-9)
        assert policy.budget == BUDGET and res.budget == BUDGET

    @pytest.mark.parametrize("method", DEPLOYABLE)
    def test_describe_labels_learned_accuracy_in_sample(self, fitted, method):
        text = fitted[method].describe()
        assert text.startswith(f"{method}, budget 4 ms")
        assert ("in-sample validation accuracy" in text) == METHODS[method].learned
        assert ExitPolicy(method).describe() == f"{method} (not fitted)"

    def test_oracle_bounds_every_policy(self, example, fitted):
        from eenet.evaluate import evaluate_oracle

        _, test = example
        oracle = evaluate_oracle(test, BUDGET).accuracy
        for policy in fitted.values():
            assert policy.evaluate(test).accuracy <= oracle

    def test_search_at_the_full_budget_is_at_least_the_full_model(self, example):
        val, _ = example
        with pytest.warns(UserWarning, match="above the last exit"):
            policy = make_policy("eenet", calibration="search").fit(val, 7.0)
        assert policy.val_accuracy >= val.correct()[:, -1].mean()


class TestPersistence:
    @pytest.mark.parametrize("method", DEPLOYABLE)
    def test_save_load_gives_identical_exits(self, tmp_path, example, fitted, method):
        _, test = example
        policy = fitted[method]
        policy.save(tmp_path / "p.pt")
        state = torch.load(tmp_path / "p.pt", weights_only=True)  # plain containers only
        assert (state["format"], state["format_version"]) == (POLICY_FORMAT, POLICY_VERSION)
        assert state["method"] == method and state["rule"]["budget"] == BUDGET
        again = ExitPolicy.load(tmp_path / "p.pt")
        np.testing.assert_array_equal(again.exits(test), policy.exits(test))
        assert again.describe() == policy.describe()
        assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]  # no temporary left

    def test_select_says_what_it_chose_and_keeps_it(self, tmp_path, example, fitted):
        val, test = example
        policy = fitted["eenet"]  # the default calibration
        assert policy.calibration == "select" and policy.rule.mode == "select"
        diag = policy.rule.diagnostics
        chosen, held_out = diag["selected"], diag["held_out_accuracy"]
        assert chosen in ("geometric", "search") and set(held_out) == {"geometric", "search"}
        summary = policy.describe()
        assert f"calibration select ({chosen}, " in summary and "+ guard" in summary
        assert all(f"{m} {a:.4f}" in summary for m, a in held_out.items())
        alone = copy.deepcopy(policy).calibrate(val, mode=chosen)
        np.testing.assert_array_equal(policy.exits(test), alone.exits(test))
        policy.save(tmp_path / "p.pt")
        state = torch.load(tmp_path / "p.pt", weights_only=True)  # the file records the choice
        assert state["calibration"] == "select"
        assert state["rule"]["diagnostics"]["selected"] == chosen
        assert state["rule"]["diagnostics"]["held_out_accuracy"] == pytest.approx(held_out)
        again = ExitPolicy.load(tmp_path / "p.pt")
        assert again.describe() == summary
        np.testing.assert_array_equal(again.exits(test), policy.exits(test))

    def test_a_forced_calibration_is_kept(self, example):
        val, _ = example
        policy = make_policy("maxprob", calibration="geometric").fit(val, BUDGET)
        assert policy.rule.mode == "geometric" and "selected" not in policy.rule.diagnostics
        assert "calibration geometric + guard" in policy.describe()

    def test_version_1_file_is_refused(self, tmp_path, fitted):
        state = fitted["maxprob"].to_state()
        state["format_version"] = 1
        torch.save(state, tmp_path / "old.pt")
        with pytest.raises(EenetError, match=r"old.pt: policy format version 1 is not the "
                                             r"version this eenet reads \(2\); fit the policy "
                                             r"again with `eenet fit`"):
            ExitPolicy.load(tmp_path / "old.pt")
        torch.save({"format": "eenet-policy", "format_version": 1, "method": "maxprob",
                    "thresholds": [0.5, 0.5, 0.5, -float("inf")]}, tmp_path / "v1.pt")
        with pytest.raises(EenetError, match="policy format version 1"):
            ExitPolicy.load(tmp_path / "v1.pt")

    def test_not_a_policy_damaged_or_missing(self, tmp_path, fitted):
        torch.save({"hello": 1}, tmp_path / "foreign.pt")
        with pytest.raises(EenetError, match="foreign.pt: not an eenet policy file"):
            ExitPolicy.load(tmp_path / "foreign.pt")
        (tmp_path / "garbage.pt").write_bytes(b"garbage" * 50)
        with pytest.raises(EenetError, match="garbage.pt: not a readable policy file "
                                             "\\(not a torch.save archive"):
            ExitPolicy.load(tmp_path / "garbage.pt")
        torch.save({"x": Foreign()}, tmp_path / "obj.pt")
        with pytest.raises(EenetError, match="holds Python objects, not only tensors"):
            ExitPolicy.load(tmp_path / "obj.pt")
        state = fitted["maxprob"].to_state()
        del state["scorer"]
        torch.save(state, tmp_path / "damaged.pt")
        with pytest.raises(EenetError, match=r"incomplete or damaged \(KeyError"):
            ExitPolicy.load(tmp_path / "damaged.pt")
        with pytest.raises(EenetError, match="no such policy file"):
            ExitPolicy.load(tmp_path / "missing.pt")


class TestWarnings:
    def test_cost_mismatch_warns_and_names_the_fix(self, example, fitted):
        _, test = example
        tenfold = dataclasses.replace(test, costs=test.costs * 10)
        for method in ("maxprob", "eenet"):
            with pytest.warns(UserWarning, match=r"differ from those the policy was fitted "
                                                 r"with .* by up to 900%.*--costs-from VAL\.h5"):
                fitted[method].evaluate(tenfold)
        policy = copy.deepcopy(fitted["maxprob"])
        with pytest.warns(UserWarning, match="--costs-from"):
            policy.calibrate(tenfold, 40.0)

    def test_costs_within_tolerance_do_not_warn(self, example, fitted):
        _, test = example
        close = dataclasses.replace(test, costs=test.costs * 1.03)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fitted["maxprob"].evaluate(close)
        assert _no_warning_matching(record, "--costs-from")

    def test_evaluating_on_the_fit_cache_warns_with_the_overlap(self, example, fitted):
        val, test = example
        with pytest.warns(UserWarning, match="4000 of the 4000 samples evaluated were used to "
                                             "fit the policy"):
            fitted["entropy"].evaluate(val)
        # found by content, whatever the order, ids or company
        mixed = ExitCache(np.concatenate([val.logits[::-40], test.logits[:300]]),
                          np.concatenate([val.labels[::-40], test.labels[:300]]), val.costs,
                          sample_ids=np.arange(400) + 10**6)
        with pytest.warns(UserWarning, match="100 of the 400 samples evaluated were used"):
            fitted["entropy"].evaluate(mixed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fitted["entropy"].evaluate(test)
        assert _no_warning_matching(record, "used to fit")

    @pytest.mark.parametrize("method", ["maxprob", "patience", "eenet"])
    def test_holdout_parts(self, example, method):
        val, _ = example
        fit_part, held = val.holdout_split(0.3, seed=1)
        policy = make_policy(method).fit(fit_part, BUDGET)
        with pytest.warns(UserWarning, match=f"{fit_part.n_samples} of the "
                                             f"{fit_part.n_samples} samples evaluated"):
            policy.evaluate(fit_part)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            policy.evaluate(held)
        assert _no_warning_matching(record, "used to fit")
        # fitted on another split of the same cache: the overlap is counted
        _, other_held = val.holdout_split(0.5, seed=2)
        fit_rows, _ = stratified_split(val.labels, 0.3, 1)
        overlap = np.intersect1d(stratified_split(val.labels, 0.5, 2)[1], fit_rows).size
        assert 0 < overlap < other_held.n_samples
        with pytest.warns(UserWarning, match=f"{overlap} of the {other_held.n_samples} samples"):
            policy.evaluate(other_held)

    def test_fingerprints_agree_across_float16_and_float32(self, example):
        val, _ = example
        half = dataclasses.replace(val, logits=val.logits.astype(np.float16))
        np.testing.assert_array_equal(sample_fingerprints(half), sample_fingerprints(val))
        assert np.unique(sample_fingerprints(val)).size == val.n_samples


class TestRefusals:
    @pytest.mark.parametrize("method", DEPLOYABLE)
    def test_another_class_count_is_refused(self, fitted, method):
        other = synthetic_cache(100, n_exits=4, n_classes=5, seed=9)
        with pytest.raises(EenetError, match="the cache has 4 exits x 5 classes but the policy "
                                             "was fitted on 4 x 10"):
            fitted[method].evaluate(other)
        with pytest.raises(EenetError, match="4 exits x 5 classes"):
            copy.deepcopy(fitted[method]).calibrate(other, BUDGET)

    def test_another_exit_count_or_cost_unit(self, fitted, example):
        with pytest.raises(EenetError, match="3 exits x 10 classes but the policy was fitted "
                                             "on 4 x 10"):
            fitted["maxprob"].exits(synthetic_cache(50, n_exits=3))
        flops = dataclasses.replace(example[1], cost_unit="flops")
        with pytest.raises(EenetError, match="costs are in 'flops' but the policy's budget is "
                                             "in 'ms'"):
            fitted["maxprob"].evaluate(flops)

    def test_before_fit_names_the_step(self, small_cache):
        for call, step in ((lambda p: p.exits(small_cache), "exits"),
                           (lambda p: p.calibrate(small_cache, 3.0), "calibrate"),
                           (lambda p: p.save("x.pt"), "save"),
                           (lambda p: p.val_accuracy, "val_accuracy")):
            with pytest.raises(EenetError, match=rf"{step}\(\) needs a fitted policy; call "
                                                 rf"fit\(\) first"):
                call(ExitPolicy("maxprob"))

    def test_oracle_unknown_method_and_calibration(self):
        with pytest.raises(EenetError, match="upper bound and not a deployable policy"):
            ExitPolicy("oracle")
        with pytest.raises(EenetError, match="unknown method 'nope'; choose one of: eenet"):
            ExitPolicy("nope")
        with pytest.raises(EenetError, match="unknown calibration for static 'search'; "
                                             "choose one of: static"):
            ExitPolicy("static", calibration="search")
        with pytest.raises(EenetError, match="maxprob takes no hyperparameters"):
            ExitPolicy("maxprob", epochs=3)

    def test_budget_below_the_cheapest_exit_and_single_exit_cache(self, small_cache):
        with pytest.raises(EenetError, match="budget 0.5 ms is below the cheapest exit's cost"):
            ExitPolicy("maxprob").fit(small_cache, 0.5)
        with pytest.raises(EenetError, match="single exit"):
            ExitPolicy("maxprob").fit(synthetic_cache(20, n_exits=1, costs=[1.0]), 1.0)

    def test_aliases(self):
        assert [ExitPolicy(a).method.name for a in ("MSDNet", "branchynet", "PABEE")] == \
            ["maxprob", "entropy", "patience"]


class TestCalibrate:
    @pytest.mark.parametrize("method", ["eenet", "maxprob", "patience"])
    def test_new_budget_changes_only_the_rule(self, example, fitted, method):
        val, test = example
        policy = copy.deepcopy(fitted[method])
        scorer_state = policy.scorer.to_state()
        scores = score_cache(policy.scorer, test)
        reference, provenance = copy.deepcopy(policy.reference), copy.deepcopy(policy.provenance)
        old_rule = policy.rule
        assert policy.calibrate(val, 2.5) is policy
        np.testing.assert_array_equal(score_cache(policy.scorer, test), scores)
        new_state = policy.scorer.to_state()
        for key, value in scorer_state.items():
            if key == "state_dict":
                for name, tensor in value.items():
                    assert torch.equal(new_state[key][name], tensor)
            else:
                assert new_state[key] == value
        assert policy.reference == reference and policy.provenance == provenance
        assert policy.rule is not old_rule and policy.budget == 2.5
        assert policy.calibration == METHODS[method].default_calibration
        assert policy.evaluate(test).avg_cost <= 2.5 * 1.01

    def test_mode_and_guard(self, example, fitted):
        val, _ = example
        policy = copy.deepcopy(fitted["maxprob"])
        policy.calibrate(val, mode="search", guard=False)
        assert (policy.calibration, policy.guard, policy.budget) == ("search", False, BUDGET)
        assert policy.rule.target == BUDGET and policy.rule.mode == "search"
        with pytest.raises(EenetError, match="unknown calibration for maxprob 'static'"):
            policy.calibrate(val, mode="static")

    def test_calibration_accuracy_never_falls_with_the_budget(self, fitted):
        """Issue 8: a network whose last exit is not its best; max-probability with the
        search fell from 0.944 to 0.667 between budgets 4.5 and 5 before the fix."""
        cache = synthetic_cache(2000, n_exits=5, seed=0, base_acc=(0.6, 0.8, 0.9, 0.85, 0.7))
        for method, hp in (("maxprob", {}), ("eenet", FAST_EENET)):
            policy = ExitPolicy(method, calibration="search", **hp).fit(cache, 3.0)
            accuracy = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for budget in (1.5, 3.0, 4.5, 5.0, 5.5, 6.5, 7.5):
                    accuracy.append(policy.calibrate(cache, budget).val_accuracy)
            assert np.all(np.diff(accuracy) >= 0), (method, accuracy)
            assert accuracy[-1] >= cache.correct().mean(axis=0).max()


class TestOverhead:
    """The policy's own per-exit cost is charged by calibration and evaluation alike (its
    exact accounting belongs to eenet.runtime and is tested there)."""

    def test_charged_by_calibration_and_evaluation(self, example):
        val, test = example
        policy = ExitPolicy("maxprob").fit(val, BUDGET, overhead=np.array([0.1, 0.2, 0.3, 0.4]))
        charged = policy.costs_for(test)
        assert np.all(charged >= test.costs) and np.any(charged > test.costs)
        res = policy.evaluate(test)
        assert res.avg_cost == pytest.approx(charged[policy.exits(test)].mean(), rel=1e-12)
        assert res.avg_cost <= BUDGET * 1.01 and policy.val_cost <= BUDGET * (1 + 1e-9)
        plain = ExitPolicy("maxprob").fit(val, BUDGET)
        np.testing.assert_array_equal(plain.costs_for(test), test.costs)

    def test_round_trip_keeps_the_overhead(self, example, tmp_path):
        val, test = example
        policy = ExitPolicy("entropy").fit(val, BUDGET, overhead=np.array([0.1, 0.1, 0.1, 0.1]))
        again = ExitPolicy.load(policy.save(tmp_path / "p.pt"))
        np.testing.assert_array_equal(again.overhead, policy.overhead)
        assert again.evaluate(test).avg_cost == policy.evaluate(test).avg_cost


def test_paper_recipe_preset(example, fitted, tmp_path):
    _, test = example
    policy = fitted["eenet-paper"]  # by default its quotas compete with geometric and search
    assert policy.calibration == "select" and policy.rule.mode == "select"
    assert set(policy.rule.diagnostics["held_out_accuracy"]) == {"assignment", "geometric",
                                                                 "search"}
    cfg = policy.scorer.config
    assert (cfg.target, cfg.features, cfg.alternate) == ("correct", "paper", True)
    again = ExitPolicy.load(policy.save(tmp_path / "paper.pt"))
    assert again.method.name == "eenet-paper" and again.scorer.config == cfg
    np.testing.assert_array_equal(again.exits(test), policy.exits(test))


def test_fit_records_the_samples_it_used(example):
    val, _ = example
    part = val.subset(np.arange(0, 4000, 2))
    policy = ExitPolicy("static").fit(part, BUDGET)
    assert policy.provenance["fit_sample_ids"] == list(range(2000))
    ids = dataclasses.replace(part, sample_ids=np.arange(0, 4000, 2))
    assert ExitPolicy("static").fit(ids, BUDGET).provenance["fit_sample_ids"] == \
        list(range(0, 4000, 2))
