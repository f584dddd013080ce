"""Turn logits or probabilities a user already has into an exit cache.

Accepted sources:

* ``.npz`` with ``logits`` *or* ``probs`` [n_samples, n_exits, n_classes],
  ``labels`` [n_samples] and optionally ``costs`` [n_exits];
* ``.npy`` holding one array (labels and costs come from arguments);
* ``.pt`` / ``.pth`` loaded with ``torch.load(weights_only=True)``: a tensor,
  a list or tuple of per-exit [n_samples, n_classes] tensors, or a dict with
  the same keys as the ``.npz``.

Per-exit hidden features may come too, stored as the cache's optional
``features_k`` (float16, as given, not projected): in an ``.npz`` as arrays
``features_0``, ``features_1``, ... (one ``[n_samples, d_k]`` per exit); in a
``.pt`` dict as the same keys or as ``features``, a list of one tensor per exit.

Probabilities are stored as log-probabilities (their softmax gives back the
probabilities), with the root attribute ``logits_kind = "log_probs"``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from eenet._validation import (EenetError, check_costs, check_labels, check_not_input,
                               first_line, parse_costs, torch_load_problem)
from eenet.cache import ExitCache, write_cache

Layout = Literal["nkc", "knc"]
_PROB_FLOOR = 1e-30  # log(0) would be -inf; anything this small is "impossible" already


def _load_any(path: Path, what: str) -> Any:
    """Load an ``.npz``, ``.npy``, ``.pt``/``.pth`` or text file into numpy-friendly objects."""
    if not path.is_file():
        raise EenetError(f"{what} file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".pt", ".pth"):
            import torch

            return torch.load(path, map_location="cpu", weights_only=True)
        if suffix in (".txt", ".csv"):
            return np.loadtxt(path, delimiter="," if suffix == ".csv" else None)
    except Exception as err:  # numpy, zipfile and torch's unpickler raise many types
        why = (torch_load_problem(err, path) if suffix in (".pt", ".pth")
               else first_line(err))
        raise EenetError(f"{what} file {path} cannot be read ({why}); it is corrupt, or not "
                         f"plain tensors, lists or dicts (torch.load runs no code here): save "
                         f"it again") from None
    raise EenetError(f"{what} file {path} has an unsupported extension {suffix!r}; "
                     f"use .npz, .npy, .pt or .pth")


def _to_numpy(value: Any, name: str, path: Path) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().float().numpy() if value.is_floating_point() \
                else value.detach().cpu().numpy()
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor)
                                                              for v in value):
            # a list of per-exit [n_samples, n_classes] outputs -> [n_samples, n_exits, n_classes]
            shapes = {tuple(v.shape) for v in value}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise EenetError(f"{path}: {name} is a list of exit outputs with shapes "
                                 f"{sorted(shapes)}; expected one [n_samples, n_classes] "
                                 f"tensor per exit")
            return torch.stack([v.detach().cpu().float() for v in value], dim=1).numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        return np.asarray(value)
    except Exception:
        raise EenetError(f"{path}: {name} of type {type(value).__name__} is not an "
                         f"array") from None


def _label_vector(labels: np.ndarray, path: Path) -> np.ndarray:
    """Labels as stored: [n] or a [n, 1] / [1, n] column, as a 1-D array."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and 1 in labels.shape:
        labels = labels.reshape(-1)
    if labels.ndim != 1:
        raise EenetError(f"{path}: labels must be a 1-D array of class indices, got shape "
                         f"{labels.shape}")
    return labels


