"""Load the dataset a model is run on: ``.npz`` files, factories, and registered names.

``--data`` takes one of:

- a registered name ``NAME:SPLIT`` (``fashion-mnist:val`` once
  :mod:`eenet.examples` is imported; any package can add its own with
  :func:`register_dataset`);
- an ``.npz`` file with arrays ``x`` [n_samples, ...] and ``y`` [n_samples];
- a factory ``package.module:function`` returning a ``torch.utils.data.Dataset``.

Every dataset yields ``(input, integer label)`` pairs. This module knows no
particular dataset: the bundled example registers its own name, so nothing
that makes caches depends on the example. torch is imported on use, so
registering a name stays cheap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from eenet._validation import EenetError, check_labels, first_line
from eenet.ingest.resolve import call_factory, describe, import_object, parameters

__all__ = ["DatasetLoader", "check_item", "dataset_split", "load_dataset", "register_dataset",
           "registered_datasets"]

#: ``loader(split, data_dir) -> Dataset``
DatasetLoader = Callable[[str, "str | os.PathLike | None"], Any]


@dataclass(frozen=True)
class _Registered:
    loader: DatasetLoader | str
    splits: tuple[str, ...]


_REGISTRY: dict[str, _Registered] = {}


def register_dataset(name: str, loader: DatasetLoader | str,
                     splits: Sequence[str] = ()) -> None:
    """Make ``NAME:SPLIT`` a valid ``--data`` value.

    Args:
        name: the dataset's name (case-insensitive), e.g. ``"fashion-mnist"``.
        loader: ``loader(split, data_dir)`` returning a ``Dataset``, or its import
            path ``"package.module:function"``, imported only when the name is used.
        splits: the valid split names; empty accepts any.

    Raises:
        EenetError: an empty name or one containing ``:``.

    Example:
        >>> register_dataset("toy-doc", "eenet.examples.fashion_mnist:load_fashion_mnist",
        ...                  splits=("val",))
        >>> "toy-doc" in registered_datasets()
        True
    """
    key = str(name).strip().lower()
    if not key or ":" in key:
        raise EenetError(f"dataset name {name!r} must be non-empty and contain no ':'; "
                         f"choose a name such as 'my-data'")
    _REGISTRY[key] = _Registered(loader, tuple(str(s) for s in splits))


def registered_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_REGISTRY)


def _registered(spec: str) -> tuple[str, str] | None:
    name, _, split = spec.partition(":")
    if name.lower() in _REGISTRY:
        return name.lower(), split
    return None


def dataset_split(spec: str) -> str:
    """The split of a registered ``NAME:SPLIT`` spec; ``""`` for files and factories.

    Example:
        >>> dataset_split("data/val.npz")
        ''
    """
    found = _registered(str(spec))
    return found[1] if found is not None else ""


def _load_registered(name: str, split: str, data_dir: str | os.PathLike | None) -> Any:
    entry = _REGISTRY[name]
    if entry.splits and split not in entry.splits:
        raise EenetError(f"unknown split {split!r} of dataset {name!r}; write it as "
                         f"{name}:SPLIT with SPLIT one of: {', '.join(entry.splits)}")
    loader = entry.loader
    if isinstance(loader, str):
        loader = import_object(loader, f"loader of dataset {name!r}")
    return call_factory(lambda: loader(split, data_dir), name,  # type: ignore[operator]
                        "loader of dataset")


def _is_label(y: Any) -> bool:
    import torch

    if isinstance(y, bool):
        return False
    if isinstance(y, (int, np.integer)):
        return True
    if isinstance(y, (torch.Tensor, np.ndarray)) and y.ndim == 0:
        if isinstance(y, torch.Tensor):
            return not (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool)
        return bool(np.issubdtype(y.dtype, np.integer))
    return False


def check_item(item: Any, spec: str, index: int = 0) -> None:
    """Raise unless ``item`` is an ``(input, integer label)`` pair."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise EenetError(f"dataset {spec!r} yields {describe(item)} at index {index}; "
                         f"expected (input, label) pairs with an integer class label")
    if not _is_label(item[1]):
        raise EenetError(f"dataset {spec!r}: the label of item {index} is "
                         f"{describe(item[1])}; expected an int or a 0-d integer tensor "
                         f"(the class index)")


