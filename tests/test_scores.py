"""The scorer protocol (exit k from exits 0..k), score_cache, the fixed scorers and THE
method table."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import eenet.scores as scores_mod
from eenet._validation import EenetError
from eenet.rules import CALIBRATIONS
from eenet.scores import (METHODS, Method, Scorer, get_method, score_cache,
                          scorer_from_state)
from eenet.scores.confidence import (ConstantScorer, EntropyScorer, MaxProbScorer,
                                     PatienceScorer)
from eenet.scores.eenet import EENetScorer
from eenet.scores.features import select_rows
from eenet.synthetic import synthetic_cache

N_EXITS = 4
FAST = {"epochs": 4, "hidden": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny batches: with several threads on a busy 2-core machine each call
    can wait ~15 ms on its thread pool, for no difference in the numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return synthetic_cache(300, n_exits=N_EXITS, n_classes=6, seed=3)


@pytest.fixture(scope="module")
def scorers(cache):
    """One fitted scorer of every kind (and every EENet feature layout)."""
    fit = dict(costs=cache.costs, budget=3.0, seed=0)
    return {
        "maxprob": MaxProbScorer(),
        "entropy": EntropyScorer(),
        "patience": PatienceScorer().fit(cache, **fit),
        "constant": ConstantScorer(),
        "eenet": EENetScorer(**FAST).fit(cache, **fit),
        "eenet-paper": EENetScorer(target="correct", features="paper", **FAST).fit(cache, **fit),
        "eenet-top-deep": EENetScorer(prob_features="top", top_m=3, depth=2, **FAST).fit(
            cache, **fit),
        "eenet-linear": EENetScorer(depth=0, **FAST).fit(cache, **fit),
    }


ALL = ["maxprob", "entropy", "patience", "constant", "eenet", "eenet-paper", "eenet-top-deep",
       "eenet-linear"]


def _exit_by_exit(scorer, logits: np.ndarray, order: np.ndarray, batch: int) -> np.ndarray:
    """Scores through start()/score_exit(), ``batch`` samples at a time in ``order``."""
    n, k_exits, c = logits.shape
    out = np.full((n, k_exits), np.nan)
    with torch.no_grad():
        for begin in range(0, n, batch):
            rows = order[begin:begin + batch]
            block = torch.from_numpy(np.ascontiguousarray(logits[rows]))
            state = scorer.start(rows.size, c, "cpu")
            for k in range(k_exits):
                s = scorer.score_exit(k, block[:, k], state)
                assert s.shape == (rows.size,)
                out[rows, k] = s.double().numpy()
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class TestScoreCache:
    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("batch", [1, 7, 64])
    def test_equals_exit_by_exit_in_any_order(self, scorers, cache, name, batch):
        scorer = scorers[name]
        whole = score_cache(scorer, cache)
        assert whole.shape == (cache.n_samples, N_EXITS) and whole.dtype == np.float64
        order = np.random.default_rng(batch).permutation(cache.n_samples)
        got = _exit_by_exit(scorer, cache.logits, order, batch)
        # float32 arithmetic on batches of another size may round differently
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)

    @pytest.mark.parametrize("name", ALL)
    def test_blocks_of_the_cache_give_the_same_scores(self, scorers, cache, name, monkeypatch):
        whole = score_cache(scorers[name], cache)
        # 4 bytes x 4 exits x 6 classes x 5 rows per block: 60 blocks of 5 samples
        monkeypatch.setattr(scores_mod, "_SCORE_ROWS_BYTES", 4 * N_EXITS * 6 * 5)
        np.testing.assert_allclose(score_cache(scorers[name], cache), whole, rtol=0, atol=1e-5)

    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("k", range(N_EXITS - 1))
    def test_exit_k_depends_on_exits_up_to_k_only(self, scorers, cache, name, k):
        """What a runtime relies on: scores of exits 0..k do not move when the outputs
        of exits k+1.. change."""
        scorer = scorers[name]
        before = score_cache(scorer, cache)
        logits = cache.logits.copy()
        rng = np.random.default_rng(k)
        logits[:, k + 1:] = rng.normal(0, 5, logits[:, k + 1:].shape).astype(np.float32)
        after = score_cache(scorer, dataclasses.replace(cache, logits=logits))
        np.testing.assert_array_equal(after[:, :k + 1], before[:, :k + 1])
        if name not in ("constant",) and k == N_EXITS - 2:
            # the change is real: the last exit's scores move
            assert not np.array_equal(after[:, -1], before[:, -1])


    @pytest.mark.parametrize("name", ALL)
    def test_samples_can_leave_between_exits(self, scorers, cache, name):
        """A runtime keeps only the samples still running (select_rows on the state, in
        any order); their later scores must not change."""
        scorer = scorers[name]
        whole = score_cache(scorer, cache)
        logits = torch.from_numpy(cache.logits)
        rng = np.random.default_rng(5)
        rows = torch.arange(cache.n_samples)
        with torch.no_grad():
            state = scorer.start(rows.numel(), cache.n_classes, "cpu")
            for k in range(N_EXITS):
                got = scorer.score_exit(k, logits[rows, k], state)
                np.testing.assert_allclose(got.double().numpy(), whole[rows.numpy(), k],
                                           rtol=0, atol=1e-5)
                keep = torch.from_numpy(rng.permutation(rows.numel())[:rows.numel() * 2 // 3])
                state, rows = select_rows(state, keep), rows[keep]


class TestFixedScorers:
    def test_maxprob_is_the_largest_probability(self, cache, scorers):
        np.testing.assert_allclose(score_cache(scorers["maxprob"], cache),
                                   _softmax(cache.logits).max(axis=2), rtol=0, atol=1e-6)

    def test_entropy_against_loop(self, cache, scorers):
        p = _softmax(cache.logits)
        n, k, c = p.shape
        ref = np.empty((n, k))
        for i in range(n):
            for j in range(k):
                ref[i, j] = 1 + sum(x * math.log(x) for x in p[i, j] if x > 0) / math.log(c)
        np.testing.assert_allclose(score_cache(scorers["entropy"], cache), ref, rtol=0,
                                   atol=1e-5)

    def test_patience_is_the_run_length_over_n_exits(self, cache, scorers):
        pred = cache.logits.argmax(axis=2)
        ref = np.ones(pred.shape)
        for i in range(pred.shape[0]):
            for j in range(1, pred.shape[1]):
                ref[i, j] = ref[i, j - 1] + 1 if pred[i, j] == pred[i, j - 1] else 1
        np.testing.assert_allclose(score_cache(scorers["patience"], cache), ref / N_EXITS,
                                   rtol=0, atol=1e-7)

    def test_patience_hand_case(self):
        # answers 0 0 1 1 1: runs 1 2 1 2 3
        logits = np.full((1, 5, 2), 0.0, np.float32)
        for j, cls in enumerate([0, 0, 1, 1, 1]):
            logits[0, j, cls] = 1.0
        c = synthetic_cache(5, n_exits=5, n_classes=2)
        c = dataclasses.replace(c, logits=np.repeat(logits, 5, axis=0))
        got = score_cache(PatienceScorer().fit(c, c.costs, 3.0), c)
        np.testing.assert_allclose(got[0], np.array([1, 2, 1, 2, 3]) / 5, rtol=0, atol=1e-7)

    def test_patience_needs_the_exit_count(self, cache):
        with pytest.raises(EenetError, match=r"PatienceScorer needs fit\(\)"):
            score_cache(PatienceScorer(), cache)
        np.testing.assert_allclose(score_cache(PatienceScorer(N_EXITS), cache).max(), 1.0)

    def test_constant_is_zero(self, cache, scorers):
        np.testing.assert_array_equal(score_cache(scorers["constant"], cache), 0.0)

    @pytest.mark.parametrize("cls", [MaxProbScorer, EntropyScorer, PatienceScorer,
                                     ConstantScorer])
    def test_fit_returns_self_and_learns_no_distribution(self, cls, cache):
        scorer = cls()
        assert scorer.fit(cache, cache.costs, 3.0, seed=5) is scorer
        assert scorer.exit_distribution() is None


class TestProtocolAndState:
    @pytest.mark.parametrize("name", ALL)
    def test_every_scorer_follows_the_protocol(self, scorers, name):
        assert isinstance(scorers[name], Scorer)

    @pytest.mark.parametrize("name", ALL)
    def test_state_round_trip_through_a_weights_only_file(self, scorers, cache, name, tmp_path):
        scorer = scorers[name]
        torch.save(scorer.to_state(), tmp_path / "s.pt")
        back = scorer_from_state(torch.load(tmp_path / "s.pt", weights_only=True))
        assert type(back) is type(scorer)
        np.testing.assert_array_equal(score_cache(back, cache), score_cache(scorer, cache))

    def test_from_state_refuses_another_scorers_state(self):
        with pytest.raises(EenetError, match="scorer state is for 'entropy', not 'maxprob'"):
            MaxProbScorer.from_state(EntropyScorer().to_state())
        with pytest.raises(EenetError, match="not an EENet state"):
            EENetScorer.from_state(MaxProbScorer().to_state())

    @pytest.mark.parametrize("state", [{"scorer": "nope"}, {}, None, ["maxprob"]])
    def test_scorer_from_state_refuses_unknown(self, state):
        with pytest.raises(EenetError, match="names no known scorer"):
            scorer_from_state(state)


class TestMethodTable:
    def test_names(self):
        assert set(METHODS) == {"eenet", "eenet-paper", "maxprob", "entropy", "patience",
                                "static", "oracle"}
        for name, method in METHODS.items():
            assert isinstance(method, Method) and method.name == name

    @pytest.mark.parametrize("alias, name", [
        ("msdnet", "maxprob"), ("MSDNet", "maxprob"), (" branchynet ", "entropy"),
        ("BranchyNet", "entropy"), ("pabee", "patience"), ("PaBeE", "patience"),
        ("EENET", "eenet"), ("EENet-Paper", "eenet-paper"), ("Oracle", "oracle"),
        ("STATIC", "static"),
    ])
    def test_aliases_in_any_case(self, alias, name):
        assert get_method(alias) is METHODS[name]

    def test_unknown_name_lists_every_name_and_alias(self):
        with pytest.raises(EenetError, match="unknown method 'magic'") as err:
            get_method("magic")
        for name in ("eenet", "eenet-paper", "maxprob", "entropy", "patience", "static",
                     "oracle", "msdnet", "branchynet", "pabee"):
            assert name in str(err.value)

    def test_calibrations_are_known_and_defaults_first(self):
        for method in METHODS.values():
            assert set(method.calibrations) <= set(CALIBRATIONS)
            assert method.default_calibration == (method.calibrations[0]
                                                  if method.calibrations else None)
        # the published recipes select with their published rules first (ties go to them)
        assert METHODS["eenet-paper"].select_from[0] == "assignment"
        assert METHODS["patience"].select_from[0] == "patience"
        for method in METHODS.values():
            if "select" in method.calibrations:
                assert set(method.select_from) <= set(method.calibrations) - {"select"}
        assert METHODS["static"].calibrations == ("static",)

    @pytest.mark.parametrize("name, cls", [("maxprob", MaxProbScorer),
                                           ("entropy", EntropyScorer),
                                           ("patience", PatienceScorer),
                                           ("static", ConstantScorer), ("eenet", EENetScorer),
                                           ("eenet-paper", EENetScorer)])
    def test_factories(self, name, cls):
        scorer = METHODS[name].scorer()
        assert type(scorer) is cls and scorer.name == cls.name

    def test_oracle_is_not_deployable(self):
        oracle = get_method("oracle")
        assert not oracle.deployable and oracle.make_scorer is None
        with pytest.raises(EenetError, match="upper bound and not a deployable policy"):
            oracle.scorer()
        assert all(m.deployable for n, m in METHODS.items() if n != "oracle")

    def test_only_learned_methods_take_hyperparameters(self):
        with pytest.raises(EenetError, match=r"maxprob takes no hyperparameters, got \['epochs'\]"):
            get_method("maxprob").scorer(epochs=3)
        assert get_method("eenet").scorer(epochs=3).config.epochs == 3

    def test_paper_preset_wins_over_hyperparameters(self):
        scorer = get_method("eenet-paper").scorer(epochs=3, target="no_regret",
                                                  features="agreement", alternate=False)
        cfg = scorer.config
        assert (cfg.epochs, cfg.target, cfg.features, cfg.alternate) == (3, "correct", "paper",
                                                                         True)
