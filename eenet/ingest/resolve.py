"""Resolve ``package.module:function`` import paths, and describe what came back.

Models and datasets reach eenet as import paths typed on the command line;
this module turns them into objects and, when that fails, into one line that
says what went wrong and how to fix it. Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterator

from eenet._validation import EenetError, first_line

__all__ = ["call_factory", "describe", "import_object", "parameters"]


def describe(obj: Any) -> str:
    """A short description of what a forward or a dataset returned, for error messages.

    Example:
        >>> describe([1, (2, 3)])
        'a list of 2 [int 1, a tuple of 2 [int 2, int 3]]'
    """
    shape = getattr(obj, "shape", None)
    if shape is not None and hasattr(obj, "dtype") and not isinstance(obj, (int, float)):
        kind = "a tensor" if type(obj).__module__.startswith("torch") else "an array"
        return f"{kind} of shape {list(shape)} ({obj.dtype})"
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(describe(o) for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a {type(obj).__name__} of {len(obj)} [{inner}]"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)[:6]}"
    return f"{type(obj).__name__} {obj!r}"[:120]


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


def _defined_here(module: Any) -> str:
    """Public functions, then classes, defined in ``module`` (not imported into it)."""
    own = [(inspect.isclass(obj), name) for name, obj in vars(module).items()
           if not name.startswith("_") and callable(obj)
           and getattr(obj, "__module__", None) == module.__name__]
    names = [name for _, name in sorted(own)]
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") or "nothing callable"


def import_object(spec: str, what: str) -> Callable[..., Any]:
    """Resolve ``package.module:attr`` (``attr`` may be dotted) to a callable.

    Args:
        spec: the import path.
        what: what the object is, for messages (``"model factory"``).

    Raises:
        EenetError: a malformed path, a missing module or attribute, an
            import that fails, or an object that is not callable.

    Example:
        >>> import_object("os.path:join", "function")("a", "b")
        'a/b'
    """
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
                         f"{type(err).__name__}: {first_line(err)}") from err
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


def call_factory(fn: Callable[..., Any], spec: str, what: str, **kwargs: Any) -> Any:
    """Call a user's factory; its failures become one line naming the factory."""
    try:
        return fn(**kwargs)
    except EenetError:
        raise
    except Exception as err:
        raise EenetError(f"{what} {spec!r} raised {type(err).__name__}: "
                         f"{first_line(err)}") from err


def parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """``fn``'s parameters by name; empty when its signature cannot be read."""
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
