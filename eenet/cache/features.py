"""Per-exit hidden features stored beside the logits: checks, and the seeded projection.

A cache made with ``eenet cache --features`` (or imported with ``features_k``
arrays) holds, for every exit ``k``, the input of that exit's last linear
layer: the pooled representation its classifier reads, one row per sample.
Where that input is wider than the chosen feature dimension ``d``, it is
multiplied by :func:`random_projection` (a seeded Gaussian matrix, stored in
the cache) so the file stays small and serving can apply the same matrix.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from eenet._validation import EenetError

__all__ = ["check_features", "feature_shapes", "random_projection"]


def random_projection(d_in: int, d_out: int, seed: int, exit_index: int) -> np.ndarray:
    """The projection of exit ``exit_index``'s features, float32 ``[d_in, d_out]``.

    Entries are independent standard normals divided by ``sqrt(d_out)``, so a
    projected vector ``x @ P`` keeps the squared norm of ``x`` in expectation
    (Johnson-Lindenstrauss). They are drawn by NumPy's PCG64 generator seeded
    with ``[seed, exit_index]``, which gives the same matrix on any machine.

    Example:
        >>> p = random_projection(100, 8, seed=0, exit_index=1)
        >>> p.shape, p.dtype, bool((p == random_projection(100, 8, 0, 1)).all())
        ((100, 8), dtype('float32'), True)
    """
    if d_in < 1 or d_out < 1:
        raise EenetError(f"a feature projection needs positive sizes, got {d_in} x {d_out}")
    rng = np.random.default_rng([int(seed), int(exit_index)])
    return (rng.standard_normal((d_in, d_out)) / np.sqrt(d_out)).astype(np.float32)


def check_features(features: Sequence[np.ndarray] | None,
                   projections: Sequence[np.ndarray | None] | None, n_samples: int,
                   n_exits: int, where: str = ""
                   ) -> tuple[tuple[np.ndarray, ...] | None, tuple[np.ndarray | None, ...] | None]:
    """Checked features (float16 ``[n_samples, d_k]`` per exit) and projections.

    Args:
        features: one ``[n_samples, d_k]`` array per exit, or ``None``.
        projections: one float32 ``[d_in_k, d_k]`` matrix or ``None`` per exit,
            or ``None`` (no exit projected).
        n_samples, n_exits: the cache's sizes.
        where: prefix of error messages (the file).

    Raises:
        EenetError: a count, shape or value that does not fit, naming the exit.
    """
    if features is None:
        if projections is not None and any(p is not None for p in projections):
            raise EenetError(f"{where}feature projections were given without features")
        return None, None
    if len(features) != n_exits:
        raise EenetError(f"{where}features has {len(features)} arrays for {n_exits} exits; "
                         f"give one [n_samples, d] array per exit")
    out = []
    for k, f in enumerate(features):
        f = np.asarray(f)
        if f.ndim != 2 or f.shape[0] != n_samples or f.shape[1] < 1:
            raise EenetError(f"{where}features of exit {k} have shape {f.shape}; expected "
                             f"[{n_samples}, d] (one row per sample)")
        if not np.issubdtype(f.dtype, np.floating) and not np.issubdtype(f.dtype, np.integer):
            raise EenetError(f"{where}features of exit {k} must be numbers, got {f.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            half = f.astype(np.float16)
        if not np.isfinite(half).all():
            why = "they overflow float16; scale them down" if np.isfinite(f).all() \
                else "they hold NaN or inf; fix the model or drop those samples"
            raise EenetError(f"{where}features of exit {k} are not finite in float16: {why}")
        out.append(half)
    projs = tuple(projections) if projections is not None else (None,) * n_exits
    if len(projs) != n_exits:
        raise EenetError(f"{where}feature projections: {len(projs)} for {n_exits} exits")
    checked: list[np.ndarray | None] = []
    for k, p in enumerate(projs):
        if p is not None:
            p = np.asarray(p, dtype=np.float32)
            if p.ndim != 2 or p.shape[1] != out[k].shape[1]:
                raise EenetError(f"{where}feature projection of exit {k} has shape {p.shape}; "
                                 f"expected [d_in, {out[k].shape[1]}]")
        checked.append(p)
    return tuple(out), tuple(checked)


def feature_shapes(features: Sequence[np.ndarray] | None) -> list[list[int]] | None:
    """``[n_samples, d_k]`` per exit, as ``eenet info`` shows them (``None`` without features)."""
    return None if features is None else [list(map(int, f.shape)) for f in features]
