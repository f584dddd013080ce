"""The exit cache in memory: :class:`ExitCache`, and the stratified splitter it holds out with.

:func:`cache_summary` is what ``eenet info`` shows, built from an
:class:`ExitCache` or (by :func:`~eenet.cache.reader.summarize_cache`) from a
file read block by block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from eenet._validation import EenetError, check_costs, check_labels, check_number
from eenet.cache.features import check_features, feature_shapes
from eenet.cache.layout import READ_ROWS_BYTES, LogitsKind, rows_per_block

__all__ = ["ExitCache", "cache_summary", "scan_finite", "stratified_split"]


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (rest, held-out) indices, stratified by label.

    The held-out part has ``round(fraction * n_samples)`` samples, and every
    class gives it about ``fraction`` of its members (within a sample or so).
    Each sample gets a within-class quantile, its random rank in its class
    plus a uniform jitter, over the class size; the lowest quantiles are held
    out. (A per-class ``round`` would hold out nothing from classes of one or
    two samples, and nothing at all with many small classes.) The held-out
    part is empty when ``fraction`` is 0 or one side would be empty.

    Args:
        labels: int [n_samples] class labels.
        fraction: share held out, in [0, 1].
        seed: seed of the shuffle and the jitter.

    Returns:
        ``(rest_idx, held_idx)``: sorted int64 arrays that partition ``range(n_samples)``.

    Example:
        >>> rest, held = stratified_split(np.repeat([0, 1], 10), 0.3, seed=0)
        >>> len(rest), len(held), int((held >= 10).sum())
        (14, 6, 3)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise EenetError(f"labels must be 1-D [n_samples], got shape {labels.shape}")
    fraction = check_number("holdout fraction", fraction, low=0.0, high=1.0)
    n = labels.size
    everyone = np.arange(n)
    n_held = int(round(fraction * n))
    if n_held == 0 or n_held >= n:
        return everyone, everyone[:0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    by_class = order[np.argsort(labels[order], kind="stable")]  # grouped, shuffled within
    _, starts, sizes = np.unique(labels[by_class], return_index=True, return_counts=True)
    rank = np.arange(n) - np.repeat(starts, sizes)
    quantile = (rank + rng.random(n)) / np.repeat(sizes, sizes)
    held = np.sort(by_class[np.argsort(quantile, kind="stable")[:n_held]])
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def cache_summary(meta: Mapping[str, Any], correct: np.ndarray) -> dict[str, Any]:
    """What ``eenet info`` shows, from provenance and correctness [n_samples, n_exits]."""
    n, k = correct.shape
    return {
        "path": meta.get("path"), "model": meta.get("model", ""),
        "dataset": meta.get("dataset", ""), "split": meta.get("split", ""),
        "n_samples": int(n), "n_exits": int(k), "n_classes": int(meta["n_classes"]),
        "exit_names": list(meta["exit_names"]),
        "costs": [float(c) for c in meta["costs"]], "cost_unit": meta["cost_unit"],
        "cost_source": meta["cost_source"],
        "cost_vectors": {name: [float(x) for x in v]
                         for name, v in dict(meta["extra_costs"]).items()},
        "exit_accuracy": [float(a) for a in correct.mean(axis=0)],
        "last_exit_accuracy": float(correct[:, -1].mean()),
        "oracle_accuracy": float(correct.any(axis=1).mean()),
        "logits_dtype": str(meta["logits_dtype"]), "logits_kind": meta["logits_kind"],
        "device": meta["attrs"].get("device", ""), "created": meta["attrs"].get("created", ""),
        "eenet_version": meta["attrs"].get("eenet_version", ""),
        "features": meta.get("features"),
        "feature_projected": meta.get("feature_projected"),
    }


@dataclass(frozen=True, eq=False)
class ExitCache:
    """Every exit's output on one dataset split.

    Attributes:
        logits: [n_samples, n_exits, n_classes] logits (or log-probabilities
            when ``logits_kind == "log_probs"``); float32 or float16.
        labels: [n_samples] int64 class indices.
        costs: [n_exits] float64 cumulative cost of each exit, in ``cost_unit``.
        cost_unit: unit of ``costs`` (``"ms"``, ``"flops"``, ...).
        cost_source: ``"measured"``, ``"flops"`` or ``"given"``.
        model, dataset, split: free-text provenance.
        exit_names: one name per exit (defaults to ``exit0``, ``exit1``, ...).
        logits_kind: whether ``logits`` holds logits or log-probabilities.
        extra_costs: every other cost vector computed, by name.
        sample_ids: optional [n_samples] int64 ids.
        attrs: other provenance (``device``, ``created``, ``seed``, ...).
        path: the file this cache was read from, if any.
        features: optional per-exit hidden features, one float16
            ``[n_samples, d_k]`` array per exit (the input of exit ``k``'s last
            linear layer, projected when wide); ``None`` when not cached.
        feature_projections: per exit, the float32 ``[d_in_k, d_k]`` matrix the
            features were projected with, or ``None`` where they were stored
            as they came; ``None`` without features.

    Example:
        >>> import numpy as np
        >>> c = ExitCache(np.zeros((4, 2, 3), np.float32), np.array([0, 1, 2, 0]),
        ...               np.array([1.0, 2.0]))
        >>> (c.n_samples, c.n_exits, c.n_classes)
        (4, 2, 3)
    """

    logits: np.ndarray
    labels: np.ndarray
    costs: np.ndarray
    cost_unit: str = "ms"
    cost_source: str = "given"
    model: str = ""
    dataset: str = ""
    split: str = ""
    exit_names: tuple[str, ...] = ()
    logits_kind: LogitsKind = "logits"
    extra_costs: Mapping[str, np.ndarray] = field(default_factory=dict)
    sample_ids: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    features: tuple[np.ndarray, ...] | None = None
    feature_projections: tuple[np.ndarray | None, ...] | None = None
    # arg-max and correctness, computed once: every fit, calibration and evaluation asks
    _memo: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"{self.path}: " if self.path else ""
        logits = np.asarray(self.logits)
        if logits.ndim != 3:
            raise EenetError(f"{where}logits must be [n_samples, n_exits, n_classes], "
                             f"got shape {logits.shape}")
        if logits.dtype not in (np.float32, np.float16):
            logits = logits.astype(np.float32)
        n, k, c = logits.shape
        if n == 0 or k == 0 or c < 2:
            raise EenetError(f"{where}logits shape {logits.shape} needs at least one sample, "
                             f"one exit and two classes")
        labels = check_labels(self.labels, n, c, where=where)
        costs = check_costs(self.costs, k, name=f"{where}costs")
        names = tuple(str(s) for s in self.exit_names) or tuple(f"exit{i}" for i in range(k))
        if len(names) != k:
            raise EenetError(f"{where}exit_names has {len(names)} names for {k} exits; give "
                             f"one name per exit")
        if self.logits_kind not in ("logits", "log_probs"):
            raise EenetError(f"{where}logits_kind must be 'logits' or 'log_probs', "
                             f"got {self.logits_kind!r}")
        extra = {str(key): check_costs(v, k, name=f"{where}{key}")
                 for key, v in dict(self.extra_costs).items()}
        ids = None if self.sample_ids is None else np.asarray(self.sample_ids, dtype=np.int64)
        if ids is not None and ids.shape != (n,):
            raise EenetError(f"{where}sample_ids must have shape ({n},), got {ids.shape}")
        feats, projs = check_features(self.features, self.feature_projections, n, k, where)
        for name, value in (("logits", logits), ("labels", labels), ("costs", costs),
                            ("exit_names", names), ("extra_costs", extra),
                            ("sample_ids", ids), ("attrs", dict(self.attrs)),
                            ("features", feats), ("feature_projections", projs)):
            object.__setattr__(self, name, value)
        scan_finite(logits, f"{where}logits")

    # ---- shape -------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.logits.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[2])

    # ---- derived arrays ----------------------------------------------------
    def _blocks(self) -> Iterator[slice]:
        rows = rows_per_block(self.n_exits, self.n_classes, 4, READ_ROWS_BYTES)
        for start in range(0, self.n_samples, rows):
            yield slice(start, min(start + rows, self.n_samples))

    def probs(self) -> np.ndarray:
        """Softmax probabilities, float32 [n_samples, n_exits, n_classes]."""
        out = np.empty(self.logits.shape, dtype=np.float32)
        for sl in self._blocks():
            block = self.logits[sl].astype(np.float32)
            block -= block.max(axis=2, keepdims=True)
            np.exp(block, out=block)
            block /= block.sum(axis=2, keepdims=True)
            out[sl] = block
        return out

    def predictions(self) -> np.ndarray:
        """Arg-max class of every exit, int64 [n_samples, n_exits] (read-only)."""
        if "predictions" not in self._memo:
            pred = np.argmax(self.logits, axis=2).astype(np.int64)
            pred.flags.writeable = False
            self._memo["predictions"] = pred
        return self._memo["predictions"]

    def correct(self) -> np.ndarray:
        """Whether each exit's arg-max is the label, bool [n_samples, n_exits] (read-only)."""
        if "correct" not in self._memo:
            ok = self.predictions() == self.labels[:, None]
            ok.flags.writeable = False
            self._memo["correct"] = ok
        return self._memo["correct"]

    # ---- views ---------------------------------------------------------------
    def subset(self, indices: np.ndarray | Sequence[int]) -> "ExitCache":
        """The cache restricted to ``indices`` (a row subset, in the given order)."""
        idx = np.asarray(indices)
        return dataclasses.replace(
            self, logits=self.logits[idx], labels=self.labels[idx],
            sample_ids=None if self.sample_ids is None else self.sample_ids[idx],
            features=None if self.features is None else tuple(f[idx] for f in self.features))

    def holdout_split(self, fraction: float, seed: int = 0) -> tuple["ExitCache", "ExitCache"]:
        """Split into (rest, held_out) with :func:`stratified_split`.

        Args:
            fraction: share of samples held out, in (0, 1).
            seed: seed of the split.

        Returns:
            Two caches over disjoint samples; the second holds about
            ``fraction`` of every class.

        Raises:
            EenetError: a fraction outside (0, 1), or one that leaves a side empty.
        """
        if not 0 < fraction < 1:
            raise EenetError(f"holdout fraction must lie in (0, 1), got {fraction}")
        rest, held = stratified_split(self.labels, fraction, seed)
        if held.size == 0 or rest.size == 0:
            raise EenetError(f"holdout fraction {fraction} leaves one side empty for "
                             f"{self.n_samples} samples; choose a fraction between "
                             f"{1 / self.n_samples:.3g} and {1 - 1 / self.n_samples:.3g}")
        return self.subset(rest), self.subset(held)

    def summary(self) -> dict[str, Any]:
        """What ``eenet info`` shows: sizes, costs, per-exit and oracle accuracy."""
        meta = {"path": self.path, "model": self.model, "dataset": self.dataset,
                "split": self.split, "n_classes": self.n_classes,
                "exit_names": self.exit_names, "costs": self.costs,
                "cost_unit": self.cost_unit, "cost_source": self.cost_source,
                "extra_costs": self.extra_costs, "logits_dtype": self.logits.dtype,
                "logits_kind": self.logits_kind, "attrs": self.attrs,
                "features": feature_shapes(self.features),
                "feature_projected": None if self.features is None else
                [p is not None for p in self.feature_projections or ()]}
        return cache_summary(meta, self.correct())


def scan_finite(logits: Any, name: str, offset: int = 0) -> None:
    """Refuse NaN or inf in ``logits`` [n_samples, n_exits, n_classes], block by block.

    Raises:
        EenetError: naming ``name`` and the first bad element, its sample
            counted from ``offset``.
    """
    rows = rows_per_block(logits.shape[1], logits.shape[2], 4, READ_ROWS_BYTES)
    for start in range(0, logits.shape[0], rows):
        bad = ~np.isfinite(logits[start:start + rows])
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise EenetError(f"{name} contains non-finite values (NaN or inf), first at "
                             f"[sample {offset + start + first[0]}, exit {first[1]}, class "
                             f"{first[2]}]; fix the model or drop those samples")
