"""The EENet scorer: its heads, features, fitting, determinism, persistence and learning."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from eenet._validation import EenetError
from eenet.cache import ExitCache, stratified_split
from eenet.scores import score_cache
from eenet.scores.eenet import EENetScorer
from eenet.scores.eenet_heads import EENetHeads
from eenet.scores.eenet_losses import assignment_targets, loss_terms, score_targets
from eenet.synthetic import synthetic_cache

COSTS = np.array([1.0, 2.0, 3.0])
# pinned, so the tests do not move with the tuned defaults
FAST = {"epochs": 15, "hidden": 16, "batch_size": 512, "lr": 1e-2, "patience": 10,
        "holdout": 0.2}
# float32 heads: a matrix product per exit against the batched one
HEAD_TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_cache(n: int = 1200, seed: int = 0) -> ExitCache:
    """3 exits x 10 classes that get better with depth; one per-sample difficulty drives
    every exit, and the label's logit rises with the exit and falls with the difficulty,
    so a confident exit is usually right."""
    rng = np.random.default_rng(seed)
    k, c = 3, 10
    labels = rng.integers(0, c, size=n)
    difficulty = rng.normal(size=n)
    logits = rng.normal(size=(n, k, c))
    for j in range(k):
        margin = np.maximum(1.0 + 1.5 * j - 1.5 * difficulty + 0.3 * rng.normal(size=n), 0)
        logits[np.arange(n), j, labels] += 2.0 * margin
    return ExitCache(logits.astype(np.float32), labels, COSTS)


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC by brute force over all pairs."""
    pos, neg = score[positive], score[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size))


@pytest.fixture(scope="module")
def problem():
    return make_cache()


@pytest.fixture(scope="module")
def fitted(problem):
    return EENetScorer(**FAST).fit(problem, COSTS, budget=2.0, seed=3)


# ---------------------------------------------------------------------------
# the heads, and the folded scoring path that serves them
# ---------------------------------------------------------------------------
def _random_heads(n_exits: int, in_dim: int, hidden: int, depth: int, seed: int) -> EENetHeads:
    torch.manual_seed(seed)
    net = EENetHeads(n_exits, in_dim, hidden, depth)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.7)  # larger than the init so every layer matters
    return net


def _randomised(scorer: EENetScorer, seed: int) -> EENetScorer:
    """The scorer with every trained weight replaced by a random one (through its state),
    so the folded scoring path is checked on weights training did not shape."""
    gen = torch.Generator().manual_seed(seed)
    state = scorer.to_state()
    state["state_dict"] = {k: torch.randn(v.shape, generator=gen) * 0.5
                           for k, v in state["state_dict"].items()}
    return EENetScorer.from_state(state)


