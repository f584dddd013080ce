"""Small shared pieces: the error types, ``check_*`` validators, atomic output files,
seeding, devices and plain containers.

Every check raises :class:`EenetError` with one line that names the argument,
the bad value and what is allowed, so the command line can show it as is.
Nothing here imports torch at module level (devices and seeding import it
when called), so the cheap validators stay cheap.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "EenetError",
    "CacheError",
    "Interrupted",
    "atomic_output",
    "check_budget",
    "check_choice",
    "check_costs",
    "check_finite",
    "check_int",
    "check_labels",
    "check_not_input",
    "check_number",
    "first_line",
    "network_fingerprint",
    "output_target",
    "parse_costs",
    "pid_alive",
    "plain",
    "resolve_device",
    "same_file",
    "seeded",
    "remove_stale_temporaries",
    "terminate_on_signals",
    "torch_load_problem",
]

#: relative slack when comparing a cost with a budget
BUDGET_RTOL = 1e-9


class EenetError(ValueError):
    """A problem with the user's input or environment, explained in one line."""


class CacheError(EenetError):
    """An exit cache that cannot be read or written; the message names the file and key."""


class Interrupted(BaseException):
    """Raised when SIGTERM arrives, so ``finally`` blocks run and temporary files go.

    Derives from ``BaseException`` like ``KeyboardInterrupt``: nothing that
    catches ``Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty).

    Example:
        >>> first_line(OSError("disk full\\nmore detail")), first_line(KeyError())
        ('disk full', 'KeyError')
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------
# numbers, costs, labels
# ---------------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int, refusing bools, floats and anything below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EenetError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, *, low: float = -np.inf, high: float = np.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float inside ``[low, high]`` (ends open as asked)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise EenetError(f"{name} must be a number, got {value!r}") from None
    above = out > low if low_open else out >= low
    below = out < high if high_open else out <= high
    if not (np.isfinite(out) and above and below):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise EenetError(f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, "
                         f"got {value!r}")
    return out


def check_budget(budget: Any, costs: np.ndarray, *, unit: str = "") -> float:
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
    if budget < cheapest * (1 - BUDGET_RTOL):
        suffix = f" {unit}" if unit else ""
        raise EenetError(
            f"budget {budget:g}{suffix} is below the cheapest exit's cost "
            f"{cheapest:g}{suffix}; choose a budget between {cheapest:g} and "
            f"{float(np.max(costs)):g}{suffix}")
    return budget


def check_costs(costs: Sequence[float] | np.ndarray, n_exits: int | None = None,
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


def check_labels(labels: Any, n_samples: int, n_classes: int, *, where: str = "") -> np.ndarray:
    """Labels as int64 [n_samples] in ``[0, n_classes)``; integral floats are accepted."""
    labels = np.asarray(labels)
    if labels.shape != (n_samples,):
        raise EenetError(f"{where}labels must have shape ({n_samples},) to match the exit "
                         f"outputs, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        integral = (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
                    and np.all(labels == np.round(labels)))
        if not integral:
            raise EenetError(f"{where}labels must be integer class indices, got dtype "
                             f"{labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise EenetError(f"{where}labels must lie in [0, {n_classes}) for {n_classes} "
                         f"classes, got range [{labels.min()}, {labels.max()}]")
    return labels


def check_finite(name: str, arr: np.ndarray) -> None:
    """Raise if ``arr`` holds NaN or infinity, naming the first bad position."""
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise EenetError(f"{name} contains {int(bad.sum())} non-finite values "
                         f"(first at index {first}); remove or fix those samples")


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Raise if ``value`` is not one of ``choices``, listing the valid ones."""
    choices = sorted(choices)
    if value not in choices:
        raise EenetError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value


