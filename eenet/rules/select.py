"""Choosing a calibration from held-out evidence (the ``select`` calibration, the default).

No calibration wins on every network: MSDNet's geometric exit distribution
cannot follow the costs where early exits are weak or nearly free, and the
searched thresholds overfit the calibration data where the budget is loose
(benchmarks/RESULTS.md). So the calibration data decides, by cross-validation
at the budget:

1. the calibration samples are cut into ``folds`` parts by a seeded
   permutation; every candidate calibration is fitted, without the guard, on
   all parts but one and applied to the part left out, so every sample gets
   a held-out verdict (right or wrong) under every candidate;
2. the most accurate candidate on those verdicts is the *leader*; a candidate
   whose held-out accuracy is within ``tie_z`` standard errors of the
   leader's is a tie, where the standard error is that of the paired
   per-sample difference (the same samples judge both, so most of their noise
   cancels);
3. the first candidate in preference order that ties the leader wins: the
   method's own published rule first, then the smoother geometric rule, then
   the search. A candidate is chosen over a smoother one only on evidence
   beyond the selection's own noise;
4. where one standard error either way would change the answer, the samples
   are cut again by another permutation (up to ``repeats`` times) and the
   verdicts averaged per sample, so more evidence is bought only where it
   can change the choice.

The winner is then calibrated on all of the data, with the budget guard sized
for it (its own margin: the refit bootstrap for quota rules, the selection
bootstrap for the search). Hand-written: cross-validation of a
budget-constrained threshold rule is not something a library offers.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["SELECT_FOLDS", "SELECT_REPEATS", "TIE_Z", "ambiguous", "choose", "fold_splits"]

#: Parts the calibration data is cut into for the held-out comparison.
SELECT_FOLDS = 2
#: At most how many times it is cut (each with its own permutation): a repeat is
#: added only while the choice is :func:`ambiguous`.
SELECT_REPEATS = 3
#: Differences within this many paired standard errors of the leader are ties.
TIE_Z = 1.0


def fold_splits(n_samples: int, folds: int, repeat: int, seed: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fitting rows, held-out rows) of every fold of one repeat, both sorted int64.

    Repeat r permutes the samples with ``default_rng(seed + r)`` and deals
    them into ``folds`` parts, so part sizes differ by at most one.

    Example:
        >>> [(a.size, b.size) for a, b in fold_splits(5, 2, 0, seed=0)]
        [(2, 3), (3, 2)]
    """
    order = np.random.default_rng(seed + repeat).permutation(n_samples)
    parts = [order[f::folds] for f in range(folds)]
    return [(np.sort(np.concatenate(parts[:f] + parts[f + 1:])), np.sort(parts[f]))
            for f in range(folds)]


def ambiguous(record: dict[str, Any]) -> bool:
    """Whether one more standard error either way would change :func:`choose`'s answer:
    some candidate trails the leader by between ``tie_z - 1`` and ``tie_z + 1`` of its
    paired standard errors. More evidence (another repeat of the folds) pays there."""
    z = record["tie_z"]
    return any(se > 0 and (z - 1) * se < record["behind_leader"][m] <= (z + 1) * se
               for m, se in record["behind_leader_se"].items())


def choose(right: dict[str, np.ndarray], prefer: Sequence[str], tie_z: float = TIE_Z
           ) -> tuple[str, dict[str, Any]]:
    """The candidate to calibrate with, from each candidate's held-out verdicts.

    Args:
        right: candidate -> [n_samples] held-out correctness of each sample
            (the mean over repeats, in [0, 1]).
        prefer: the candidates in preference order (ties go to the first).
        tie_z: the tie width, in paired standard errors.

    Returns:
        ``(chosen, record)``: the record holds each candidate's held-out
        accuracy, its paired difference to the leader and that difference's
        standard error, the leader and the tie width.

    Example:
        >>> right = {"geometric": np.array([1.0, 0, 1, 1]), "search": np.array([1.0, 1, 1, 0])}
        >>> choose(right, ["geometric", "search"])[0]  # equal accuracy: a tie
        'geometric'
    """
    accuracy = {m: float(np.mean(right[m])) for m in prefer}
    leader = max(prefer, key=lambda m: accuracy[m])  # the first of equals
    n = next(iter(right.values())).size
    behind, stderr = {}, {}
    for m in prefer:
        diff = right[leader] - right[m]  # [n_samples]
        behind[m] = float(diff.mean())
        stderr[m] = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    chosen = next(m for m in prefer if behind[m] <= tie_z * stderr[m] + 1e-12)
    return chosen, {"selected": chosen, "held_out_accuracy": accuracy, "leader": leader,
                    "behind_leader": behind, "behind_leader_se": stderr, "tie_z": tie_z,
                    "candidates": list(prefer)}
