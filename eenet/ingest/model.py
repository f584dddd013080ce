"""Load a frozen multi-exit model, run it batch by batch, and measure each exit's cost.

This is the only module that touches the backbone and DataLoaders; everything
after ``eenet cache`` works on the exit cache it writes.

The forward contract (DESIGN.md section 6): ``model(x)`` returns a list or
tuple of per-exit logits, one ``[batch, n_classes]`` tensor per exit, every
exit with the same ``n_classes``. A *staged* model also has ``stages`` and
``heads`` module lists of that length, with exit ``k`` equal to
``heads[k](stages[k](...stages[0](x)))``; eenet then times truncated forwards.

Costs are cumulative: exit ``k`` costs the backbone up to it plus every head
at or before it, since an exit policy evaluates the earlier heads to decide.

Example:
    >>> from eenet.ingest.model import cache_model
    >>> cache_model("eenet.examples.models:fashion_mnist_cnn4",
    ...             "fashion-mnist:val", "cache/val.h5")  # doctest: +SKIP
    PosixPath('cache/val.h5')
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import json
import logging
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from eenet._validation import CacheError, EenetError, check_choice, check_costs, parse_costs
from eenet.cache import CacheWriter

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
CostChoice = Literal["measured", "flops"]
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def _fashion_mnist(split: str, data_dir: str | os.PathLike | None) -> Dataset:
    from eenet.examples.fashion_mnist import SPLITS, load_fashion_mnist

    if split not in SPLITS:
        raise EenetError(f"unknown Fashion-MNIST split {split!r}; write the dataset as "
                         f"fashion-mnist:SPLIT with SPLIT one of: {', '.join(SPLITS)}")
    return load_fashion_mnist(split, data_dir)  # type: ignore[arg-type]


# Built-in dataset names for ``--data NAME:SPLIT``.
BUILTIN_DATASETS: dict[str, Callable[[str, str | os.PathLike | None], Dataset]] = {
    "fashion-mnist": _fashion_mnist,
}


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(obj: Any) -> str:
    """A short description of what a forward or a dataset returned."""
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {list(obj.shape)} ({obj.dtype})"
    if isinstance(obj, np.ndarray):
        return f"an array of shape {list(obj.shape)} ({obj.dtype})"
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(_describe(o) for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a {type(obj).__name__} of {len(obj)} [{inner}]"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)[:6]}"
    return f"{type(obj).__name__} {obj!r}"[:120]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EenetError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Let ``mymodels:net`` import from the working directory, as ``python -m`` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_object(spec: str, what: str) -> Any:
    """Resolve ``package.module:attr`` (attr may be dotted) to the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EenetError(f"{what} {spec!r} is not an import path; write it as "
                         f"package.module:function")
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise EenetError(f"{what} {spec!r}: no module named {missing!r}; check the "
                             f"spelling, install the package or run from the directory "
                             f"that holds it") from None
        raise EenetError(f"{what} {spec!r}: importing {module_name!r} failed because its "
                         f"dependency {missing!r} is not installed; install it") from None
    except Exception as err:
        raise EenetError(f"{what} {spec!r}: importing {module_name!r} raised "
                         f"{type(err).__name__}: {_first_line(err)}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EenetError(f"{what} {spec!r}: module {module_name!r} has no attribute "
                             f"{attr!r}; it defines: {_defined_here(module)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EenetError(f"{what} {spec!r} is a {type(obj).__name__}, not a function; "
                         f"point it at a function that takes no arguments")
    return obj


def _defined_here(module: Any) -> str:
    """Public functions, then classes, defined in ``module`` (not imported into it)."""
    own = [(inspect.isclass(obj), name) for name, obj in vars(module).items()
           if not name.startswith("_") and callable(obj)
           and getattr(obj, "__module__", None) == module.__name__]
    names = [name for _, name in sorted(own)]
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") or "nothing callable"


