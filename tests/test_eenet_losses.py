"""Tests of eenet.scores.eenet_losses against plain-Python-loop references, and proof that
training calls the checked loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

import eenet.scores.eenet_heads as heads_mod
from eenet._validation import EenetError
from eenet.scores.eenet import EENetScorer
from eenet.scores.eenet_losses import (assignment_loss, assignment_targets, budget_loss,
                                       loss_terms, score_targets, scoring_loss,
                                       scoring_weights, total_loss)
from eenet.synthetic import synthetic_cache

# float64 throughout: the references are exact up to summation order
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _inputs(n: int = 6, k: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_logit = torch.randn(n, k, generator=gen, dtype=torch.float64) * 3
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) * 2
    correct = torch.rand(n, k, generator=gen) < 0.5
    correct[0] = False  # a sample no exit gets right
    correct[1] = True  # one every exit gets right
    costs = torch.tensor([1.0, 2.5, 4.0, 7.0][:k], dtype=torch.float64)
    return q_logit, z, correct, costs


# ---- references ----------------------------------------------------------------
def _ref_targets(correct):
    n, k = correct.shape
    out = [[0.0] * k for _ in range(n)]
    for i in range(n):
        hits = sum(bool(c) for c in correct[i])
        for j in range(k):
            out[i][j] = (1.0 / hits if correct[i][j] else 0.0) if hits else 1.0 / k
    return torch.tensor(out, dtype=torch.float64)


def _ref_weights(r):
    n, k = r.shape
    w = [[0.0] * k for _ in range(n)]
    for j in range(k):
        survive = [1.0 - sum(float(r[i, jj]) for jj in range(j)) for i in range(n)]
        total = sum(survive)
        for i in range(n):
            w[i][j] = survive[i] / total
    return torch.tensor(w, dtype=torch.float64)


def _ref_scoring(q_logit, q_star, r):
    n, k = q_logit.shape
    w = _ref_weights(r)
    loss = 0.0
    for j in range(k):
        for i in range(n):
            q = 1.0 / (1.0 + math.exp(-float(q_logit[i, j])))
            t = float(q_star[i, j])
            bce = -(t * math.log(q) + (1 - t) * math.log(1 - q))
            loss += float(w[i, j]) * bce
    return loss / k


class TestAssignmentTargets:
    def test_against_loop(self):
        _, _, correct, _ = _inputs(n=9, k=4, seed=3)
        assert_close(assignment_targets(correct).double(), _ref_targets(correct), **TOL)

    def test_none_correct_is_uniform_and_rows_sum_to_one(self):
        correct = torch.tensor([[False, False, False], [True, False, True], [False, True, False]])
        r_star = assignment_targets(correct)
        assert_close(r_star[0], torch.full((3,), 1 / 3))
        assert_close(r_star[1], torch.tensor([0.5, 0.0, 0.5]))
        assert_close(r_star.sum(1), torch.ones(3))
        assert torch.isfinite(r_star).all()

    def test_rejects_wrong_rank(self):
        with pytest.raises(EenetError, match="correct must have shape"):
            assignment_targets(torch.ones(3, dtype=torch.bool))


class TestAssignmentLoss:
    def test_against_loop(self):
        _, z, correct, _ = _inputs()
        log_r = torch.log_softmax(z, dim=1)
        r_star = _ref_targets(correct)
        n, k = z.shape
        ref = -sum(float(r_star[i, j]) * float(log_r[i, j])
                   for i in range(n) for j in range(k)) / (n * k)
        assert_close(assignment_loss(log_r, r_star), torch.tensor(ref, dtype=torch.float64),
                     **TOL)

    def test_zero_target_ignores_minus_infinity(self):
        log_r = torch.tensor([[0.0, -math.inf]], requires_grad=True)
        loss = assignment_loss(log_r, torch.tensor([[1.0, 0.0]]))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(log_r.grad).all()


class TestBudgetLoss:
    def test_against_loop(self):
        _, z, _, costs = _inputs()
        r = torch.softmax(z, 1)
        n, k = r.shape
        expected = sum(float(r[i, j]) * float(costs[j]) for i in range(n) for j in range(k)) / n
        for budget in (1.5, 3.0, 6.5):
            ref = abs(budget - expected) / budget
            assert_close(budget_loss(r, costs, budget), torch.tensor(ref, dtype=torch.float64),
                         **TOL)

    def test_zero_when_expected_cost_is_budget(self):
        costs = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        r = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
        budget = float((r * costs).sum(1).mean())
        assert_close(budget_loss(r, costs, budget), torch.tensor(0.0, dtype=torch.float64),
                     rtol=0, atol=1e-15)

    def test_rejects_non_positive_budget_and_bad_costs(self):
        r = torch.full((2, 3), 1 / 3)
        with pytest.raises(EenetError, match="budget must be positive"):
            budget_loss(r, torch.ones(3), 0.0)
        with pytest.raises(EenetError, match="costs must have shape"):
            budget_loss(r, torch.ones(2), 1.0)


class TestScoringLoss:
    def test_weights_against_loop_and_sum_to_one(self):
        _, z, _, _ = _inputs(n=8, k=4, seed=5)
        r = torch.softmax(z, 1)
        w = scoring_weights(r)
        assert_close(w, _ref_weights(r), **TOL)
        assert_close(w.sum(0), torch.ones(4, dtype=torch.float64), **TOL)

    def test_weights_when_nobody_survives(self):
        r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        w = scoring_weights(r)
        assert torch.isfinite(w).all()
        assert_close(w.sum(0), torch.ones(3))
        assert_close(w[:, 1:], torch.full((2, 2), 0.5))

    def test_against_loop(self):
        q_logit, z, correct, _ = _inputs(n=7, k=3, seed=2)
        r = torch.softmax(z, 1)
        q_star = correct.double()
        got = scoring_loss(q_logit, q_star, r)
        assert_close(got, torch.tensor(_ref_scoring(q_logit, q_star, r), dtype=torch.float64),
                     rtol=1e-9, atol=1e-12)

    def test_weights_detached_by_default(self):
        q_logit, z, correct, _ = _inputs()
        z = z.clone().requires_grad_(True)
        loss = scoring_loss(q_logit, correct.double(), torch.softmax(z, 1))
        assert not loss.requires_grad  # only the (constant) logits and no path to z
        z2 = z.detach().clone().requires_grad_(True)
        loss = scoring_loss(q_logit, correct.double(), torch.softmax(z2, 1),
                            detach_weights=False)
        loss.backward()
        assert z2.grad is not None and z2.grad.abs().sum() > 0


class TestTotalLoss:
    def test_is_weighted_sum_of_parts(self):
        q_logit, z, correct, costs = _inputs()
        total, parts = total_loss(q_logit, z, correct, costs, 3.0, alpha_ce=0.7,
                                  alpha_budget=2.0)
        r = torch.softmax(z, 1)
        assert_close(parts["scoring"], scoring_loss(q_logit, correct.double(), r), **TOL)
        assert_close(parts["assignment"],
                     assignment_loss(torch.log_softmax(z, 1), _ref_targets(correct)), **TOL)
        assert_close(parts["budget"], budget_loss(r, costs, 3.0), **TOL)
        assert_close(total, parts["scoring"] + 0.7 * parts["assignment"]
                     + 2.0 * parts["budget"], **TOL)
        assert_close(parts["total"], total.detach())

    @pytest.mark.parametrize("scale", [0.0, 1e2, 1e4, 1e30])
    def test_gradients_finite_for_extreme_inputs(self, scale):
        n, k = 5, 3
        q_logit = (torch.tensor([[1.0, -1.0, 1.0]] * n) * scale).requires_grad_(True)
        z = (torch.tensor([[1.0, -1.0, 0.0]] * n) * scale).requires_grad_(True)
        correct = torch.zeros(n, k, dtype=torch.bool)
        correct[0, 1] = True  # the others: no exit is right
        costs = torch.tensor([0.0, 0.5, 1.0])
        total, parts = total_loss(q_logit, z, correct, costs, 0.3, detach_weights=False)
        total.backward()
        assert torch.isfinite(total)
        assert torch.isfinite(q_logit.grad).all() and torch.isfinite(z.grad).all()

    def test_shape_mismatch(self):
        q_logit, z, correct, costs = _inputs()
        with pytest.raises(EenetError, match="z has shape"):
            total_loss(q_logit, z[:, :2], correct, costs, 1.0)


class TestScoreTargets:
    @staticmethod
    def _ref(correct, kind):
        n, k = correct.shape
        out = [[0.0] * k for _ in range(n)]
        for i in range(n):
            ok = [bool(c) for c in correct[i]]
            for j in range(k):
                if j == k - 1 or kind == "correct":
                    out[i][j] = float(ok[j])
                elif kind == "no_regret":
                    out[i][j] = float(ok[j] or not any(ok[j + 1:]))
                else:
                    out[i][j] = float(ok[j] or not ok[-1])
        return torch.tensor(out)

    @pytest.mark.parametrize("kind", ["correct", "no_regret", "no_regret_last"])
    def test_against_loop(self, kind):
        gen = torch.Generator().manual_seed(1)
        correct = torch.rand(40, 5, generator=gen) < 0.5
        assert_close(score_targets(correct, kind), self._ref(correct, kind))

    def test_hopeless_sample_is_ready_everywhere_but_the_last(self):
        ok = torch.tensor([[False, False, False], [False, True, False], [True, False, True]])
        assert score_targets(ok, "no_regret").tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
        assert score_targets(ok, "no_regret_last").tolist() == [[1, 1, 0], [1, 1, 0],
                                                                [1, 0, 1]]

    def test_single_exit_and_unknown_kind(self):
        ok = torch.tensor([[True], [False]])
        assert score_targets(ok, "no_regret").tolist() == [[1.0], [0.0]]
        with pytest.raises(EenetError, match="unknown score target"):
            score_targets(ok, "bogus")


# ---- loss_terms: what training minimises -----------------------------------------
def _ref_loss_terms(q_logit, z, q_star, r_star, costs, budget, detach_weights):
    """The three terms with scalar torch ops in plain loops, so autograd gives the
    reference gradients too."""
    n, k = q_logit.shape
    r = []
    for i in range(n):
        exps = [torch.exp(z[i, j]) for j in range(k)]
        total = sum(exps)
        r.append([e / total for e in exps])
    # scoring: survival-weighted BCE
    scoring = 0.0
    for j in range(k):
        survive = []
        for i in range(n):
            rr = [x.detach() if detach_weights else x for x in r[i]]
            survive.append(1.0 - sum(rr[:j]) if j else torch.tensor(1.0, dtype=z.dtype))
        norm = sum(survive)
        for i in range(n):
            q = torch.sigmoid(q_logit[i, j])
            t = float(q_star[i, j])
            bce = -(t * torch.log(q) + (1 - t) * torch.log(1 - q))
            scoring = scoring + survive[i] / norm * bce
    scoring = scoring / k
    # assignment: cross-entropy against r*
    assign = 0.0
    for i in range(n):
        for j in range(k):
            if float(r_star[i, j]) > 0:
                assign = assign - float(r_star[i, j]) * torch.log(r[i][j])
    assign = assign / (n * k)
    # budget: relative gap of the expected cost
    expected = sum(r[i][j] * float(costs[j]) for i in range(n) for j in range(k)) / n
    budget_term = torch.abs(budget - expected) / budget
    return {"scoring": scoring, "assignment": assign, "budget": budget_term}


class TestLossTerms:
    @pytest.mark.parametrize("detach", [True, False])
    @pytest.mark.parametrize("target", ["correct", "no_regret"])
    @pytest.mark.parametrize("budget", [1.5, 3.0, 6.5])
    def test_values_and_gradients_against_loops(self, detach, target, budget):
        q0, z0, correct, costs = _inputs(n=6, k=4, seed=11)
        q_star = score_targets(correct, target, dtype=torch.float64)
        r_star = assignment_targets(correct, dtype=torch.float64)
        alpha_ce, alpha_budget = 0.7, 2.0
        grads = []
        for fn in (loss_terms, _ref_loss_terms):
            q_logit = q0.clone().requires_grad_(True)
            z = z0.clone().requires_grad_(True)
            if fn is loss_terms:
                terms = fn(q_logit, z, q_star, r_star, costs, budget, detach_weights=detach)
            else:
                terms = fn(q_logit, z, q_star, r_star, costs, budget, detach)
            total = terms["scoring"] + alpha_ce * terms["assignment"] \
                + alpha_budget * terms["budget"]
            total.backward()
            grads.append((terms, q_logit.grad, z.grad))
        (got, gq, gz), (ref, rq, rz) = grads
        assert set(got) == {"scoring", "assignment", "budget"}
        for key in ref:
            assert_close(got[key].detach(), ref[key].detach(), rtol=1e-10, atol=1e-12)
        assert_close(gq, rq, rtol=1e-9, atol=1e-12)
        assert_close(gz, rz, rtol=1e-9, atol=1e-12)

    def test_detached_weights_keep_the_scoring_term_off_the_assignment(self):
        q0, z0, correct, costs = _inputs(n=6, k=3, seed=4)
        q_star, r_star = correct.double(), assignment_targets(correct, dtype=torch.float64)
        grads = []
        for detach in (True, False):
            q_logit = q0.clone().requires_grad_(True)
            z = z0.clone().requires_grad_(True)
            loss_terms(q_logit, z, q_star, r_star, costs[:3], 2.0,
                       detach_weights=detach)["scoring"].backward()
            grads.append((q_logit.grad, z.grad))
        assert grads[0][1] is None
        assert float(grads[1][1].abs().sum()) > 0.0
        assert_close(grads[0][0], grads[1][0], **TOL)  # the same gradient for the scores

    @pytest.mark.parametrize("scale", [0.0, 1e2, 1e4, 1e30])
    def test_gradients_finite_for_extreme_inputs(self, scale):
        n, k = 5, 3
        q_logit = (torch.tensor([[1.0, -1.0, 1.0]] * n) * scale).requires_grad_(True)
        z = (torch.tensor([[1.0, -1.0, 0.0]] * n) * scale).requires_grad_(True)
        correct = torch.zeros(n, k, dtype=torch.bool)
        correct[0, 1] = True
        terms = loss_terms(q_logit, z, score_targets(correct, "no_regret"),
                           assignment_targets(correct), torch.tensor([0.0, 0.5, 1.0]), 0.3,
                           detach_weights=False)
        sum(terms.values()).backward()
        for value in terms.values():
            assert torch.isfinite(value)
        assert torch.isfinite(q_logit.grad).all() and torch.isfinite(z.grad).all()


class TestTrainingCallsTheCheckedLoss:
    def test_train_heads_minimises_loss_terms(self, monkeypatch):
        """Every optimisation step and every holdout evaluation goes through
        eenet_losses.loss_terms, and what it returns there matches the loop reference."""
        real = heads_mod.loss_terms
        calls = []

        def counting(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append((args, kwargs, {k: v.detach() for k, v in out.items()}))
            return out

        monkeypatch.setattr(heads_mod, "loss_terms", counting)
        cache = synthetic_cache(120, n_exits=3, n_classes=4, seed=2)
        scorer = EENetScorer(epochs=3, patience=10, hidden=4, batch_size=32, holdout=0.25,
                             alpha_ce=0.5, alpha_budget=3.0)
        scorer.fit(cache, cache.costs, 3.0, seed=0)
        d = scorer.diagnostics
        assert d["steps"] == 3 * 3  # 90 training samples in batches of 32, three epochs
        assert len(calls) == d["steps"] + d["epochs_run"]
        # the holdout curve is the alpha-weighted sum of the checked terms
        hold = [c[2] for i, c in enumerate(calls) if (i + 1) % 4 == 0]
        for rec, loss in zip(hold, d["holdout_loss"]):
            expected = rec["scoring"] + 0.5 * rec["assignment"] + 3.0 * rec["budget"]
            assert float(expected) == pytest.approx(loss, rel=1e-6)
        # one training step's call, against the reference loops
        (q_logit, z, q_star, r_star, costs, budget), kwargs, out = calls[1]
        assert kwargs == {"detach_weights": True}
        assert q_logit.shape == (32, 3) and z.shape == (32, 3)
        ref = _ref_loss_terms(q_logit.detach().double(), z.detach().double(),
                              q_star.double(), r_star.double(), costs.double(), float(budget),
                              True)
        for key in ref:
            assert_close(out[key].double(), ref[key].detach(), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 5)),
                  elements=st.floats(-30, 30)))
def test_scoring_weights_are_a_distribution_per_exit(z):
    r = torch.softmax(torch.from_numpy(z), dim=1)
    w = scoring_weights(r)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert_close(w.sum(0), torch.ones(z.shape[1], dtype=torch.float64), rtol=0, atol=1e-9)
