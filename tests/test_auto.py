"""``--method auto``: the candidate most accurate out of fold, each paying its own cost."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from eenet import ExitCache, ExitPolicy, write_cache
from eenet._validation import EenetError
from eenet.auto import fit_auto, stratified_folds
from eenet.cli import main
from eenet.synthetic import synthetic_cache

FAST = {"epochs": 30, "hidden": 16}


def class_coded(n: int, seed: int) -> ExitCache:
    """3 exits x 10 classes where exit 0 is right exactly when it predicts a class below 5,
    with the same confidence either way: its probability vector tells right from wrong, its
    maximum does not. Exits 1 and 2 are right. At budget 1.5 (costs 1, 2, 3) half the samples
    can leave at exit 0: the right half for a score that reads the vector (accuracy ~1),
    a random half for max-probability (~0.75)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(0, 0.3, (n, 3, 10)).astype(np.float32)
    exit0 = np.where(labels < 5, labels, 5 + rng.integers(0, 5, n))
    exit0 = np.where((labels >= 5) & (exit0 == labels), 5 + (labels - 4) % 5, exit0)
    rows = np.arange(n)
    logits[rows, 0, exit0] += 3.0
    logits[rows, 1, labels] += 3.0
    logits[rows, 2, labels] += 4.0
    return ExitCache(logits, labels, np.array([1.0, 2.0, 3.0]), cost_unit="ms")


class TestChoice:
    def test_learned_scores_win_where_the_vector_tells(self):
        val, test = class_coded(4000, 0), class_coded(20_000, 1)
        policy = fit_auto(val, 1.5, methods=("maxprob", "entropy", "eenet"), seed=0, **FAST)
        record = policy.provenance["auto"]
        assert policy.method.name == "eenet" and record["chosen"] == "eenet"
        by_method = {c["method"]: c for c in record["candidates"]}
        assert set(by_method) == {"maxprob", "entropy", "eenet"}
        assert by_method["eenet"]["accuracy"] > by_method["maxprob"]["accuracy"] + 0.1
        maxprob = ExitPolicy("maxprob").fit(val, 1.5).evaluate(test).accuracy
        assert policy.evaluate(test).accuracy > maxprob + 0.1

    def test_a_costly_decision_loses_to_a_cheap_one(self):
        """Same informative confidences, but EENet's own cost is a whole exit's."""
        val = synthetic_cache(4000, seed=2)

        def own_cost(policy: ExitPolicy, cache: ExitCache) -> np.ndarray:
            per_exit = 1.0 if policy.method.learned else 0.01
            return per_exit * np.arange(1, cache.n_exits + 1)

        policy = fit_auto(val, 3.0, methods=("maxprob", "eenet"), overhead=own_cost, **FAST)
        record = policy.provenance["auto"]
        assert policy.method.name == "maxprob"
        np.testing.assert_allclose(policy.overhead, 0.01 * np.arange(1, 5))
        by_method = {c["method"]: c for c in record["candidates"]}
        assert by_method["maxprob"]["accuracy"] > by_method["eenet"]["accuracy"]
        assert by_method["eenet"]["overhead"] == pytest.approx(4.0)
        assert by_method["maxprob"]["cost"] <= 3.0 * 1.02  # out of fold, own cost charged

    def test_a_tie_goes_to_the_cheaper_decision(self):
        """With two classes the entropy is a monotone function of the max probability, so
        both give the same exits: a tie, and max-probability is the cheaper decision."""
        val = synthetic_cache(2000, n_classes=2, seed=3)
        policy = fit_auto(val, 4.0, methods=("entropy", "maxprob"))
        by_method = {c["method"]: c for c in policy.provenance["auto"]["candidates"]}
        assert by_method["entropy"]["accuracy"] == by_method["maxprob"]["accuracy"]
        assert policy.method.name == "maxprob"

    def test_a_candidate_that_cannot_serve_the_budget_is_out(self):
        val = synthetic_cache(2000, seed=4)

        def own_cost(policy: ExitPolicy, cache: ExitCache) -> np.ndarray:
            return np.full(cache.n_exits, 2.0 if policy.method.name == "entropy" else 0.0)

        policy = fit_auto(val, 2.0, methods=("entropy", "maxprob"), overhead=own_cost)
        by_method = {c["method"]: c for c in policy.provenance["auto"]["candidates"]}
        assert policy.method.name == "maxprob"
        assert by_method["entropy"]["status"].startswith("out: budget 2")
        assert "entropy cannot serve the budget" in policy.describe()

    def test_nothing_can_serve(self):
        with pytest.raises(EenetError, match="no candidate can serve budget 2"):
            fit_auto(synthetic_cache(500, seed=5), 2.0, methods=("maxprob",),
                     overhead=lambda policy, cache: np.full(cache.n_exits, 5.0))

    def test_oracle_is_not_a_candidate(self):
        with pytest.raises(EenetError, match="'oracle' is not a deployable policy"):
            fit_auto(synthetic_cache(500, seed=5), 4.0, methods=("maxprob", "oracle"))