def _call_factory(fn: Callable[..., Any], spec: str, what: str, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except EenetError:
        raise
    except Exception as err:
        raise EenetError(f"{what} {spec!r} raised {type(err).__name__}: "
                         f"{_first_line(err)}") from err


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------
def resolve_device(device: Device | str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"`` or ``"cuda"`` (or ``"cuda:1"``) into a torch device.

    Args:
        device: ``"auto"`` picks CUDA when available, else the CPU.

    Raises:
        EenetError: an unknown name, or CUDA asked for but not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise EenetError(f"unknown device {device!r}; choose one of: auto, cpu, "
                             f"cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise EenetError(f"device {str(dev)!r} is not supported; choose one of: auto, cpu, "
                         f"cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EenetError(f"device {str(dev)!r} asked for but CUDA is not available to torch "
                         f"{torch.__version__}; use --device cpu or --device auto")
    return dev


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    if not path.is_file():
        raise EenetError(f"model file {path} not found; give a TorchScript archive "
                         f"(.pt/.pth/.ts) or a factory as package.module:function")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device)
    except Exception as err:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            if any(n.endswith("data.pkl") for n in names) and \
                    not any("/code/" in n for n in names):
                raise EenetError(f"{path} is a torch.save checkpoint, not a TorchScript "
                                 f"archive; give the model as a factory (--model "
                                 f"package.module:function) and this file as "
                                 f"--weights") from None
        raise EenetError(f"{path} is not a TorchScript archive ({_first_line(err)}); save "
                         f"the model with torch.jit.save, or give a factory as "
                         f"package.module:function") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EenetError(f"checkpoint {path} not found; check the --weights path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        text = str(err)
        if "Unsupported global" in text:
            raise EenetError(f"checkpoint {path} holds Python objects, not just tensors; "
                             f"save model.state_dict() with torch.save and pass that "
                             f"file") from None
        # torch's weights-only unpickler wraps any bad byte in a long advisory message.
        detail = "invalid data" if "Weights only load failed" in text else _first_line(err)
        raise EenetError(f"checkpoint {path} cannot be read ({detail}); it is "
                         f"corrupt or not a torch.save file, save it again with "
                         f"torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EenetError(f"checkpoint {path} is not a state dict (found {_describe(obj)}); "
                         f"save model.state_dict(), or a dict holding it under "
                         f"'state_dict' or 'model'")
    return dict(obj)


def _match_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                      path: Path) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    # Checkpoints saved from DataParallel/DistributedDataParallel prefix every key.
    if all(k.startswith("module.") for k in state) and \
            not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise EenetError(f"checkpoint {path} does not match the model: {'; '.join(parts)}; "
                         f"check that --weights belongs to --model")
    return state


def load_model(spec: str, weights: str | os.PathLike | None = None,
               device: Device | str | torch.device = "cpu") -> nn.Module:
    """Build or load a frozen multi-exit model.

    Args:
        spec: a factory import path ``package.module:function`` (called with no
            arguments, must return an ``nn.Module``), or the path of a
            TorchScript archive (``.pt``/``.pth``/``.ts``).
        weights: optional state dict file, read with
            ``torch.load(weights_only=True)``; a dict holding the state dict
            under ``state_dict`` or ``model`` also works.
        device: where to put the model (``"auto"``, ``"cpu"``, ``"cuda"``).

    Returns:
        The model on ``device``, in eval mode, with ``requires_grad`` off.

    Raises:
        EenetError: unknown module or function, a factory that returns no
            ``nn.Module``, a missing, corrupt or mismatching checkpoint.

    Example:
        >>> m = load_model("eenet.examples.models:fashion_mnist_cnn4")  # doctest: +SKIP
        >>> len(m.heads)  # doctest: +SKIP
        4
    """
    dev = resolve_device(device)
    spec = str(spec)
    path = Path(spec)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES or path.is_file():
        model: Any = _load_torchscript(path, dev)
        logger.info("loaded TorchScript model %s", path)
    elif ":" in spec:
        factory = _import_object(spec, "model factory")
        model = _call_factory(factory, spec, "model factory")
        if not isinstance(model, nn.Module):
            raise EenetError(f"model factory {spec!r} returned {_describe(model)}, not a "
                             f"torch.nn.Module; make it return the network")
    else:
        raise EenetError(f"model {spec!r} is neither a TorchScript file (.pt/.pth/.ts) nor "
                         f"an import path package.module:function")
    if weights is not None:
        wpath = Path(weights)
        state = _match_state_dict(model, _read_state_dict(wpath), wpath)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise EenetError(f"checkpoint {wpath} does not load into the model "
                             f"({_first_line(err)})") from None
        logger.info("loaded weights from %s", wpath)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------
def _is_label(y: Any) -> bool:
    if isinstance(y, bool):
        return False
    if isinstance(y, (int, np.integer)):
        return True
    if isinstance(y, (torch.Tensor, np.ndarray)) and y.ndim == 0:
        dtype = y.dtype
        if isinstance(y, torch.Tensor):
            return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        return np.issubdtype(dtype, np.integer)
    return False


def _check_item(item: Any, spec: str, index: int = 0) -> None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise EenetError(f"dataset {spec!r} yields {_describe(item)} at index {index}; "
                         f"expected (input, label) pairs with an integer class label")
    if not _is_label(item[1]):
        raise EenetError(f"dataset {spec!r}: the label of item {index} is "
                         f"{_describe(item[1])}; expected an int or a 0-d integer tensor "
                         f"(the class index)")


def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise EenetError(f"dataset file {path} not found")
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
        raise EenetError(f"{path} cannot be read as .npz ({_first_line(err)})") from None
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise EenetError(f"{path}: 'y' must be [n_samples] and 'x' [n_samples, ...], got "
                         f"x {list(x.shape)} and y {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and \
                np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise EenetError(f"{path}: 'y' must hold integer class labels, got dtype "
                             f"{y.dtype}")
    if y.size and y.min() < 0:
        raise EenetError(f"{path}: 'y' holds negative labels (min {y.min()}); labels are "
                         f"class indices from 0")
    # Floating inputs go to the model as float32; integer inputs (token ids) stay as stored.
    x_t = torch.from_numpy(x.astype(np.float32) if np.issubdtype(x.dtype, np.floating)
                           else x)
    return TensorDataset(x_t, torch.from_numpy(y.astype(np.int64)))


def _builtin_name(spec: str) -> tuple[str, str] | None:
    name, _, split = spec.partition(":")
    if name.lower() in BUILTIN_DATASETS:
        return name.lower(), split
    return None


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a dataset of (input tensor, int label) pairs.

    Args:
        spec: a built-in name ``fashion-mnist:train|val|test``, an ``.npz``
            file with arrays ``x`` [n_samples, ...] and ``y`` [n_samples], or a
            factory ``package.module:function`` returning a ``Dataset``
            (called with ``data_dir=`` when given and the function accepts it).
        data_dir: where the built-in dataset's files lie.

    Returns:
        The dataset; map-style datasets have been checked on their first item.

    Raises:
        EenetError: unknown name or split, missing file, an empty dataset, or
            items that are not (input, integer label) pairs.

    Example:
        >>> ds = load_dataset("fashion-mnist:val")  # doctest: +SKIP
        >>> len(ds)  # doctest: +SKIP
        10000
    """
    spec = str(spec)
    builtin = _builtin_name(spec)
    if builtin is not None:
        name, split = builtin
        dataset = BUILTIN_DATASETS[name](split, data_dir)
    elif spec.lower().endswith(".npz"):
        dataset = _load_npz(Path(spec))
    elif ":" in spec and not Path(spec).exists():
        factory = _import_object(spec, "dataset factory")
        kwargs = {}
        if data_dir is not None and "data_dir" in _parameters(factory):
            kwargs["data_dir"] = data_dir
        dataset = _call_factory(factory, spec, "dataset factory", **kwargs)
    else:
        raise EenetError(f"dataset {spec!r} is not a built-in name ("
                         f"{', '.join(n + ':SPLIT' for n in BUILTIN_DATASETS)}), an .npz "
                         f"file or an import path package.module:function")
    if isinstance(dataset, IterableDataset):
        return dataset  # checked on its first batch by run_exits
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise EenetError(f"dataset {spec!r} is {_describe(dataset)}, not a "
                         f"torch.utils.data.Dataset with __getitem__ and __len__")
    if len(dataset) == 0:
        raise EenetError(f"dataset {spec!r} is empty")
    try:
        first = dataset[0]
    except Exception as err:
        raise EenetError(f"dataset {spec!r}: reading item 0 raised {type(err).__name__}: "
                         f"{_first_line(err)}") from err
    _check_item(first, spec)
    return dataset


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


# ---------------------------------------------------------------------------
# running the exits
# ---------------------------------------------------------------------------
def _to_device(x: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device, non_blocking) for v in x)
    return x


def _rows(x: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` of every tensor in a (possibly nested) batch."""
    if isinstance(x, torch.Tensor):
        return x[index.to(x.device)]
    if isinstance(x, Mapping):
        return {k: _rows(v, index) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_rows(v, index) for v in x)
    return x


def _batch_len(x: Any) -> int:
    for leaf in tree_leaves(x):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])
    raise EenetError(f"the model input is {_describe(x)}; expected a tensor whose first "
                     f"axis is the batch")


