"""Tests of the EENet scorer: outputs, determinism, persistence, training behaviour."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eenet._validation import EenetError
from eenet.policy import EENetScorer, _stratified_holdout, _targets, fit_eenet

COSTS = np.array([1.0, 2.0, 3.0])
FAST = {"epochs": 15, "hidden": 16}


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=2, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=2, keepdims=True)).astype(np.float32)


def make_problem(n: int = 1200, k: int = 3, c: int = 10, seed: int = 0):
    """Exits that get better with depth; a per-sample difficulty drives every exit.

    The label's logit is raised by an amount that shrinks with the sample's
    difficulty and grows with the exit, so a confident exit is usually right.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    difficulty = rng.normal(size=n)
    logits = rng.normal(size=(n, k, c))
    for j in range(k):
        margin = np.maximum(1.0 + 1.5 * j - 1.5 * difficulty + 0.3 * rng.normal(size=n), 0)
        logits[np.arange(n), j, labels] += 2.0 * margin
    return _softmax(logits), labels


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC by brute force over all pairs."""
    pos, neg = score[positive], score[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size))


@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def fitted(problem):
    probs, labels = problem
    return EENetScorer(**FAST).fit(probs, labels, COSTS, budget=2.0, seed=3)


class TestOutputs:
    def test_scores_shape_range_dtype(self, fitted, problem):
        probs, _ = problem
        q = fitted.scores(probs)
        assert q.shape == (probs.shape[0], 3) and q.dtype == np.float64
        assert np.all(np.isfinite(q)) and q.min() >= 0 and q.max() <= 1

    def test_assignment_and_exit_distribution(self, fitted, problem):
        probs, _ = problem
        r = fitted.assignment(probs)
        assert r.shape == (probs.shape[0], 3)
        np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-12)
        rbar = fitted.exit_distribution()
        assert rbar.shape == (3,) and np.all(rbar >= 0)
        np.testing.assert_allclose(rbar.sum(), 1.0, atol=1e-12)
        np.testing.assert_allclose(rbar, r.mean(0), atol=1e-6)

    def test_diagnostics(self, fitted):
        d = fitted.diagnostics
        assert 1 <= d["epochs_run"] <= FAST["epochs"]
        assert 0 <= d["best_epoch"] < d["epochs_run"]
        assert len(d["train_loss"]) == len(d["holdout_loss"]) == d["epochs_run"]
        assert d["n_train"] + d["n_holdout"] == 1200 and d["n_holdout"] > 0
        assert d["fit_seconds"] > 0 and np.isfinite(d["best_loss"])

    def test_before_fit(self, problem):
        scorer = EENetScorer()
        assert scorer.exit_distribution() is None
        for call in (lambda: scorer.scores(problem[0]), lambda: scorer.assignment(problem[0]),
                     scorer.state):
            with pytest.raises(EenetError, match=r"fit\(\)"):
                call()

    def test_wrong_shape_at_predict(self, fitted, problem):
        with pytest.raises(EenetError, match="fitted on 3 exits and 10 classes"):
            fitted.scores(problem[0][:, :2])


class TestDeterminismAndState:
    def test_same_seed_identical_and_global_state_untouched(self, problem):
        probs, labels = problem
        threads = torch.get_num_threads()
        a = EENetScorer(**FAST).fit(probs, labels, COSTS, 2.0, seed=7).scores(probs)
        torch.manual_seed(12345)  # global state must not matter
        b = EENetScorer(**FAST).fit(probs, labels, COSTS, 2.0, seed=7).scores(probs)
        np.testing.assert_array_equal(a, b)
        c = EENetScorer(**FAST).fit(probs, labels, COSTS, 2.0, seed=8).scores(probs)
        assert not np.array_equal(a, c)
        torch.manual_seed(12345)
        expected = torch.rand(3)
        torch.manual_seed(12345)
        EENetScorer(**FAST).fit(probs, labels, COSTS, 2.0, seed=7)
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == threads

    def test_state_round_trip(self, fitted, problem, tmp_path):
        probs, _ = problem
        path = tmp_path / "eenet.pt"
        torch.save(fitted.state(), path)
        loaded = EENetScorer.from_state(torch.load(path, weights_only=True))
        np.testing.assert_array_equal(loaded.scores(probs), fitted.scores(probs))
        np.testing.assert_array_equal(loaded.assignment(probs), fitted.assignment(probs))
        np.testing.assert_array_equal(loaded.exit_distribution(), fitted.exit_distribution())
        assert loaded.hparams() == fitted.hparams()
        assert loaded.diagnostics["best_epoch"] == fitted.diagnostics["best_epoch"]

    def test_from_state_rejects_other_methods(self):
        with pytest.raises(EenetError, match="method 'eenet'"):
            EENetScorer.from_state({"method": "maxprob"})

    def test_early_stopping_restores_a_copy_of_the_best(self, problem):
        probs, labels = problem
        scorer = EENetScorer(epochs=40, patience=40, tol=0.0, lr=0.1, hidden=16)
        scorer.fit(probs, labels, COSTS, 2.0, seed=1)
        d = scorer.diagnostics
        curve = d["holdout_loss"]
        assert d["best_epoch"] == int(np.argmin(curve))
        assert d["best_epoch"] < d["epochs_run"] - 1, "training should run past its best"
        # the loss of the weights the scorer holds now is the best, not the last, one
        _, hold = _stratified_holdout(labels, scorer.holdout, 1)
        static = scorer._static_features(probs[hold])
        targets = _targets(torch.from_numpy(probs[hold].argmax(2) == labels[hold][:, None]),
                           scorer.target)
        costs = torch.tensor(COSTS / COSTS[-1], dtype=torch.float32)
        with torch.no_grad():
            _, _, parts = scorer._losses(scorer._net, static, targets, costs, 2.0 / COSTS[-1])
        assert float(parts["total"]) == pytest.approx(d["best_loss"], rel=1e-6)
        assert float(parts["total"]) != pytest.approx(curve[-1], rel=1e-6)


class TestDegenerateInputs:
    @pytest.mark.parametrize("case", ["one_hot", "nobody_right", "one_label", "tiny",
                                      "one_exit", "zero_costs"])
    def test_no_nan(self, case):
        rng = np.random.default_rng(0)
        n, k, c = 40, 3, 4
        probs = np.zeros((n, k, c), np.float32)
        probs[np.arange(n)[:, None], np.arange(k)[None], rng.integers(0, c, (n, k))] = 1.0
        labels = rng.integers(0, c, n)
        costs, budget = COSTS, 1.5
        if case == "nobody_right":
            labels = (probs.argmax(2)[:, 0] + 1) % c
            probs[:, 1:] = probs[:, :1]
        elif case == "one_label":
            labels = np.zeros(n, np.int64)
        elif case == "tiny":
            probs, labels = probs[:2], labels[:2]
        elif case == "one_exit":
            probs, costs, budget = probs[:, :1], COSTS[:1], 1.0
        elif case == "zero_costs":
            costs, budget = np.zeros(3), 1.0
        scorer = EENetScorer(epochs=5).fit(probs, labels, costs, budget, seed=0)
        for out in (scorer.scores(probs), scorer.assignment(probs),
                    scorer.exit_distribution()):
            assert np.all(np.isfinite(out))
        assert np.all(np.isfinite(scorer.diagnostics["train_loss"]))

    def test_float16_input(self, problem):
        probs, labels = problem
        scorer = EENetScorer(**FAST).fit(probs.astype(np.float16), labels, COSTS, 2.0)
        assert np.all(np.isfinite(scorer.scores(probs.astype(np.float16))))


class TestLearning:
    def test_scores_separate_right_from_wrong_at_exit0(self, problem):
        probs, labels = problem
        scorer = EENetScorer().fit(probs, labels, COSTS, 2.0, seed=0)
        test_probs, test_labels = make_problem(n=1000, seed=99)
        right = test_probs[:, 0].argmax(1) == test_labels
        assert 0.2 < right.mean() < 0.8
        assert _auc(scorer.scores(test_probs)[:, 0], right) > 0.8

    def test_low_budget_moves_mass_to_the_cheap_exit(self, problem):
        probs, labels = problem
        low = EENetScorer().fit(probs, labels, COSTS, 1.3, seed=0)
        high = EENetScorer().fit(probs, labels, COSTS, 2.7, seed=0)
        r_low, r_high = low.exit_distribution(), high.exit_distribution()
        assert r_low[0] > r_high[0] + 0.2
        # with unbounded assignment logits the expected cost lands near each budget
        assert r_low @ COSTS == pytest.approx(1.3, abs=0.15)
        assert r_high @ COSTS == pytest.approx(2.7, abs=0.15)

    def test_alternating_training_runs(self, problem):
        probs, labels = problem
        scorer = EENetScorer(alternate=True, **FAST).fit(probs, labels, COSTS, 2.0)
        assert np.all(np.isfinite(scorer.scores(probs)))
        assert scorer.diagnostics["steps"] > 0


class TestValidation:
    @pytest.mark.parametrize("kwargs, match", [
        ({"hidden": 0}, "hidden must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a positive"),
        ({"holdout": 1.0}, r"holdout must lie in \[0, 1\)"),
        ({"prob_features": "all"}, "unknown prob_features"),
        ({"batch_size": 0}, "batch_size"),
    ])
    def test_bad_hyperparameters(self, kwargs, match):
        with pytest.raises(EenetError, match=match):
            EENetScorer(**kwargs)

    def test_bad_fit_inputs(self, problem):
        probs, labels = problem
        with pytest.raises(EenetError, match="labels must have shape"):
            EENetScorer().fit(probs, labels[:-1], COSTS, 2.0)
        with pytest.raises(EenetError, match="labels must lie in"):
            EENetScorer().fit(probs, labels + 10, COSTS, 2.0)
        with pytest.raises(EenetError, match="costs has 2 values"):
            EENetScorer().fit(probs, labels, COSTS[:2], 2.0)
        with pytest.raises(EenetError, match="below the cheapest exit"):
            EENetScorer().fit(probs, labels, COSTS, 0.5)
        with pytest.raises(EenetError, match="probabilities"):
            EENetScorer().fit(np.log(probs + 1e-9), labels, COSTS, 2.0)

    def test_fit_eenet(self, problem):
        probs, labels = problem
        scorer = fit_eenet(probs, labels, COSTS, 2.0, **FAST)
        assert isinstance(scorer, EENetScorer) and scorer.hidden == FAST["hidden"]
        with pytest.raises(EenetError, match="unknown EENet hyperparameter 'width'"):
            fit_eenet(probs, labels, COSTS, 2.0, width=3)

    def test_top_m_features(self, problem):
        probs, labels = problem
        scorer = EENetScorer(prob_features="top", top_m=4, **FAST)
        scorer.fit(probs, labels, COSTS, 2.0)
        assert scorer.state()["prob_features_used"] == "top"
        assert scorer.scores(probs).shape == (probs.shape[0], 3)


class TestHoldout:
    @pytest.mark.parametrize("n_classes", [1, 3, 50, 400])
    def test_stratified_sizes(self, n_classes):
        labels = np.random.default_rng(0).integers(0, n_classes, size=500)
        train, held = _stratified_holdout(labels, 0.2, seed=4)
        assert held.size == 100 and train.size == 400
        assert np.intersect1d(train, held).size == 0
        counts = np.bincount(labels, minlength=n_classes)
        held_counts = np.bincount(labels[held], minlength=n_classes)
        assert np.all(np.abs(held_counts - 0.2 * counts) <= 1.0)
        again = _stratified_holdout(labels, 0.2, seed=4)[1]
        np.testing.assert_array_equal(held, again)

    def test_degenerate(self):
        assert _stratified_holdout(np.zeros(2, np.int64), 0.2, 0)[1].size == 0
        assert _stratified_holdout(np.arange(10), 0.0, 0)[1].size == 0


class TestTargetsAndFeatures:
    def test_no_regret_lets_hopeless_samples_leave_early(self):
        """A quarter of the labels are flipped, so every exit gets those samples wrong.
        The paper's target scores them unready at exit 0, the no-regret target ready
        (going on gains nothing); samples a later exit rescues stay unready under both."""
        probs, labels = make_problem(n=3000, seed=5)
        rng = np.random.default_rng(5)
        flip = rng.random(labels.size) < 0.25
        labels = np.where(flip, (labels + rng.integers(1, 10, labels.size)) % 10, labels)
        ok = probs.argmax(2) == labels[:, None]
        hopeless = ~ok.any(axis=1)
        helped = ~ok[:, 0] & ok[:, 1:].any(axis=1)
        assert hopeless.sum() > 500 and helped.sum() > 100
        q = {kind: EENetScorer(target=kind, **FAST).fit(probs, labels, COSTS, 2.0, seed=0)
             .scores(probs)[:, 0] for kind in ("correct", "no_regret")}
        assert q["no_regret"][hopeless].mean() > q["correct"][hopeless].mean() + 0.1
        assert q["no_regret"][helped].mean() < q["no_regret"][hopeless].mean() - 0.1

    def test_paper_recipe_reachable_and_feature_width(self, problem):
        probs, labels = problem
        paper = EENetScorer(target="correct", features="paper", **FAST)
        paper.fit(probs, labels, COSTS, 2.0)
        ours = EENetScorer(**FAST).fit(probs, labels, COSTS, 2.0)
        assert (ours.target, ours.features) == ("no_regret", "agreement")
        assert ours._in_dim() == paper._in_dim() + 4
        assert paper._net.in_w.shape[1] == 10 + 3
        with pytest.raises(EenetError, match="unknown target"):
            EENetScorer(target="right")
        with pytest.raises(EenetError, match="unknown features"):
            EENetScorer(features="all")

    def test_version_1_state_loads_with_the_paper_settings(self, problem, tmp_path):
        probs, labels = problem
        scorer = EENetScorer(target="correct", features="paper", **FAST)
        scorer.fit(probs, labels, COSTS, 2.0)
        old = scorer.state()
        old["state_version"] = 1
        for key in ("target", "features"):
            del old["hparams"][key]
        path = tmp_path / "v1.pt"
        torch.save(old, path)
        loaded = EENetScorer.from_state(torch.load(path, weights_only=True))
        assert (loaded.target, loaded.features) == ("correct", "paper")
        np.testing.assert_array_equal(loaded.scores(probs), scorer.scores(probs))