class TestHeads:
    @pytest.mark.parametrize("depth", [0, 1, 2])
    def test_heads_never_mix(self, depth):
        """Exit k reads its own features and the earlier exits' scores only; the
        assignment heads feed nothing forward."""
        n_exits, hidden = 4, 5
        net = _random_heads(n_exits, 3, hidden, depth, seed=depth)
        x = torch.randn(9, n_exits, 3)
        with torch.no_grad():
            q0, z0 = net(x)
            assert q0.shape == z0.shape == (9, n_exits)
            x2 = x.clone()
            x2[:, 2] += 1.0  # exit 2's features
            q1, z1 = net(x2)
            assert_close(q1[:, :2], q0[:, :2], rtol=0, atol=0)
            assert_close(z1[:, :2], z0[:, :2], rtol=0, atol=0)
            assert not torch.equal(q1[:, 2], q0[:, 2])
            # the assignment head's first-layer columns of exit 1 move no score
            cols = slice(hidden, 2 * hidden) if depth > 0 else slice(1, 2)
            net.in_w[1, :, cols] += 1.0
            q2, z2 = net(x)
            assert_close(q2, q0, rtol=0, atol=0)
            assert_close(z2[:, [0, 2, 3]], z0[:, [0, 2, 3]], rtol=0, atol=0)
            assert not torch.equal(z2[:, 1], z0[:, 1])

    @pytest.mark.parametrize("depth", [0, 1, 2])
    def test_forward_against_per_head_loops(self, depth):
        """The stacked weights are 2K independent MLPs: rebuild each one by hand."""
        n_exits, in_dim, hidden = 3, 4, 5
        net = _random_heads(n_exits, in_dim, hidden, depth, seed=7 + depth)
        x = torch.randn(6, n_exits, in_dim, dtype=torch.float32)
        with torch.no_grad():
            q_logit, z = net(x)
            for n in range(6):
                earlier = []
                for k in range(n_exits):
                    inp = torch.cat([x[n, k], torch.tensor(earlier)])
                    for kind, out in ((0, q_logit), (1, z)):
                        cols = (slice(kind * hidden, (kind + 1) * hidden) if depth > 0
                                else slice(kind, kind + 1))
                        w = torch.cat([net.in_w[k, :, cols], net.q_w[k, :k, cols]])
                        h = inp @ w + net.in_b[k, cols]
                        if depth > 0:
                            h = torch.relu(h)
                            for layer in range(depth - 1):
                                h = torch.relu(h @ net.hid_w[k, kind, layer]
                                               + net.hid_b[k, kind, layer])
                            h = h @ net.out_w[k, kind] + net.out_b[k, kind]
                        assert_close(out[n, k], h.reshape(()), **HEAD_TOL)
                    earlier.append(float(torch.sigmoid(q_logit[n, k])))

    def test_initialisation_bounds_like_nn_linear(self):
        net = EENetHeads(3, 7, 4, 2)
        for k in range(3):
            bound = 1 / math.sqrt(7 + k)
            assert net.in_w[k].abs().max() <= bound and net.in_b[k].abs().max() <= bound
        assert net.hid_w.abs().max() <= 1 / math.sqrt(4)
        assert net.q_w.shape == (3, 2, 8) and net.hid_w.shape == (3, 2, 1, 4, 4)