def plain(value: Any) -> Any:
    """NumPy scalars and arrays inside nested containers as plain Python values."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


# ---------------------------------------------------------------------------
# output paths: where a write lands, and that it destroys no input
# ---------------------------------------------------------------------------
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def output_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: ``path``, or what it links to.

    eenet writes every output whole under a temporary name and renames it over
    the target, so a symbolic link is followed (the file it names is replaced
    and the link stays) and anything that is not a regular file (a FIFO, a
    device, a socket) is refused rather than replaced.

    Raises:
        EenetError: ``path`` is a directory or a special file, or its directory is missing.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise EenetError(f"{path} is a directory; give a file name")
    if not target.parent.is_dir():
        raise EenetError(f"output directory {target.parent} does not exist; create it first "
                         f"(mkdir -p {target.parent})")
    if target.exists() and not target.is_file():
        mode = target.stat().st_mode
        kind = next((text for test, text in _SPECIAL_FILES if test(mode)), "a special file")
        raise EenetError(f"{path} is {kind}, not a regular file; eenet writes its outputs "
                         f"whole and renames them into place, so give a regular file name")
    return target


def check_not_input(out: str | os.PathLike,
                    inputs: Mapping[str, str | os.PathLike | None], *,
                    option: str = "the output") -> None:
    """Refuse an output that is one of the command's inputs, however it is spelled.

    ``./a.h5``, ``dir/../a.h5``, a symbolic link to ``a.h5`` and a hard link
    all name the same file as ``a.h5``: writing any of them would replace the
    input the command is reading.

    Args:
        out: the output path.
        inputs: the inputs by the name the user knows them by (``"VAL"``,
            ``"--costs-from"``); ``None`` and paths that do not exist are skipped.
        option: how the output is named in the message (``"--out"``).

    Raises:
        EenetError: naming the output, the input and the fix.
    """
    for name, given in inputs.items():
        if given is not None and same_file(out, given):
            raise EenetError(f"{option} {out} is the input {name} ({given}); writing it would "
                             f"destroy that input: choose another output file")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same file on disk (links followed) when both
    exist, the same absolute path with links resolved otherwise."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def torch_load_problem(err: BaseException, path: str | os.PathLike) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words of eenet's own.

    torch wraps every failure of its weights-only unpickler in advice to load
    with ``weights_only=False``, which would run whatever code the file holds;
    eenet never does that, so the advice is replaced.
    """
    import zipfile

    text = str(err)
    if "Unsupported global" in text:
        return "it holds Python objects, not only tensors and plain containers"
    if "Weights only load failed" in text or not zipfile.is_zipfile(path):
        return "not a torch.save archive, or a damaged one"
    return first_line(err)


# ---------------------------------------------------------------------------
# devices and seeds (torch imported on use)
# ---------------------------------------------------------------------------
def resolve_device(device: Any = "auto") -> Any:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:1"`` into a ``torch.device``.

    Every command resolves ``--device`` through here, so a CUDA request on a
    machine without CUDA gets the same one-line error everywhere.

    Raises:
        EenetError: an unknown name, or CUDA asked for but not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

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


def network_fingerprint(model: Any) -> str:
    """SHA-256 of a network's state dict: every parameter's and buffer's name, dtype,
    shape and bytes, in name order (hex, 64 characters).

    Caches record it (root attribute ``network_sha256``), policies copy it, and
    ``eenet evaluate``/``calibrate``/``run``/``bench`` refuse a network whose
    fingerprint differs. It does not depend on the device, the path the
    weights came from or how the model was built, only on the numbers.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0); a = torch.nn.Linear(2, 2)
        >>> _ = torch.manual_seed(0); b = torch.nn.Linear(2, 2)
        >>> network_fingerprint(a) == network_fingerprint(b) != network_fingerprint(
        ...     torch.nn.Linear(2, 2))
        True
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(value.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def seeded(seed: int, device: Any = "cpu", num_threads: int | None = None) -> Iterator[None]:
    """Seed torch inside the block; restore the global RNG state and thread count after."""
    import torch

    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    old_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        try:
            if num_threads is not None and num_threads != old_threads:
                torch.set_num_threads(num_threads)
            yield
        finally:
            if torch.get_num_threads() != old_threads:
                torch.set_num_threads(old_threads)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU inside the block, then restore.

    Adam's second-moment estimates of rarely-used weights decay into the subnormal
    range on long fits, and x86 arithmetic on subnormals is ~100x slower: a 300k-sample
    EENet fit took 46 s with them and 27 s without. torch has no getter for the
    mode, so the previous state is read off how a subnormal survives a product.
    """
    import torch

    was_on = bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0)
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported and not was_on:
            torch.set_flush_denormal(False)


