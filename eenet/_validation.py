"""Small validators shared by the public entry points.

Every check raises :class:`EenetError` (a ``ValueError``) with one line that
names the argument, the bad value and what is allowed, so ``cli.py`` can show
it to the user as is.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class EenetError(ValueError):
    """A problem with the user's input, explained in one line."""


class CacheError(EenetError):
    """An exit cache that cannot be read or written; the message names the file and key."""


def _check_budget(budget: float, costs: np.ndarray, *, unit: str = "") -> float:
    """Check that ``budget`` is a finite number no lower than the cheapest exit.

    A budget above the last exit's cost is legal (the full model fits); the
    caller decides whether to warn.
    """
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise EenetError(f"budget must be a number, got {budget!r}") from None
    if not np.isfinite(budget) or budget <= 0:
        raise EenetError(f"budget must be a positive finite number, got {budget}")
    cheapest = float(np.min(costs))
    if budget < cheapest * (1 - 1e-9):
        suffix = f" {unit}" if unit else ""
        raise EenetError(
            f"budget {budget:g}{suffix} is below the cheapest exit's cost "
            f"{cheapest:g}{suffix}; choose a budget between {cheapest:g} and "
            f"{float(np.max(costs)):g}{suffix}"
        )
    return budget


def _check_costs(costs: Sequence[float] | np.ndarray, n_exits: int | None = None,
                 *, name: str = "costs") -> np.ndarray:
    """Return ``costs`` as float64 [n_exits]; finite, non-negative, non-decreasing."""
    arr = np.asarray(costs, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise EenetError(f"{name} must be a 1-D list of per-exit costs, got shape {arr.shape}")
    if n_exits is not None and arr.size != n_exits:
        raise EenetError(f"{name} has {arr.size} values but the cache has {n_exits} exits; "
                         f"give one cumulative cost per exit")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise EenetError(f"{name} must be finite and non-negative, got {arr.tolist()}")
    if np.any(np.diff(arr) < 0):
        raise EenetError(f"{name} must be cumulative (non-decreasing from the first exit to "
                         f"the last), got {arr.tolist()}")
    return arr


def parse_costs(text: str | Sequence[float] | None) -> np.ndarray | None:
    """Parse ``"1.2,3.4,5"`` (or ``;``-separated, or a sequence) into float64; ``None`` passes."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            return np.array([float(v) for v in text.replace(";", ",").split(",") if v.strip()],
                            dtype=np.float64)
        except ValueError:
            raise EenetError(f"costs {text!r} must be comma-separated numbers, e.g. "
                             f"'1.5,3,4.5,6'") from None
    try:
        return np.asarray(text, dtype=np.float64)
    except (TypeError, ValueError):
        raise EenetError(f"costs must be numbers, got {text!r}") from None


def _check_finite(name: str, arr: np.ndarray) -> None:
    """Raise if ``arr`` holds NaN or infinity, naming the first bad position."""
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise EenetError(f"{name} contains {int(bad.sum())} non-finite values "
                         f"(first at index {first}); remove or fix those samples")


def _check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Raise if ``value`` is not one of ``choices``, listing the valid ones."""
    choices = sorted(choices)
    if value not in choices:
        raise EenetError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


def _check_fraction(name: str, value: float, *, low_open: bool = True,
                    high_open: bool = True) -> float:
    """Raise unless ``value`` lies in (0, 1) (or with closed ends as asked)."""
    value = float(value)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok and np.isfinite(value)):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise EenetError(f"{name} must lie in {lo}0, 1{hi}, got {value}")
    return value