# ---------------------------------------------------------------------------
# features and scoring
# ---------------------------------------------------------------------------
def _loop_features(logits: np.ndarray, top_m: int | None, agreement: bool) -> np.ndarray:
    """Plain loops: [p (or its top_m), max p, 1 - H/log C, vote, (margin, previous exit's
    p of this answer, earlier exits' mean p of it, agreement with the previous exit)]."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    n, k_exits, c = p.shape
    rows = []
    for i in range(n):
        preds, per_exit = [], []
        for k in range(k_exits):
            row = list(p[i, k])
            y = max(range(c), key=lambda j: (row[j], -j))
            preds.append(y)
            srt = sorted(row, reverse=True)
            head = srt[:top_m] + [0.0] * max(0, top_m - c) if top_m else row
            ent = 1 + sum(v * math.log(v) for v in row if v > 0) / math.log(c)
            vote = max(preds.count(j) for j in range(c)) / (k + 1)
            feats = head + [srt[0], ent, vote]
            if agreement:
                if k == 0:
                    feats += [srt[0] - srt[1], row[y], row[y], 1.0]
                else:
                    feats += [srt[0] - srt[1], p[i, k - 1, y],
                              sum(p[i, j, y] for j in range(k)) / k, float(preds[k - 1] == y)]
            per_exit.append(feats)
        rows.append(per_exit)
    return np.array(rows)


class TestFeatures:
    @pytest.mark.parametrize("kwargs, top_m, agreement", [
        ({}, None, True),
        ({"features": "paper", "target": "correct"}, None, False),
        ({"prob_features": "top", "top_m": 4}, 4, True),
        ({"prob_features": "top", "top_m": 12}, 12, True),  # padded past the 10 classes
    ])
    def test_layout_against_loops(self, problem, kwargs, top_m, agreement):
        small = problem.subset(np.arange(40))
        scorer = EENetScorer(epochs=1, hidden=4, **kwargs).fit(small, COSTS, 2.0)
        width = (top_m or 10) + 3 + (4 if agreement else 0)
        assert scorer.in_dim == width
        got = scorer._cache_features(small).double().numpy()
        assert got.shape == (40, 3, width)
        np.testing.assert_allclose(got, _loop_features(small.logits, top_m, agreement),
                                   rtol=0, atol=2e-6)

    def test_auto_switches_to_top_probabilities_for_many_classes(self):
        many = synthetic_cache(60, n_exits=2, n_classes=200, seed=1)
        scorer = EENetScorer(epochs=1, hidden=4, top_m=5).fit(many, many.costs, 2.0)
        assert scorer.in_dim == 5 + 3 + 4
        assert scorer.diagnostics["prob_features"] == "top"
        few = EENetScorer(epochs=1, hidden=4).fit(make_cache(60), COSTS, 2.0)
        assert few.diagnostics["prob_features"] == "full" and few.in_dim == 10 + 7


def _forward_scores(scorer: EENetScorer, cache) -> np.ndarray:
    with torch.no_grad():
        return scorer._net(scorer._cache_features(cache))[0].double().numpy()


class TestScoring:
    def test_score_exit_equals_the_heads_forward(self, fitted, problem):
        np.testing.assert_allclose(score_cache(fitted, problem),
                                   _forward_scores(fitted, problem), **HEAD_TOL)

    @pytest.mark.parametrize("kwargs", [
        {"depth": 0}, {"depth": 1}, {"depth": 2}, {"depth": 3, "hidden": 5},
        {"features": "paper", "target": "correct"},
        {"features": "paper", "depth": 0},
        {"prob_features": "top", "top_m": 3},
        {"prob_features": "top", "top_m": 12, "depth": 2},
        {"prob_features": "top", "top_m": 1, "features": "paper"},
    ])
    def test_folded_scoring_equals_the_forward_for_any_weights(self, problem, kwargs):
        """score_exit folds the affine feature parts into the first layer; on random
        weights it must still equal the heads' forward on the features training saw."""
        small = problem.subset(np.arange(200))
        kw = dict(kwargs)
        scorer = EENetScorer(epochs=1, hidden=kw.pop("hidden", 6), **kw)
        scorer = _randomised(scorer.fit(small, COSTS, 2.0), seed=len(kw))
        np.testing.assert_allclose(score_cache(scorer, small), _forward_scores(scorer, small),
                                   **HEAD_TOL)

    def test_folded_scoring_on_five_exits_and_a_two_class_cache(self):
        cache = synthetic_cache(150, n_exits=5, n_classes=2, seed=4)
        scorer = _randomised(EENetScorer(epochs=1, hidden=4).fit(cache, cache.costs, 4.0), 1)
        np.testing.assert_allclose(score_cache(scorer, cache), _forward_scores(scorer, cache),
                                   **HEAD_TOL)

    def test_exit_distribution_is_the_mean_assignment(self, fitted, problem):
        rbar = fitted.exit_distribution()
        assert rbar.shape == (3,) and np.all(rbar >= 0)
        np.testing.assert_allclose(rbar.sum(), 1.0, rtol=0, atol=1e-12)
        with torch.no_grad():
            z = fitted._net(fitted._cache_features(problem))[1]
        np.testing.assert_allclose(rbar, torch.softmax(z.double(), 1).mean(0).numpy(),
                                   rtol=0, atol=1e-6)
        rbar[0] = 5.0  # a copy: the scorer keeps its own
        assert fitted.exit_distribution()[0] != 5.0

    def test_diagnostics(self, fitted, problem):
        d = fitted.diagnostics
        assert 1 <= d["epochs_run"] <= FAST["epochs"]
        assert 0 <= d["best_epoch"] < d["epochs_run"]
        assert len(d["train_loss"]) == len(d["holdout_loss"]) == d["epochs_run"]
        assert d["n_train"] + d["n_holdout"] == problem.n_samples
        assert d["n_holdout"] == round(0.2 * problem.n_samples)
        assert d["early_stopping_on"] == "holdout" and d["seed"] == 3 and d["budget"] == 2.0
        np.testing.assert_allclose(d["expected_cost"], fitted.exit_distribution() @ COSTS,
                                   rtol=1e-12)
        assert set(d["parts"]) == {"scoring", "assignment", "budget", "total"}
        np.testing.assert_allclose(d["parts"]["total"], d["best_loss"], rtol=1e-12)

    def test_before_fit(self, problem):
        scorer = EENetScorer()
        assert not scorer.is_fitted and scorer.exit_distribution() is None
        for call in (scorer.to_state, lambda: scorer.score_exit(0, torch.zeros(2, 10), {})):
            with pytest.raises(EenetError, match=r"needs a trained scorer; call fit\(\) first"):
                call()

    def test_start_before_fit_names_the_skipped_step(self, problem):
        with pytest.raises(EenetError, match=r"call fit\(\) first"):
            EENetScorer().start(2, 10)
        with pytest.raises(EenetError, match=r"call fit\(\) first"):
            score_cache(EENetScorer(), problem)

    def test_another_class_count_is_refused(self, fitted):
        with pytest.raises(EenetError, match="fitted on 10 classes, got 5"):
            fitted.start(3, 5)