# ---------------------------------------------------------------------------
# atomic outputs, interrupted runs
# ---------------------------------------------------------------------------
_LIVE_TEMPORARIES: set[Path] = set()
_LIVE_LOCK = threading.Lock()
_TMP_TAG = "eenet-tmp"


def _temporary_name(path: Path) -> Path:
    # The writer's pid is in the name, so a later run can tell a killed run's leftover
    # (pid gone) from a file another live process is still writing.
    return path.with_name(f".{path.name}.{_TMP_TAG}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed runs left next to ``path``; returns them.

    A temporary belongs to ``path`` when it is named ``.NAME.eenet-tmp.PID.*``;
    it is stale when process PID no longer exists (a run killed by SIGKILL or
    a power cut, which no handler can clean up after). Each removal is
    reported with a warning.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.{_TMP_TAG}.*"):
        try:
            pid = int(tmp.name.split(f".{_TMP_TAG}.", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
        warnings.warn(f"removed {tmp} ({size / 2**20:.1f} MiB), left by an earlier run of "
                      f"pid {pid} that was killed", stacklevel=2)
    return removed


def _describe_os_error(err: OSError, path: Path) -> str:
    if err.errno == errno.ENOSPC:
        return (f"{path}: no space left on device while writing; free some space or "
                f"write to another disk")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: cannot write here ({os.strerror(err.errno)}); choose another path"
    return f"{path}: writing failed ({err.strerror or err})"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file under a temporary name next to ``path``; rename it when the block ends.

    The block receives the temporary path and writes it completely. On any
    exception, ``KeyboardInterrupt`` or :class:`Interrupted` the temporary is
    deleted and nothing appears at ``path``; a file already at ``path`` is
    only ever replaced whole (``os.replace``). Leftovers of killed runs are
    removed first (:func:`remove_stale_temporaries`). An ``OSError`` while
    writing (a full disk, say) becomes a one-line :class:`EenetError` that
    names the path and the fix. A symbolic link is written through: the file
    it points to is replaced and the link stays (:func:`output_target`).

    Raises:
        EenetError: the directory does not exist, ``path`` is not a regular
            file (a FIFO, a device), or writing failed.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "table.csv")
        >>> with atomic_output(target) as tmp:
        ...     _ = tmp.write_text("a,b\\n")
        >>> open(target).read()
        'a,b\\n'
    """
    path = output_target(path)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    with _LIVE_LOCK:
        _LIVE_TEMPORARIES.add(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if isinstance(err, EenetError):
            raise
        raise EenetError(_describe_os_error(err, path)) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        with _LIVE_LOCK:
            _LIVE_TEMPORARIES.discard(tmp)


def live_temporaries() -> list[Path]:
    """Temporary files this process is writing right now (for tests and handlers)."""
    with _LIVE_LOCK:
        return sorted(_LIVE_TEMPORARIES)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def terminate_on_signals(signals: Sequence[int] = (signal.SIGTERM,)) -> Iterator[None]:
    """Turn ``signals`` into :class:`Interrupted` inside the block (main thread only).

    The exception unwinds the stack like Ctrl-C does, so every
    :func:`atomic_output` block deletes its temporary file; the command line
    then exits with 128 + the signal number.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
