"""EENet's learned exit scores (Ilhan et al., "EENet: Learning to Early Exit for
Adaptive Inference", WACV 2024, Sec. 3).

For every exit k two small MLPs (:mod:`eenet.scores.eenet_heads`) read

    x_k = [p_k (class probabilities), a_k (max probability, 1 - normalised
           entropy, vote ratio), q_0 .. q_{k-1} (scores of the earlier exits)]

the scoring head gives the score logit (``q_k = sigmoid(logit)``, the
predicted probability that leaving at k is right), the assignment head an
unbounded logit whose softmax over exits is the soft assignment r. They are
trained with ``L_g + alpha_ce L_ce + alpha_budget L_budget``
(:mod:`eenet.scores.eenet_losses`); the mean assignment ``rbar`` is the learned
exit distribution the ``assignment`` calibration uses.

A sample's score at exit k is its score *logit*: monotone in ``q_k``, so the
thresholds mean the same, and free of the ties a float32 sigmoid makes above
a logit of about 17.

Defaults that depart from the paper, each chosen on held-out validation data
(benchmarks/RESULTS.md): the no-regret scoring target
(:func:`eenet.scores.eenet_losses.score_targets`) and four agreement features
(the top-1/top-2 margin, the previous exit's probability of this exit's
answer, the earlier exits' mean probability of it, agreement with the
previous exit); ``target="correct", features="paper"`` restores the published
recipe. Departures from the authors' released code, each deliberate: the
assignment is a softmax over unbounded logits (not over sigmoids, which
confine every r_k to a narrow band); gradients are zeroed every step and the
best weights copied; the fed-forward scores and the scoring-loss weights are
detached; costs and budget are divided by the last exit's cost; training
stops early on a stratified held-out part of the fit data.

Probability features: the full vector p_k up to ``FULL_PROBS_MAX_CLASSES``
classes, above it (ImageNet's 1000) the ``top_m`` largest probabilities in
decreasing order, which keeps the heads small and class-agnostic.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from eenet._validation import (EenetError, check_choice, check_int, check_number, first_line,
                               flush_denormals, plain, seeded)
from eenet.cache import ExitCache
from eenet.scores.eenet_heads import EENetHeads, TrainConfig, train_heads
from eenet.scores.eenet_losses import SCORE_TARGETS
from eenet.scores.eenet_stream import EENetStream, fold_scoring_heads
from eenet.scores.features import (N_AGREEMENT_FEATURES, N_CONFIDENCE_FEATURES,
                                   advance_history, max_prob, new_history, one_minus_entropy,
                                   probabilities, top_probs)

__all__ = ["EENetConfig", "EENetScorer", "FULL_PROBS_MAX_CLASSES"]

logger = logging.getLogger(__name__)

#: Up to this many classes ``prob_features="auto"`` feeds the full probability vector.
FULL_PROBS_MAX_CLASSES = 128
_STATE_VERSION = 3
_FEATURE_ROWS_BYTES = 32 << 20  # logits per block when computing features of a cache


@dataclass(frozen=True)
class EENetConfig(TrainConfig):
    """Hyperparameters of :class:`EENetScorer`: the optimisation settings of
    :class:`~eenet.scores.eenet_heads.TrainConfig`, and

    Attributes:
        hidden: width of every hidden layer.
        depth: hidden layers per head (0 gives a linear head).
        holdout: share of the fit data held out (stratified, seeded) for early
            stopping, in [0, 1); 0 stops on the training loss.
        prob_features: ``"full"`` (the probability vector, as in the paper),
            ``"top"`` (the ``top_m`` largest, sorted) or ``"auto"``.
        top_m: probabilities kept by ``"top"``.
        features: ``"agreement"`` (default: the paper's plus four agreement
            features) or ``"paper"``.
        device: torch device for training and scoring.
        num_threads: torch CPU threads while fitting (restored afterwards);
            the heads are tiny, and extra threads only contend on a shared
            machine. ``None`` keeps torch's setting.
    """

    hidden: int = 32
    depth: int = 1
    holdout: float = 0.2
    prob_features: Literal["auto", "full", "top"] = "auto"
    top_m: int = 16
    features: Literal["agreement", "paper"] = "agreement"
    device: str = "cpu"
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        for name, minimum in (("hidden", 1), ("depth", 0), ("epochs", 1), ("patience", 1),
                              ("top_m", 1)):
            check_int(name, getattr(self, name), minimum)
        if self.batch_size is not None and self.batch_size != "auto":
            check_int("batch_size", self.batch_size, 1)
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, 1)
        check_number("lr", self.lr, low=0, low_open=True)
        for name in ("weight_decay", "alpha_ce", "alpha_budget", "tol"):
            check_number(name, getattr(self, name), low=0)
        check_number("holdout", self.holdout, low=0, high=1, high_open=True)
        check_choice("prob_features", self.prob_features, ("auto", "full", "top"))
        check_choice("target", self.target, SCORE_TARGETS)
        check_choice("features", self.features, ("paper", "agreement"))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The hyperparameter names, for error messages."""
        return tuple(sorted(cls.__dataclass_fields__))