class TestDeterminismAndState:
    def test_same_seed_identical_and_global_state_untouched(self, problem):
        threads = torch.get_num_threads()
        a = score_cache(EENetScorer(**FAST).fit(problem, COSTS, 2.0, seed=7), problem)
        torch.manual_seed(12345)  # global state must not matter
        b = score_cache(EENetScorer(**FAST).fit(problem, COSTS, 2.0, seed=7), problem)
        np.testing.assert_array_equal(a, b)
        c = score_cache(EENetScorer(**FAST).fit(problem, COSTS, 2.0, seed=8), problem)
        assert not np.array_equal(a, c)
        torch.manual_seed(12345)
        expected = torch.rand(3)
        torch.manual_seed(12345)
        EENetScorer(**FAST).fit(problem, COSTS, 2.0, seed=7)
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == threads
        subnormal = torch.tensor([1e-40])
        assert (subnormal * 1.0).item() > 0.0  # the fit flushes subnormals only inside it

    def test_state_round_trip(self, fitted, problem, tmp_path):
        torch.save(fitted.to_state(), tmp_path / "eenet.pt")
        loaded = EENetScorer.from_state(torch.load(tmp_path / "eenet.pt", weights_only=True))
        np.testing.assert_array_equal(score_cache(loaded, problem), score_cache(fitted, problem))
        np.testing.assert_array_equal(loaded.exit_distribution(), fitted.exit_distribution())
        assert loaded.config == fitted.config
        assert loaded.diagnostics["best_epoch"] == fitted.diagnostics["best_epoch"]

    def test_other_state_version_is_refused(self, fitted):
        state = fitted.to_state()
        state["state_version"] = 1
        with pytest.raises(EenetError, match="state version 1 is not 3; fit the policy again"):
            EENetScorer.from_state(state)

    def test_weights_that_do_not_fit_the_hyperparameters(self, fitted):
        state = fitted.to_state()
        state["hparams"] = {**state["hparams"], "hidden": 3}
        with pytest.raises(EenetError, match="do not fit the stored hyperparameters"):
            EENetScorer.from_state(state)

    def test_early_stopping_restores_a_copy_of_the_best(self, problem, monkeypatch):
        """The held-out curve is imposed (best at epoch 3, worse after), so the run must go past
        its best and stop after ``patience`` stale epochs on any CPU; the weights kept are a
        copy of those after the best epoch, not the last ones."""
        from eenet.scores import eenet_heads

        curve = [5.0, 4.0, 3.5, 3.0, 3.2, 3.4, 3.6, 3.8, 4.0]
        real_loss, real_epoch = eenet_heads._holdout_loss, eenet_heads._epoch
        snapshots: list[list[torch.Tensor]] = []

        def epoch(net, *args, **kwargs):
            out = real_epoch(net, *args, **kwargs)
            snapshots.append([p.detach().clone() for p in net.parameters()])
            return out

        def holdout(*args, **kwargs):
            parts = real_loss(*args, **kwargs)
            parts["total"] = curve[len(snapshots) - 1]
            return parts

        monkeypatch.setattr(eenet_heads, "_epoch", epoch)
        monkeypatch.setattr(eenet_heads, "_holdout_loss", holdout)
        scorer = EENetScorer(epochs=40, patience=3, tol=0.0, lr=0.1, hidden=16, batch_size=64,
                             holdout=0.2)
        scorer.fit(problem, COSTS, 2.0, seed=1)
        d = scorer.diagnostics
        assert d["holdout_loss"] == curve[:7]  # best at 3, then 3 stale epochs: stop after 6
        assert d["best_epoch"] == 3 and d["epochs_run"] == 7 and d["best_loss"] == 3.0
        kept = list(scorer._net.parameters())
        for now, best in zip(kept, snapshots[3]):
            torch.testing.assert_close(now, best, rtol=0, atol=0)
        assert any(not torch.equal(now, last) for now, last in zip(kept, snapshots[-1])), \
            "the weights kept should be the best epoch's, not the last epoch's"

    def test_early_stopping_keeps_the_weights_whose_loss_is_recorded(self, problem):
        """On a real run, the weights held at the end have the recorded best held-out loss."""
        scorer = EENetScorer(epochs=12, patience=12, tol=0.0, lr=0.1, hidden=16, batch_size=64,
                             holdout=0.2)
        scorer.fit(problem, COSTS, 2.0, seed=1)
        d = scorer.diagnostics
        curve = d["holdout_loss"]
        assert d["best_epoch"] == int(np.argmin(curve)) and d["best_loss"] == min(curve)
        _, hold = stratified_split(problem.labels, 0.2, 1)
        correct = torch.from_numpy(np.array(problem.correct()[hold]))
        with torch.no_grad():
            q_logit, z = scorer._net(scorer._cache_features(problem)[hold])
            terms = loss_terms(q_logit, z, score_targets(correct, "no_regret"),
                               assignment_targets(correct), torch.tensor(COSTS / 3.0).float(),
                               2.0 / 3.0)
        total = float(terms["scoring"] + terms["assignment"] + terms["budget"])
        assert total == pytest.approx(d["best_loss"], rel=1e-5)