def _load_npz(path: Path) -> Any:
    import torch
    from torch.utils.data import TensorDataset

    if not path.is_file():
        raise EenetError(f"dataset file {path} not found; check the --data path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "x" not in keys or "y" not in keys:
                raise EenetError(f"{path} holds arrays {keys}; expected 'x' (inputs, first "
                                 f"axis = samples) and 'y' (integer labels)")
            x, y = npz["x"], npz["y"]
    except EenetError:
        raise
    except Exception as err:
        raise EenetError(f"{path} cannot be read as .npz ({first_line(err)}); save it with "
                         f"numpy.savez(path, x=inputs, y=labels)") from None
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise EenetError(f"{path}: 'y' must be [n_samples] and 'x' [n_samples, ...], got "
                         f"x {list(x.shape)} and y {list(y.shape)}")
    # Class count unknown here: any non-negative integer label is accepted.
    n_classes = int(np.nanmax(y)) + 1 if y.size and np.isfinite(y).all() else 1
    y = check_labels(y, y.shape[0], max(n_classes, 1), where=f"{path}: 'y' ")
    # Floating inputs go to the model as float32; integer inputs (token ids) stay as stored.
    x_t = torch.from_numpy(x.astype(np.float32) if np.issubdtype(x.dtype, np.floating)
                           else x)
    return TensorDataset(x_t, torch.from_numpy(y.astype(np.int64)))


def _from_spec(spec: str, data_dir: str | os.PathLike | None) -> Any:
    found = _registered(spec)
    if found is not None:
        return _load_registered(found[0], found[1], data_dir)
    if spec.lower().endswith(".npz"):
        return _load_npz(Path(spec))
    if ":" in spec and not Path(spec).exists():
        factory = import_object(spec, "dataset factory")
        kwargs = {}
        if data_dir is not None and "data_dir" in parameters(factory):
            kwargs["data_dir"] = data_dir
        return call_factory(factory, spec, "dataset factory", **kwargs)
    names = ", ".join(n + ":SPLIT" for n in registered_datasets()) or "none registered"
    raise EenetError(f"dataset {spec!r} is not a registered name ({names}), an .npz file "
                     f"or an import path package.module:function")


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None) -> Any:
    """Load a dataset of (input tensor, int label) pairs.

    Args:
        spec: a registered ``NAME:SPLIT``, an ``.npz`` file with arrays ``x``
            [n_samples, ...] and ``y`` [n_samples], or a factory
            ``package.module:function`` returning a ``Dataset`` (called with
            ``data_dir=`` when given and the function accepts it).
        data_dir: where a registered dataset's files lie.

    Returns:
        The ``torch.utils.data.Dataset``; map-style datasets have been
        checked on their first item.

    Raises:
        EenetError: unknown name or split, missing file, an empty dataset, or
            items that are not (input, integer label) pairs.

    Example:
        >>> import eenet.examples  # registers fashion-mnist  # doctest: +SKIP
        >>> len(load_dataset("fashion-mnist:val"))  # doctest: +SKIP
        10000
    """
    from torch.utils.data import IterableDataset

    spec = str(spec)
    dataset = _from_spec(spec, data_dir)
    if isinstance(dataset, IterableDataset):
        return dataset  # checked on its first batch while streaming
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise EenetError(f"dataset {spec!r} is {describe(dataset)}, not a "
                         f"torch.utils.data.Dataset with __getitem__ and __len__")
    if len(dataset) == 0:
        raise EenetError(f"dataset {spec!r} is empty; check the file or the split")
    try:
        first = dataset[0]
    except Exception as err:
        raise EenetError(f"dataset {spec!r}: reading item 0 raised {type(err).__name__}: "
                         f"{first_line(err)}") from err
    check_item(first, spec)
    return dataset