class TestFolds:
    @pytest.mark.parametrize("folds", [2, 3, 5])
    def test_partition_and_strata(self, folds):
        labels = np.random.default_rng(0).integers(0, 7, 1001)
        parts = stratified_folds(labels, folds, seed=1)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1001))
        for cls in range(7):
            counts = [(labels[p] == cls).sum() for p in parts]
            assert max(counts) - min(counts) <= 1

    def test_bad_fold_count(self):
        with pytest.raises(EenetError, match="folds must be between 2 and the sample count 3"):
            stratified_folds(np.zeros(3), 4, seed=0)


class TestCommandLine:
    @pytest.fixture
    def val_path(self, tmp_path):
        path = tmp_path / "val.h5"
        write_cache(path, synthetic_cache(1500, seed=6, split="val"))
        return path

    def test_fit_auto_names_the_winner_and_the_runners_up(self, val_path, tmp_path):
        out = tmp_path / "auto.pt"
        result = CliRunner().invoke(main, ["-q", "fit", str(val_path), "--method", "auto",
                                           "--budget", "4", "--epochs", "20",
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output
        policy = ExitPolicy.load(out)
        record = policy.provenance["auto"]
        assert record["chosen"] == policy.method.name
        assert {c["method"] for c in record["candidates"]} == {"static", "maxprob", "entropy",
                                                               "patience", "eenet"}
        assert f"auto chose {policy.method.name}" in result.output
        for name in ("static", "maxprob", "entropy", "patience", "eenet"):
            assert name in result.output.split("auto chose", 1)[1]

    @pytest.mark.parametrize("flags", [["--confidence", "0.9"],
                                       ["--risk", "consistency", "--epsilon", "0.05"]])
    def test_certification_is_refused(self, val_path, tmp_path, flags):
        out = tmp_path / "auto.pt"
        result = CliRunner().invoke(main, ["fit", str(val_path), "--method", "auto",
                                           "--budget", "4", "--out", str(out), *flags])
        assert result.exit_code == 2 and not out.exists()
        assert "--method auto compares accuracies out of fold and cannot certify" \
            in result.output
        assert "Traceback" not in result.output

    def test_calibration_is_refused(self, val_path, tmp_path):
        result = CliRunner().invoke(main, ["fit", str(val_path), "--method", "auto",
                                           "--budget", "4", "--calibration", "search",
                                           "--out", str(tmp_path / "p.pt")])
        assert result.exit_code == 2
        assert "uses each candidate's default calibration" in result.output


class TestSweep:
    def test_auto_rows(self):
        from eenet.sweep import run_sweep

        val, test = synthetic_cache(2000, seed=7), synthetic_cache(2000, seed=8)
        table = run_sweep(val, test, budgets=[3.0, 5.0], methods=["auto", "maxprob"],
                          hparams=FAST, jobs=1, verbose=False)
        auto = table[table["method"] == "auto"]
        assert len(auto) == 2 and np.all(np.isfinite(auto["accuracy"]))
        assert np.all(auto["avg_cost"] <= auto["budget"] * 1.02)

    def test_auto_has_no_calibration_and_no_risk_sweep(self):
        from eenet.rules.certified import Guarantee
        from eenet.sweep import parse_method_spec, run_sweep

        with pytest.raises(EenetError, match="auto uses each candidate's default calibration"):
            parse_method_spec("auto:search")
        val = synthetic_cache(500, seed=9)
        with pytest.raises(EenetError, match="cannot certify a risk"):
            run_sweep(val, val, methods=["auto"], risk=Guarantee(risk="consistency", epsilon=0.05),
                      epsilons=[0.05], jobs=1, verbose=False)