class TestDegenerateInputs:
    @pytest.mark.parametrize("case", ["one_hot", "nobody_right", "one_label", "tiny",
                                      "zero_costs", "float16"])
    def test_no_nan(self, case):
        rng = np.random.default_rng(0)
        n, k, c = 40, 3, 4
        logits = np.zeros((n, k, c), np.float32)
        logits[np.arange(n)[:, None], np.arange(k)[None], rng.integers(0, c, (n, k))] = 60.0
        labels = rng.integers(0, c, n)
        costs, budget = COSTS, 1.5
        if case == "nobody_right":
            logits[:, 1:] = logits[:, :1]
            labels = (logits[:, 0].argmax(1) + 1) % c
        elif case == "one_label":
            labels = np.zeros(n, np.int64)
        elif case == "tiny":
            logits, labels = logits[:3], labels[:3]
        elif case == "zero_costs":
            costs, budget = np.zeros(3), 1.0
        elif case == "float16":
            logits = (logits / 10).astype(np.float16)
        cache = synthetic_cache(len(labels), n_exits=3, n_classes=c)
        cache = dataclasses.replace(cache, logits=logits, labels=labels, costs=costs)
        scorer = EENetScorer(epochs=5).fit(cache, costs, budget, seed=0)
        assert np.all(np.isfinite(score_cache(scorer, cache)))
        assert np.all(np.isfinite(scorer.exit_distribution()))
        assert np.all(np.isfinite(scorer.diagnostics["train_loss"]))