def load_exit_outputs(src: str | os.PathLike, *, labels: str | os.PathLike | None = None,
                      costs: Sequence[float] | str | None = None, cost_unit: str = "ms",
                      costs_from: str | os.PathLike | None = None,
                      layout: Layout = "nkc", probs: bool = False, model: str = "",
                      dataset: str = "", split: str = "") -> ExitCache:
    """Read existing exit outputs into an in-memory :class:`ExitCache`.

    Args:
        src: ``.npz``, ``.npy`` or ``.pt``/``.pth`` (see the module docstring).
        labels: a separate labels file (``.npy``, ``.npz`` with ``labels``,
            ``.pt``, ``.txt``); required when ``src`` carries none.
        costs: cumulative per-exit costs; overrides costs stored in ``src``.
        cost_unit: unit of the costs.
        costs_from: an exit cache whose cost vectors (costs, unit, source and
            every extra vector) this cache reuses, recorded in the root
            attribute ``costs_from``; excludes ``costs``.
        layout: ``"nkc"`` for [n_samples, n_exits, n_classes] (default) or
            ``"knc"`` for [n_exits, n_samples, n_classes].
        probs: the array holds probabilities, not logits (implied by a
            ``probs`` key).
        model, dataset, split: provenance written to the cache.

    Returns:
        The cache (not yet written; see :func:`import_exit_outputs`).

    Raises:
        EenetError: a missing file, an unknown key or layout, shapes that do
            not fit, probabilities that do not sum to one, missing costs.
    """
    src = Path(src)
    if costs is not None and costs_from is not None:
        raise EenetError("give either --costs or --costs-from, not both")
    if layout not in ("nkc", "knc"):
        raise EenetError(f"layout must be 'nkc' or 'knc', got {layout!r}")
    array, stored, probs = _read_outputs(src, layout, probs)
    stored_probs = bool(stored.pop("probs_key", False))
    label_arr = _read_labels(src, labels, stored.get("labels"), array.shape)
    if costs_from is not None:
        shared = _shared_costs(costs_from, array.shape[1])
    else:
        shared = {"costs": _given_costs(src, costs, stored.get("costs"), array.shape[1],
                                        cost_unit), "cost_unit": cost_unit}
    kind = "logits"
    if probs:
        array, kind = _log_probs(src, array, by_key=stored_probs), "log_probs"
    return ExitCache(logits=array, labels=label_arr, costs=shared["costs"],
                     cost_unit=shared["cost_unit"],
                     cost_source=shared.get("cost_source", "given"), model=model or src.stem,
                     dataset=dataset, split=split, logits_kind=kind,
                     extra_costs=shared.get("extra_costs", {}), attrs=shared.get("attrs", {}),
                     features=stored.get("features"))


def _read_outputs(src: Path, layout: Layout, probs: bool
                  ) -> tuple[np.ndarray, dict[str, Any], bool]:
    """float32 [n_samples, n_exits, n_classes] outputs, what else ``src`` stores, and
    whether they are probabilities."""
    raw = _load_any(src, "source")
    stored: dict[str, Any] = {}
    if isinstance(raw, dict):
        keys = sorted(map(str, raw))
        if "logits" in raw and "probs" in raw:
            raise EenetError(f"{src}: holds both 'logits' and 'probs'; keep one")
        if "probs" in raw:
            array, probs = raw["probs"], True
        elif "logits" in raw:
            array = raw["logits"]
        else:
            raise EenetError(f"{src}: expected a key 'logits' or 'probs' "
                             f"[n_samples, n_exits, n_classes], found keys {keys}")
        stored = {k: raw[k] for k in ("labels", "costs") if raw.get(k) is not None}
        stored["probs_key"] = "probs" in raw
        stored["features"] = _stored_features(raw, src)
    else:
        array = raw
    array = _to_numpy(array, "logits", src)
    _check_range(src, array, "float32")
    if array.ndim != 3:
        raise EenetError(f"{src}: exit outputs have shape {array.shape}; expected 3 "
                         f"dimensions [n_samples, n_exits, n_classes] (or [n_exits, n_samples, "
                         f"n_classes] with layout 'knc')")
    if not np.issubdtype(array.dtype, np.floating):
        raise EenetError(f"{src}: exit outputs must be floating point, got {array.dtype}")
    if layout == "knc":
        array = np.swapaxes(array, 0, 1)  # [n_exits, n_samples, n_classes] -> [n_samples, ...]
    return np.ascontiguousarray(array, dtype=np.float32), stored, probs


def _stored_features(raw: dict[str, Any], src: Path) -> list[np.ndarray] | None:
    """Per-exit features from ``features`` (a list) or ``features_0``, ``features_1``, ..."""
    numbered = sorted((k for k in map(str, raw) if re.fullmatch(r"features_\d+", k)),
                      key=lambda k: int(k.split("_")[1]))
    if "features" in raw and numbered:
        raise EenetError(f"{src}: holds both 'features' and {numbered[0]!r}; keep one form")
    if "features" in raw:
        listed = raw["features"]
        if not isinstance(listed, (list, tuple)):
            raise EenetError(f"{src}: 'features' must be a list of one [n_samples, d] "
                             f"tensor per exit, got {type(listed).__name__}")
        return [np.asarray(_to_numpy(v, f"features[{k}]", src)) for k, v in enumerate(listed)]
    if not numbered:
        return None
    want = [f"features_{k}" for k in range(len(numbered))]
    if numbered != want:
        raise EenetError(f"{src}: feature arrays {numbered} are not features_0 .. "
                         f"features_{len(numbered) - 1}; number them from 0, one per exit")
    return [np.asarray(_to_numpy(raw[k], k, src)) for k in numbered]