def _exit_logits(outs: Any, batch: int,
                 expect: tuple[int, int] | None = None) -> torch.Tensor:
    """Check the forward contract and stack: K x [batch, C] -> [batch, K, C]."""
    wanted = ("a list or tuple of per-exit logits, one [batch, n_classes] tensor per exit "
              "(return [exit0_logits, exit1_logits, ...])")
    if isinstance(outs, torch.Tensor):
        raise EenetError(f"the model's forward returned a single tensor of shape "
                         f"{list(outs.shape)}; expected {wanted}")
    if not isinstance(outs, (list, tuple)) or len(outs) == 0:
        raise EenetError(f"the model's forward returned {_describe(outs)}; expected {wanted}")
    for k, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.ndim != 2 or o.shape[0] != batch:
            raise EenetError(f"the model's forward returned {_describe(o)} for exit {k} "
                             f"with a batch of {batch}; expected a [{batch}, n_classes] "
                             f"tensor per exit")
    classes = [int(o.shape[1]) for o in outs]
    if len(set(classes)) > 1:
        raise EenetError(f"the model's exits have different class counts {classes}; every "
                         f"exit must give logits over the same n_classes")
    if classes[0] < 2:
        raise EenetError(f"the model's exits give {classes[0]} logit per sample; expected "
                         f"n_classes >= 2 class logits")
    if expect is not None and (len(outs), classes[0]) != expect:
        raise EenetError(f"a batch returned {len(outs)} exits x {classes[0]} classes, but "
                         f"the first batch returned {expect[0]} x {expect[1]}")
    return torch.stack([o.float() for o in outs], dim=1)  # K x [b, C] -> [b, K, C]