class TestLearning:
    def test_scores_separate_right_from_wrong_at_exit0(self, problem):
        scorer = EENetScorer().fit(problem, COSTS, 2.0, seed=0)
        fresh = make_cache(1000, seed=99)
        right = fresh.correct()[:, 0]
        assert 0.2 < right.mean() < 0.8
        assert _auc(score_cache(scorer, fresh)[:, 0], right) > 0.8

    def test_budget_moves_the_learned_distribution(self, problem):
        low = EENetScorer().fit(problem, COSTS, 1.3, seed=0).exit_distribution()
        high = EENetScorer().fit(problem, COSTS, 2.7, seed=0).exit_distribution()
        assert low[0] > high[0] + 0.2
        # unbounded assignment logits reach both ends of the cost range
        assert low @ COSTS == pytest.approx(1.3, abs=0.15)
        assert high @ COSTS == pytest.approx(2.7, abs=0.15)

    def test_no_regret_lets_hopeless_samples_leave_early(self):
        """A quarter of the labels are flipped, so every exit gets those samples wrong.
        The paper's target scores them unready at exit 0, the no-regret target ready
        (going on gains nothing); samples a later exit rescues stay unready under both."""
        cache = make_cache(3000, seed=5)
        rng = np.random.default_rng(5)
        flip = rng.random(cache.n_samples) < 0.25
        labels = np.where(flip, (cache.labels + rng.integers(1, 10, cache.n_samples)) % 10,
                          cache.labels)
        cache = dataclasses.replace(cache, labels=labels)
        ok = cache.correct()
        hopeless = ~ok.any(axis=1)
        helped = ~ok[:, 0] & ok[:, 1:].any(axis=1)
        assert hopeless.sum() > 500 and helped.sum() > 100
        q = {kind: score_cache(EENetScorer(target=kind, **FAST).fit(cache, COSTS, 2.0, seed=0),
                               cache)[:, 0] for kind in ("correct", "no_regret")}
        sig = {kind: 1 / (1 + np.exp(-v)) for kind, v in q.items()}
        assert sig["no_regret"][hopeless].mean() > sig["correct"][hopeless].mean() + 0.1
        assert sig["no_regret"][helped].mean() < sig["no_regret"][hopeless].mean() - 0.1

    def test_alternating_training_runs(self, problem):
        scorer = EENetScorer(alternate=True, **FAST).fit(problem, COSTS, 2.0)
        assert np.all(np.isfinite(score_cache(scorer, problem)))
        d = scorer.diagnostics
        # full batches of 512 over 960 training samples: 2 steps per epoch
        assert d["steps"] == 2 * d["epochs_run"]


class TestValidation:
    @pytest.mark.parametrize("kwargs, match", [
        ({"hidden": 0}, "hidden must be an integer >= 1"),
        ({"depth": -1}, "depth must be an integer >= 0"),
        ({"lr": -1.0}, r"lr must be a finite number in \(0"),
        ({"holdout": 1.0}, r"holdout must be a finite number in \[0, 1\)"),
        ({"prob_features": "all"}, "unknown prob_features 'all'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"target": "right"}, "unknown target 'right'; choose one of: correct, no_regret"),
        ({"features": "all"}, "unknown features 'all'; choose one of: agreement, paper"),
        ({"width": 3}, "unknown EENet hyperparameter 'width'; choose from: .*hidden"),
        ({"device": "gpu0"}, "device must be a torch device"),
    ])
    def test_bad_hyperparameters(self, kwargs, match):
        with pytest.raises(EenetError, match=match):
            EENetScorer(**kwargs)