def _check_range(src: Path, array: np.ndarray, dtype: str) -> None:
    """Refuse finite exit outputs too large for ``dtype``, which storing would turn into inf.

    Args:
        array: exit outputs of any float dtype [n_samples, n_exits, n_classes].
        dtype: what the cache stores (``"float32"`` or ``"float16"``).
    """
    limit = float(np.finfo(dtype).max)
    if not np.issubdtype(array.dtype, np.floating) or np.finfo(array.dtype).max <= limit:
        return
    big = np.isfinite(array) & (np.abs(array) > limit)
    if big.any():
        where = tuple(int(i) for i in np.argwhere(big)[0])
        raise EenetError(f"{src}: exit outputs reach {float(array[where]):.4g} (first at index "
                         f"{where}), beyond the largest {dtype} ({limit:.4g}), so storing them "
                         f"would make them infinite; rescale them (subtracting each row's "
                         f"maximum changes no softmax)")


def _read_labels(src: Path, labels: str | os.PathLike | None, stored: Any,
                 shape: tuple[int, ...]) -> np.ndarray:
    """int64 [n_samples] labels from ``labels`` (a file) or those stored in ``src``."""
    if labels is not None:
        raw_labels = _load_any(Path(labels), "labels")
        if isinstance(raw_labels, dict):
            if "labels" not in raw_labels:
                raise EenetError(f"{labels}: expected a key 'labels', found "
                                 f"{sorted(map(str, raw_labels))}")
            raw_labels = raw_labels["labels"]
        stored = raw_labels
    if stored is None:
        raise EenetError(f"{src}: no labels; store them under 'labels' or pass --labels PATH")
    label_arr = _label_vector(_to_numpy(stored, "labels", src), src)
    n_samples, n_exits, n_classes = shape
    if label_arr.shape[0] != n_samples:
        hint = " (is the layout 'knc'?)" if label_arr.shape[0] == n_exits else ""
        raise EenetError(f"{src}: {n_samples} samples of exit outputs but "
                         f"{label_arr.shape[0]} labels{hint}")
    return check_labels(label_arr, n_samples, n_classes, where=f"{src}: ")


def _given_costs(src: Path, costs: Sequence[float] | str | None, stored: Any, n_exits: int,
                 cost_unit: str) -> np.ndarray:
    """float64 [n_exits] costs: ``costs`` when given, else those stored in ``src``."""
    cost_arr = parse_costs(costs) if costs is not None else (
        None if stored is None else _to_numpy(stored, "costs", src).astype(float))
    if cost_arr is None:
        raise EenetError(f"{src}: no per-exit costs; pass --costs c1,c2,... "
                         f"({n_exits} cumulative values in {cost_unit}) or "
                         f"--costs-from VAL.h5")
    return check_costs(cost_arr, n_exits)


def _log_probs(src: Path, array: np.ndarray, *, by_key: bool = False) -> np.ndarray:
    """Probabilities [n_samples, n_exits, n_classes] checked and turned into log-probabilities.

    ``by_key``: they are probabilities because ``src`` stores them under ``probs``
    (not because ``--probs`` said so), which the message's fix must name.
    """
    if not np.all(np.isfinite(array)):
        raise EenetError(f"{src}: probabilities contain NaN or inf; fix the source file")
    sums = array.sum(axis=2)
    if array.min() < 0 or array.max() > 1 or np.abs(sums - 1).max() > 1e-3:
        raise EenetError(f"{src}: values are not probabilities (each row must lie in "
                         f"[0, 1] and sum to 1, worst row sums to "
                         f"{sums.flat[np.abs(sums - 1).argmax()]:.4g}); "
                         + ("store logits under the key 'logits' instead of 'probs'"
                            if by_key else "drop --probs for logits"))
    return np.log(np.maximum(array, _PROB_FLOOR))


def _shared_costs(path: str | os.PathLike, n_exits: int) -> dict[str, Any]:
    """The cost vectors of the cache at ``path``, to record in another cache of the network."""
    from eenet.cache import read_costs

    src = read_costs(path).matching(n_exits)
    return {"costs": src.costs, "cost_unit": src.cost_unit, "cost_source": src.cost_source,
            "extra_costs": src.extra_costs, "attrs": src.provenance}


def import_exit_outputs(src: str | os.PathLike, out: str | os.PathLike, *,
                        dtype: Literal["float32", "float16"] = "float32",
                        **kwargs: Any) -> ExitCache:
    """Read ``src`` with :func:`load_exit_outputs` and write it to ``out`` atomically.

    Example:
        >>> import numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> np.savez(os.path.join(d, "val.npz"), logits=np.random.randn(8, 3, 5),
        ...          labels=np.arange(8) % 5, costs=[1.0, 2.0, 3.0])
        >>> import_exit_outputs(os.path.join(d, "val.npz"), os.path.join(d, "val.h5")).n_exits
        3
    """
    check_not_input(out, {"src": src, "labels": kwargs.get("labels"),
                          "costs_from": kwargs.get("costs_from")}, option="out")
    cache = load_exit_outputs(src, **kwargs)
    _check_range(Path(src), cache.logits, dtype)
    write_cache(out, cache, dtype=dtype)
    return cache