def _labels_of(y: Any, batch_index: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or \
            y.dtype.is_complex or y.dtype == torch.bool:
        raise EenetError(f"batch {batch_index} has labels {_describe(y)}; the dataset must "
                         f"yield (input, integer label) pairs")
    return y


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _grad_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """``inference_mode``; ``no_grad`` for TorchScript, whose graph executor can try to
    record inference tensors for autograd when its parameters require grad."""
    if isinstance(model, torch.jit.ScriptModule):
        return torch.no_grad()
    return torch.inference_mode()


def _forward(model: nn.Module, x: Any, where: str) -> Any:
    try:
        with _grad_off(model):
            return model(x)
    except EenetError:
        raise
    except Exception as err:
        raise EenetError(f"the model's forward failed on {where} (input {_describe(x)}): "
                         f"{type(err).__name__}: {_first_line(err)}; check that the "
                         f"dataset's inputs suit the model") from err


def run_exits(model: nn.Module, dataset: Dataset, *, device: Device | str | torch.device,
              batch_size: int = 256, num_workers: int = 0, limit: int | None = None,
              verbose: bool = True, autocast: bool = False
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run every exit on a dataset, one batch at a time.

    The arguments are checked when called; the batches come lazily, so the
    logits of the whole dataset are never held at once. The forward contract
    is checked on the first batch.

    Args:
        model: a multi-exit model; it is moved to ``device`` and put in eval mode.
        dataset: yields (input, integer label) pairs; read in order.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: samples per forward.
        num_workers: DataLoader worker processes.
        limit: use only the first ``limit`` samples.
        verbose: show a tqdm progress bar on stderr.
        autocast: run the forward under ``torch.autocast`` (bfloat16 on CPU,
            float16 on CUDA); logits come back as float32 anyway.

    Yields:
        ``(logits, labels)``: float32 [batch, n_exits, n_classes] and int64 [batch].

    Raises:
        EenetError: bad arguments; a forward that breaks the contract (not a
            list/tuple of [batch, n_classes] tensors with one class count) or
            fails; batches without integer labels.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> class Two(torch.nn.Module):
        ...     def forward(self, x):
        ...         return [x[:, :3], x[:, :3] * 2]
        >>> ds = TensorDataset(torch.randn(10, 5), torch.zeros(10, dtype=torch.long))
        >>> [l.shape for l, y in run_exits(Two(), ds, device="cpu", batch_size=4,
        ...                                verbose=False)]
        [(4, 2, 3), (4, 2, 3), (2, 2, 3)]
    """
    dev = resolve_device(device)
    batch_size = _check_int("batch_size", batch_size, 1)
    num_workers = _check_int("num_workers", num_workers, 0)
    if limit is not None:
        limit = _check_int("limit", limit, 1)
    total: int | None = None
    if not isinstance(dataset, IterableDataset):
        total = len(dataset)  # type: ignore[arg-type]
        if limit is not None and limit < total:
            dataset = Subset(dataset, range(limit))
            total = limit
    elif limit is not None:
        total = limit
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    model.to(dev).eval()
    return _stream(model, loader, dev, total, limit, verbose, autocast)


def _stream(model: nn.Module, loader: DataLoader, device: torch.device, total: int | None,
            limit: int | None, verbose: bool, autocast: bool
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    non_blocking = device.type == "cuda"
    shape: tuple[int, int] | None = None
    seen = 0
    # Grad mode is switched off around each forward only (in _forward): a context
    # held across `yield` would leak into the consumer's code between batches.
    with tqdm(total=total, desc="caching exits", unit="sample", file=sys.stderr,
              disable=not verbose) as bar:
        for i, batch in enumerate(loader):
            if not isinstance(batch, (list, tuple)) or len(batch) != 2:
                raise EenetError(f"batch {i} is {_describe(batch)}; the dataset must yield "
                                 f"(input, integer label) pairs")
            x, y = batch
            y = _labels_of(y, i)
            if limit is not None and seen + y.shape[0] > limit:
                keep = torch.arange(limit - seen)
                x, y = _rows(x, keep), y[:limit - seen]
            x = _to_device(x, device, non_blocking)
            with _autocast(device, autocast):
                outs = _forward(model, x, f"batch {i}")
            logits = _exit_logits(outs, int(y.shape[0]), shape)
            shape = (logits.shape[1], logits.shape[2])
            seen += int(y.shape[0])
            bar.update(int(y.shape[0]))
            yield logits.cpu().numpy(), y.numpy().astype(np.int64, copy=False)
            if limit is not None and seen >= limit:
                break
    if seen == 0:
        raise EenetError("the dataset yielded no samples")


# ---------------------------------------------------------------------------
# per-exit costs
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CostReport:
    """Cumulative per-exit costs of a model, per sample.

    Attributes:
        latency_ms_batch1: [n_exits] median ms to produce each exit for one
            sample (one thread on CPU); ``None`` when not measured.
        latency_ms_batchB: [n_exits] median ms per sample at ``batch_size``
            (batch time / batch size); ``None`` when not measured.
        flops: [n_exits] FLOPs per sample counted by
            ``torch.utils.flop_counter`` (matmuls and convolutions).
        batch_size: the batch size of ``latency_ms_batchB``.
        num_threads: torch's CPU thread count for ``latency_ms_batchB``.
        device: where the latencies were measured.
        timing: ``"truncated"`` (staged model), ``"hooks"``, or ``""``.
        exit_modules: the modules timed by hooks, one per exit (else empty).
    """

    latency_ms_batch1: np.ndarray | None
    latency_ms_batchB: np.ndarray | None
    flops: np.ndarray
    batch_size: int = 1
    num_threads: int = 1
    device: str = "cpu"
    timing: str = ""
    exit_modules: tuple[str, ...] = ()

    @property
    def n_exits(self) -> int:
        return int(self.flops.shape[0])

    def vectors(self) -> dict[str, np.ndarray]:
        """Every cost vector computed, by name (the cache's extra cost vectors)."""
        named = {"latency_ms_batch1": self.latency_ms_batch1,
                 "latency_ms_batchB": self.latency_ms_batchB, "flops": self.flops}
        return {k: v for k, v in named.items() if v is not None}

    def pick(self, kind: CostChoice) -> tuple[np.ndarray, str, str]:
        """The cost vector for ``kind`` with its unit and source.

        Returns:
            ``(costs [n_exits], cost_unit, cost_source)``: ``measured`` gives
            ``(latency_ms_batch1, "ms", "measured")``, ``flops`` gives
            ``(flops, "flops", "flops")``.
        """
        check_choice("cost kind", kind, ("measured", "flops"))
        if kind == "flops":
            return self.flops, "flops", "flops"
        if self.latency_ms_batch1 is None:
            raise EenetError("per-exit latency was not measured for this model; use "
                             "--costs flops or give explicit costs")
        return self.latency_ms_batch1, "ms", "measured"


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _OpGraph(TorchDispatchMode):
    """Record every aten op's FLOPs and the earlier ops its inputs came from.

    Written by hand: ``FlopCounterMode`` totals FLOPs by module, but per-exit
    cumulative FLOPs need the ops each exit depends on, whatever order the
    forward (or TorchScript's scheduler) runs them in.
    """

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.flops: list[int] = []
        self.deps: list[tuple[int, ...]] = []
        self.producer: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while tracing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        deps = {self.producer[id(t)] for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and id(t) in self.producer}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        index = len(self.flops)
        self.flops.append(self.counter.get_total_flops() - before)
        self.deps.append(tuple(deps))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.producer[id(t)] = index
                self._alive.append(t)
        return out

    def ancestors(self, t: torch.Tensor) -> set[int]:
        start = self.producer.get(id(t))
        if start is None:
            return set()
        seen, todo = {start}, [start]
        while todo:
            for d in self.deps[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen


def _exit_flops(model: nn.Module, x1: Any) -> np.ndarray:
    """Cumulative FLOPs per exit for one sample: the ops that exits 0..k depend on."""
    counter = FlopCounterMode(display=False)
    with _grad_off(model), counter, _OpGraph(counter) as graph:
        outs = model(x1)
    used: set[int] = set()
    flops = []
    for o in outs:
        used |= graph.ancestors(o)
        flops.append(sum(graph.flops[i] for i in used))
    return np.asarray(flops, dtype=np.float64)


def _staged_parts(model: nn.Module, n_exits: int
                  ) -> tuple[list[nn.Module], list[nn.Module]] | None:
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.Module) or not isinstance(heads, nn.Module):
        return None
    try:
        if len(stages) != n_exits or len(heads) != n_exits:  # type: ignore[arg-type]
            logger.info("model has %d stages and %d heads for %d exits; not treating it as "
                        "staged", len(stages), len(heads), n_exits)  # type: ignore[arg-type]
            return None
        return ([stages[i] for i in range(n_exits)],  # type: ignore[index]
                [heads[i] for i in range(n_exits)])  # type: ignore[index]
    except (TypeError, IndexError, KeyError, RuntimeError):
        return None


def _truncated(stages: Sequence[nn.Module], heads: Sequence[nn.Module],
               k: int) -> Callable[[Any], list[torch.Tensor]]:
    """The forward of a staged model stopped after exit ``k`` (heads 0..k included)."""
    def run(x: Any) -> list[torch.Tensor]:
        with _grad_off(stages[0]):
            outs = []
            for j in range(k + 1):
                x = stages[j](x)
                outs.append(heads[j](x))
            return outs
    return run


def _staged_agrees(stages: Sequence[nn.Module], heads: Sequence[nn.Module], x1: Any,
                   outs: Sequence[torch.Tensor]) -> bool:
    mine = _truncated(stages, heads, len(stages) - 1)(x1)
    return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3,
                                                     atol=1e-4)
               for a, b in zip(mine, outs))


def _time_truncated(stages: Sequence[nn.Module], heads: Sequence[nn.Module], x: Any,
                    threads: int, min_run_time: float) -> np.ndarray:
    """Median seconds per forward truncated after each exit, [n_exits]."""
    out = []
    for k in range(len(stages)):
        timer = benchmark.Timer(stmt="run(x)", globals={"run": _truncated(stages, heads, k),
                                                        "x": x},
                                num_threads=threads, label="eenet exit cost",
                                description=f"exit {k}")
        out.append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return np.asarray(out, dtype=np.float64)


def _find_exit_modules(model: nn.Module, x1: Any, n_exits: int,
                       names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The submodule whose output is each exit's logits, named or found by one forward."""
    if isinstance(model, torch.jit.ScriptModule):
        raise EenetError("cannot time each exit of a TorchScript model without stages and "
                         "heads (it takes no forward hooks); use --costs flops or give "
                         "explicit per-exit costs")
    modules = dict(model.named_modules())
    if names is not None:
        names = list(names)
        if len(names) != n_exits:
            raise EenetError(f"exit_modules names {len(names)} modules for {n_exits} exits; "
                             f"give one module name per exit")
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            sample = ", ".join(n for n in list(modules)[1:13])
            raise EenetError(f"exit_modules {unknown} are not submodules of the model; "
                             f"known names include: {sample}")
        found = names
    else:
        records: list[tuple[str, torch.Tensor]] = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                records.extend((name, t) for t in tree_leaves(output)
                               if isinstance(t, torch.Tensor))
            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items() if n]
        try:
            with torch.inference_mode():
                outs = model(x1)
        finally:
            for h in handles:
                h.remove()
        found = []
        for k, o in enumerate(outs):
            # The last hook to fire with this tensor is the outermost module producing it.
            same = [n for n, t in records if t is o]
            if not same:
                ptr = o.untyped_storage().data_ptr()
                same = [n for n, t in records if t.untyped_storage().data_ptr() == ptr]
            if not same:
                raise EenetError(f"cannot tell which module produces exit {k} (it is not a "
                                 f"submodule's output, e.g. computed by a function inside "
                                 f"forward); name one module per exit with exit_modules "
                                 f"(--exit-modules), or use --costs flops or explicit costs")
            found.append(same[-1])
    if len(set(found)) != len(found):
        raise EenetError(f"exits share modules {found}; per-exit timing by hooks needs a "
                         f"distinct module per exit: use --costs flops or explicit costs")
    return [(n, modules[n]) for n in found]


def _time_hooks(model: nn.Module, modules: Sequence[nn.Module], x: Any, repeats: int,
                min_run_time: float, sync: bool) -> np.ndarray:
    """Median seconds from forward start to each exit module's output, [n_exits]."""
    stamps: list[float | None] = [None] * len(modules)

    def make_hook(k: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if stamps[k] is None:
                if sync:
                    torch.cuda.synchronize()
                stamps[k] = time.perf_counter()
        return hook

    handles = [m.register_forward_hook(make_hook(k)) for k, m in enumerate(modules)]
    rows = []
    try:
        with torch.inference_mode():
            for _ in range(2):  # warm-up: allocator, caches, lazy initialisation
                model(x)
            started = time.perf_counter()
            # At least 3 runs; stop at `repeats`, or earlier once 5 x min_run_time is spent.
            while len(rows) < repeats and (len(rows) < 3 or
                                           time.perf_counter() - started < 5 * min_run_time):
                stamps[:] = [None] * len(modules)
                if sync:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x)
                if any(s is None for s in stamps):
                    raise EenetError("an exit module did not run during the forward; name "
                                     "the modules that produce the exits with exit_modules")
                rows.append([s - t0 for s in stamps])  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return np.median(np.asarray(rows, dtype=np.float64), axis=0)


def _monotone(name: str, values: np.ndarray) -> np.ndarray:
    """Cumulative costs cannot fall; timing noise between near-equal exits can make them."""
    fixed = np.maximum.accumulate(values)
    if np.any(fixed > values * (1 + 0.05)):
        logger.warning("%s was not increasing across exits (%s); later exits were raised to "
                       "the earlier maximum", name, np.array2string(values, precision=4))
    return fixed


def measure_costs(model: nn.Module, example_input: Any, *,
                  device: Device | str | torch.device, batch_size: int, repeats: int = 20,
                  min_run_time: float = 0.2, exit_modules: Sequence[str] | None = None,
                  timing: bool = True) -> CostReport:
    """Measure the cumulative latency and FLOPs of every exit, per sample.

    Latency is the median time to produce exit ``k``, counting the backbone
    up to it and every head at or before it:

    - staged models (``stages``/``heads``): ``torch.utils.benchmark.Timer``
      ``blocked_autorange`` on the forward truncated after exit ``k``;
    - other models: forward hooks on the module producing each exit (named in
      ``exit_modules`` or found by matching the returned tensors), timed with
      ``time.perf_counter`` from the forward's start, median over ``repeats``.

    ``latency_ms_batch1`` is measured at batch 1 with one thread on CPU;
    ``latency_ms_batchB`` at ``batch_size`` with torch's thread count, divided
    by ``batch_size``. FLOPs come from ``torch.utils.flop_counter`` at batch 1,
    counting for exit ``k`` every op that exits ``0..k`` depend on. Noise can
    make two near-equal exits time out of order; such latencies are raised to
    the running maximum so the vectors stay cumulative.

    Args:
        model: the multi-exit model (moved to ``device``, eval mode).
        example_input: a batch of model inputs [b, ...] with b >= 1; row 0 is
            the batch-1 input and the rows are cycled to fill ``batch_size``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: batch size of ``latency_ms_batchB``.
        repeats: forwards per hook-timed measurement (at most).
        min_run_time: seconds per ``Timer.blocked_autorange`` measurement;
            small values make measuring fast and noisy.
        exit_modules: names (as in ``model.named_modules()``) of the module
            producing each exit, for non-staged models.
        timing: measure latencies; with ``False`` only FLOPs are counted.

    Returns:
        A :class:`CostReport`.

    Raises:
        EenetError: the forward breaks the contract, or per-exit timing is
            impossible (a TorchScript model without stages and heads, exits
            not produced by distinct submodules).

    Example:
        >>> import torch
        >>> from eenet.examples.models import MultiExitCNN
        >>> r = measure_costs(MultiExitCNN(4), torch.zeros(1, 1, 28, 28), device="cpu",
        ...                   batch_size=8, min_run_time=0.01)
        >>> bool((r.flops[1:] > r.flops[:-1]).all())
        True
    """
    dev = resolve_device(device)
    batch_size = _check_int("batch_size", batch_size, 1)
    repeats = _check_int("repeats", repeats, 1)
    if not min_run_time > 0:
        raise EenetError(f"min_run_time must be positive, got {min_run_time}")
    n_rows = _batch_len(example_input)
    x1 = _to_device(_rows(example_input, torch.zeros(1, dtype=torch.long)), dev, False)
    model = model.to(dev).eval()
    outs = _forward(model, x1, "the example input")
    n_exits = _exit_logits(outs, 1).shape[1]
    flops = _exit_flops(model, x1)
    if not timing:
        return CostReport(None, None, flops, batch_size=batch_size,
                          num_threads=torch.get_num_threads(), device=str(dev))
    xb = _to_device(_rows(example_input, torch.arange(batch_size) % n_rows), dev, False)
    threads = torch.get_num_threads()
    one = 1 if dev.type == "cpu" else threads
    names: tuple[str, ...] = ()
    staged = _staged_parts(model, n_exits)
    if staged is not None and not _staged_agrees(*staged, x1, outs):
        logger.warning("the model's stages and heads do not reproduce its forward; timing "
                       "exits with hooks instead")
        staged = None
    if staged is not None:
        method = "truncated"
        t1 = _time_truncated(*staged, x1, one, min_run_time)
        tb = _time_truncated(*staged, xb, threads, min_run_time)
    else:
        method = "hooks"
        found = _find_exit_modules(model, x1, n_exits, exit_modules)
        names = tuple(n for n, _ in found)
        mods = [m for _, m in found]
        sync = dev.type == "cuda"
        with _num_threads(one):
            t1 = _time_hooks(model, mods, x1, repeats, min_run_time, sync)
        tb = _time_hooks(model, mods, xb, repeats, min_run_time, sync)
    lat1 = _monotone("latency_ms_batch1", t1 * 1e3)
    latb = _monotone("latency_ms_batchB", tb * 1e3 / batch_size)
    logger.info("per-exit latency (%s, %s): batch 1 %s ms, batch %d %s ms/sample; FLOPs %s",
                method, dev, np.array2string(lat1, precision=4), batch_size,
                np.array2string(latb, precision=4), np.array2string(flops, precision=0))
    return CostReport(lat1, latb, flops, batch_size=batch_size, num_threads=threads,
                      device=str(dev), timing=method, exit_modules=names)


# ---------------------------------------------------------------------------
# the `eenet cache` entry point
# ---------------------------------------------------------------------------
def _parse_costs(costs: str | Sequence[float]) -> tuple[str, np.ndarray | None]:
    """``"measured"``/``"flops"``, or explicit numbers (a sequence or ``"1,2.5,4"``)."""
    if isinstance(costs, str) and costs.strip().lower() in ("measured", "flops"):
        return costs.strip().lower(), None
    return "given", check_costs(parse_costs(costs), name="costs")


def _example_batch(dataset: Dataset, n: int, spec: str) -> Any:
    """The inputs of the first ``n`` items, collated into one batch."""
    if isinstance(dataset, IterableDataset):
        items = list(itertools.islice(iter(dataset), n))
    else:
        items = [dataset[i] for i in range(min(n, len(dataset)))]  # type: ignore[arg-type]
    if not items:
        raise EenetError(f"dataset {spec!r} is empty")
    _check_item(items[0], spec)
    try:
        return default_collate([item[0] for item in items])
    except (TypeError, RuntimeError) as err:
        raise EenetError(f"dataset {spec!r}: its inputs cannot be batched "
                         f"({_first_line(err)}); every input must be a tensor of the same "
                         f"shape") from None


def _seeded(seed: int, device: torch.device) -> contextlib.AbstractContextManager:
    devices = [device.index or 0] if device.type == "cuda" else []

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    return ctx()


def _split_of(data_spec: str) -> str:
    builtin = _builtin_name(str(data_spec))
    return builtin[1] if builtin is not None else ""


def cache_model(model_spec: str, data_spec: str, out: str | os.PathLike, *,
                weights: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None,
                split: str | None = None, device: Device | str = "auto",
                batch_size: int = 256, num_workers: int = 0, limit: int | None = None,
                costs: str | Sequence[float] = "measured", cost_unit_given: str = "ms",
                dtype: Literal["float32", "float16"] = "float32",
                exit_modules: Sequence[str] | None = None, verbose: bool = True,
                seed: int = 0, min_run_time: float = 0.2, repeats: int = 20,
                autocast: bool = False, time_exits: bool = True) -> Path:
    """Run a frozen multi-exit model on a dataset split and write its exit cache.

    What ``eenet cache`` calls. Everything cheap is checked first (arguments,
    output directory, model, dataset, the forward contract on one sample,
    the explicit cost count, the per-exit costs); then the dataset streams
    batch by batch into the cache, written atomically: on any error nothing
    is left at ``out``.

    Args:
        model_spec: factory ``package.module:function`` or TorchScript file.
        data_spec: ``fashion-mnist:train|val|test``, an ``.npz`` with ``x``
            and ``y``, or a factory ``package.module:function``.
        out: the ``.h5`` file to write; its directory must exist.
        weights: optional state dict for the model.
        data_dir: where the built-in dataset's files lie.
        split: split name to record; parsed from ``NAME:SPLIT`` when omitted.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size, num_workers, limit: as in :func:`run_exits`; ``batch_size``
            is also the batch of ``latency_ms_batchB``.
        costs: the cache's ``costs``: ``"measured"`` (``latency_ms_batch1``,
            ms), ``"flops"``, or explicit cumulative numbers (one per exit; a
            sequence or ``"1,2.5,4"``), recorded as ``given``.
        cost_unit_given: the unit of explicit costs.
        dtype: storage dtype of the logits.
        exit_modules: module names producing each exit, for hook timing.
        verbose: progress bar on stderr.
        seed: torch seed for the run (restored afterwards), recorded.
        min_run_time, repeats: timing effort, see :func:`measure_costs`.
        autocast: run the forward under ``torch.autocast`` (see
            :func:`run_exits`); recorded as the root attribute ``autocast``.
        time_exits: with ``flops`` or explicit costs, still time every exit
            and store the latencies as extra cost vectors (default); False
            skips the timing. ``measured`` costs always time.

    Returns:
        The path of the written cache.

    Raises:
        EenetError: any bad input; the message says what and how to fix it.
        CacheError: the output directory does not exist.
    """
    out = Path(out)
    kind, given = _parse_costs(costs)
    check_choice("dtype", dtype, ("float32", "float16"))
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    if limit is not None:
        limit = _check_int("limit", limit, 1)
    seed = _check_int("seed", seed, 0)
    if out.is_dir():
        raise CacheError(f"{out}: is a directory; give a file name such as {out / 'val.h5'}")
    if not out.parent.is_dir():
        raise CacheError(f"{out}: output directory {out.parent} does not exist; create it "
                         f"first")
    dev = resolve_device(device)
    split = split if split is not None else _split_of(data_spec)
    model = load_model(model_spec, weights, dev)
    dataset = load_dataset(data_spec, data_dir)
    example = _example_batch(dataset, batch_size, str(data_spec))
    with _seeded(seed, dev):
        first = _to_device(_rows(example, torch.zeros(1, dtype=torch.long)), dev, False)
        outs = _forward(model, first, "the first sample")
        n_exits, n_classes = _exit_logits(outs, 1).shape[1:]
        if given is not None and given.size != n_exits:
            raise EenetError(f"costs has {given.size} values but the model has {n_exits} "
                             f"exits; give one cumulative cost per exit")
        try:
            if not (time_exits or kind == "measured"):
                raise EenetError("timing switched off")
            report = measure_costs(model, example, device=dev, batch_size=batch_size,
                                   repeats=repeats, min_run_time=min_run_time,
                                   exit_modules=exit_modules)
        except EenetError as err:
            if kind == "measured":
                raise
            logger.info("per-exit latency not measured (%s)", err)
            report = measure_costs(model, example, device=dev, batch_size=batch_size,
                                   timing=False)
        if given is not None:
            chosen, unit, source = given, cost_unit_given, "given"
        else:
            chosen, unit, source = report.pick(kind)  # type: ignore[arg-type]
            if not np.any(chosen > 0):
                raise EenetError(f"every exit costs 0 {unit} by torch's counter (no matmul or "
                                 f"convolution ops); use --costs measured or explicit costs")
        attrs = {"device": str(dev), "seed": seed, "batch_size": batch_size,
                 "num_threads": report.num_threads, "torch_version": str(torch.__version__),
                 "weights": "" if weights is None else str(weights),
                 "timing": report.timing, "exit_modules": json.dumps(list(report.exit_modules)),
                 "autocast": bool(autocast)}
        stream = run_exits(model, dataset, device=dev, batch_size=batch_size,
                           num_workers=num_workers, limit=limit, verbose=verbose,
                           autocast=autocast)
        with contextlib.closing(stream), \
                CacheWriter(out, n_exits=n_exits, n_classes=n_classes, dtype=dtype,
                            model=str(model_spec), dataset=str(data_spec), split=split,
                            attrs=attrs, with_sample_ids=True) as writer:
            for logits, labels in stream:
                writer.write(logits, labels)
            writer.set_costs(chosen, cost_unit=unit, cost_source=source,
                             extra=report.vectors())
    logger.info("wrote %s: %d samples, %d exits, costs %s %s (%s)", out, writer.n_written,
                n_exits, np.array2string(np.asarray(chosen), precision=4), unit, source)
    return out