class EENetScorer:
    """EENet's learned exit scores for a frozen multi-exit model.

    Args:
        **hparams: fields of :class:`EENetConfig`.

    Example:
        >>> from eenet.synthetic import synthetic_cache
        >>> from eenet.scores import score_cache
        >>> cache = synthetic_cache(400, n_exits=3, seed=0)
        >>> scorer = EENetScorer(epochs=3).fit(cache, cache.costs, budget=3.0)
        >>> score_cache(scorer, cache).shape
        (400, 3)
        >>> round(float(scorer.exit_distribution().sum()), 6)
        1.0
    """

    name = "eenet"

    def __init__(self, **hparams: Any) -> None:
        unknown = sorted(set(hparams) - set(EENetConfig.names()))
        if unknown:
            raise EenetError(f"unknown EENet hyperparameter {unknown[0]!r}; choose from: "
                             f"{', '.join(EENetConfig.names())}")
        try:
            torch.device(hparams.get("device", "cpu"))
        except (RuntimeError, TypeError):
            raise EenetError(f"device must be a torch device such as 'cpu' or 'cuda:0', got "
                             f"{hparams['device']!r}") from None
        self.config = EENetConfig(**hparams)
        self.diagnostics: dict[str, Any] = {}
        self._net: EENetHeads | None = None
        self._stream: EENetStream | None = None
        self._n_exits = self._n_classes = 0
        self._use_top = False
        self._rbar: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"EENetScorer({self.config})"

    @property
    def is_fitted(self) -> bool:
        return self._net is not None

    # ---- features ------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        """Width of one exit's static features."""
        width = self.config.top_m if self._use_top else self._n_classes
        extra = N_AGREEMENT_FEATURES if self.config.features == "agreement" else 0
        return width + N_CONFIDENCE_FEATURES + extra

    def _features(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's static features ``[batch, in_dim]``; advances the history in ``state``."""
        p = probabilities(logits)
        hist = advance_history(state, k, p)
        summaries = [max_prob(p), one_minus_entropy(p), hist["vote"]]
        if self.config.features == "agreement":
            top2 = p.topk(2, dim=1).values
            summaries += [top2[:, 0] - top2[:, 1], hist["prev_at_pred"], hist["mean_at_pred"],
                          hist["agree"]]
        head = top_probs(p, self.config.top_m) if self._use_top else p
        return torch.cat([head, torch.stack(summaries, dim=1)], dim=1)

    def _cache_features(self, cache: ExitCache) -> Tensor:
        """Static features of every exit, float32 ``[n_samples, n_exits, in_dim]`` on the device."""
        n, k_exits, c = cache.logits.shape
        out = torch.empty(n, k_exits, self.in_dim)
        rows = max(1, _FEATURE_ROWS_BYTES // (k_exits * c * 4))
        with torch.inference_mode():
            for start in range(0, n, rows):
                block = torch.from_numpy(np.ascontiguousarray(cache.logits[start:start + rows]))
                state = self._history(block.shape[0], "cpu")
                for k in range(k_exits):
                    out[start:start + rows, k] = self._features(k, block[:, k], state)
        return out.to(self.config.device)

    def _history(self, batch: int, device: torch.device | str) -> dict[str, Tensor]:
        return new_history(batch, self._n_classes, device,
                           probs=self.config.features == "agreement")

    # ---- the scorer protocol -------------------------------------------------
    def start(self, batch: int, n_classes: int, device: torch.device | str = "cpu"
              ) -> dict[str, Tensor]:
        """A fresh state for ``batch`` samples: their history and earlier scores."""
        self._require("start")
        if n_classes != self._n_classes:
            raise EenetError(f"the scorer was fitted on {self._n_classes} classes, got "
                             f"{n_classes}; fit a policy on a cache of this network")
        return self._stream_or_fail("start").start(batch, device)

    def score_exit(self, k: int, logits: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Exit k's score logit ``[batch]`` from its logits and the state of exits 0..k-1
        (:class:`~eenet.scores.eenet_stream.EENetStream`)."""
        return self._stream_or_fail("score").score_exit(k, logits, state)

    @property
    def stream(self) -> EENetStream:
        """The per-exit scoring path (its ``kernel`` attribute picks C or torch)."""
        return self._stream_or_fail("stream")

    def _stream_or_fail(self, step: str) -> EENetStream:
        if self._stream is None:
            net = self._require(step)
            self._stream = EENetStream(
                fold_scoring_heads(net, width=self.in_dim - self._extra_features,
                                   n_classes=self._n_classes,
                                   agreement=self.config.features == "agreement"),
                n_exits=self._n_exits, n_classes=self._n_classes,
                top_m=self.config.top_m if self._use_top else None,
                agreement=self.config.features == "agreement")
        return self._stream

    @property
    def _extra_features(self) -> int:
        return N_CONFIDENCE_FEATURES + (N_AGREEMENT_FEATURES
                                        if self.config.features == "agreement" else 0)

    def exit_distribution(self) -> np.ndarray | None:
        """Learned exit distribution ``rbar_k = mean_n r_n,k`` on the fit data (sums to 1)."""
        return None if self._rbar is None else self._rbar.copy()

    # ---- fitting -------------------------------------------------------------
    def fit(self, cache: ExitCache, costs: np.ndarray, budget: float, *, seed: int = 0,
            verbose: bool = False) -> "EENetScorer":
        """Train the scoring and assignment heads for one budget on ``cache``.

        Args:
            cache: the validation split.
            costs: [n_exits] cumulative costs the budget is spent on (the
                cache's, plus the policy's own overhead where it is counted).
            budget: the average cost budget, in the unit of ``costs``.
            seed: seeds the holdout split, the initialisation and the batch
                order; global RNG state is left as it was.
            verbose: progress bar on stderr.

        Returns:
            ``self``, fitted.
        """
        from eenet.cache import stratified_split

        cfg = self.config
        start = time.perf_counter()
        self._net, self._stream, self._rbar, self.diagnostics = None, None, None, {}
        self._n_exits, self._n_classes = cache.n_exits, cache.n_classes
        self._use_top = cfg.prob_features == "top" or (
            cfg.prob_features == "auto" and cache.n_classes > FULL_PROBS_MAX_CLASSES)
        costs = np.asarray(costs, dtype=np.float64)
        scale = float(costs[-1]) if costs[-1] > 0 else 1.0
        device = torch.device(cfg.device)
        costs_t = torch.as_tensor(costs / scale, dtype=torch.float32, device=device)
        features = self._cache_features(cache)
        correct = torch.from_numpy(np.array(cache.correct())).to(device)
        train_idx, hold_idx = stratified_split(cache.labels, cfg.holdout, seed)
        with seeded(seed, device, cfg.num_threads), flush_denormals():
            net = EENetHeads(cache.n_exits, self.in_dim, cfg.hidden, cfg.depth).to(device)
            history = train_heads(net, features, correct, costs_t, budget / scale,
                                  torch.from_numpy(train_idx).to(device),
                                  torch.from_numpy(hold_idx).to(device), cfg,
                                  seed=seed, verbose=verbose)
            with torch.no_grad():
                r = torch.softmax(net(features)[1].double(), dim=1).mean(dim=0)
        self._net = net.eval()
        self._rbar = (r / r.sum()).cpu().numpy()
        history.update(fit_seconds=time.perf_counter() - start, n_train=int(train_idx.size),
                       n_holdout=int(hold_idx.size), seed=seed, budget=float(budget),
                       expected_cost=float(self._rbar @ costs),
                       exit_distribution=self._rbar.tolist(),
                       prob_features="top" if self._use_top else "full")
        self.diagnostics = plain(history)
        logger.info("eenet fit: %d epochs (best %d), holdout loss %.4f, %.2f s",
                    history["epochs_run"], history["best_epoch"], history["best_loss"],
                    history["fit_seconds"])
        return self

    def _require(self, step: str) -> EENetHeads:
        if self._net is None:
            raise EenetError(f"EENetScorer.{step}() needs a trained scorer; call fit() first "
                             f"(or load a fitted policy)")
        return self._net

    # ---- persistence ---------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the scorer, as plain containers (loads with
        ``torch.load(weights_only=True)``)."""
        net = self._require("to_state")
        assert self._rbar is not None
        return {"scorer": self.name, "state_version": _STATE_VERSION,
                "hparams": asdict(self.config), "n_exits": self._n_exits,
                "n_classes": self._n_classes, "use_top": self._use_top,
                "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                "exit_distribution": self._rbar.tolist(), "diagnostics": self.diagnostics}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "EENetScorer":
        """Rebuild a fitted scorer from :meth:`to_state`'s output.

        Raises:
            EenetError: the state is of another scorer, another version, or damaged.
        """
        if not isinstance(state, dict) or state.get("scorer") != cls.name:
            raise EenetError("the policy's scorer state is not an EENet state; the policy "
                             "file is damaged, fit it again")
        if state.get("state_version") != _STATE_VERSION:
            raise EenetError(f"EENet scorer state version {state.get('state_version')!r} is "
                             f"not {_STATE_VERSION}; fit the policy again with this eenet")
        scorer = cls(**state["hparams"])
        scorer._n_exits, scorer._n_classes = int(state["n_exits"]), int(state["n_classes"])
        scorer._use_top = bool(state["use_top"])
        net = EENetHeads(scorer._n_exits, scorer.in_dim, scorer.config.hidden,
                         scorer.config.depth)
        try:
            net.load_state_dict(state["state_dict"])
        except RuntimeError as err:
            raise EenetError(f"the EENet weights do not fit the stored hyperparameters "
                             f"({first_line(err)}); fit the policy again") from None
        scorer._net = net.to(scorer.config.device).eval()
        scorer._rbar = np.asarray(state["exit_distribution"], dtype=np.float64)
        scorer.diagnostics = dict(state.get("diagnostics") or {})
        return scorer
