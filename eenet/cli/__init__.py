"""The ``eenet`` command line (the only part of eenet that imports click).

The group and the plumbing live here; the commands, by pipeline stage, in
:mod:`eenet.cli.ingest` (cache, import, info), :mod:`eenet.cli.policy` (fit,
calibrate, evaluate) and :mod:`eenet.cli.sweep` (sweep, quickstart). Each
command parses its options, calls one library function, writes its output and
echoes a one-line summary. Exit codes: 0 success, 1 an error (one line on
stderr), 2 a usage error, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from eenet import __version__

DEFAULT_CACHE_DIR = Path("cache")


# ---------------------------------------------------------------------------
# plumbing shared by the command modules
# ---------------------------------------------------------------------------
def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with eenet's error contract.

    eenet's own errors (:class:`~eenet._validation.EenetError`) and the
    operating system's (``OSError``: a full disk, a missing permission) reach
    the user as one line and exit code 1; anything else is a bug in eenet and
    keeps its traceback. ``--debug`` shows the traceback for every error.
    Ctrl-C exits 130 and SIGTERM 143, after every temporary file has been
    removed; a closed pipe (``eenet info x.h5 | head -1``) ends quietly.
    Each distinct warning is printed once, as one line on stderr.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eenet._validation import (EenetError, Interrupted, first_line,
                                       terminate_on_signals)

        ctx = click.get_current_context()
        debug = bool((ctx.obj or {}).get("debug"))
        try:
            with warnings.catch_warnings(record=True) as caught, terminate_on_signals():
                warnings.simplefilter("always")
                try:
                    return fn(*args, **kwargs)
                finally:
                    for text in dict.fromkeys(str(w.message) for w in caught):
                        click.echo(f"warning: {text}", err=True)
        except click.ClickException:
            raise
        except BrokenPipeError:
            # The reader went away (`| head`); say nothing more and keep Python from
            # complaining about the closed stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(141)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(130)
        except Interrupted as sig:
            click.echo(f"terminated by signal {sig.signum}; nothing was written", err=True)
            ctx.exit(128 + sig.signum)
        except (EenetError, OSError) as err:
            if debug:
                raise
            text = first_line(err)
            if not isinstance(err, EenetError):
                text = f"{type(err).__name__}: {text}"
            raise click.ClickException(text) from None
        except MemoryError:
            if debug:
                raise
            raise click.ClickException("out of memory; use a smaller --batch-size or "
                                       "--limit, or a machine with more memory") from None

    return wrapper


def check_out_dir(path: Path) -> Path:
    """Fail before any work when the output cannot be written: its directory is
    missing, or it is a directory or a special file (a FIFO, a device)."""
    from eenet._validation import EenetError, output_target

    try:
        output_target(path)
    except EenetError as err:
        raise click.ClickException(str(err)) from None
    return path


#: ``--out -``: the output goes to stdout (text outputs only)
STDOUT = "-"


def check_output(path: Path | None, option: str = "--out", *,
                 inputs: dict[str, Path | str | None] | None = None,
                 binary: str | None = None) -> Path | None:
    """Refuse, before any work, an output that cannot be written or would destroy an input.

    Args:
        path: the output the user named (``None``: not asked for).
        option: the option that named it, for the message.
        inputs: the command's input files by the name the user knows them by;
            the output may be none of them, however spelled (``./``, a link).
        binary: what the output is when it is binary (``"an HDF5 cache"``):
            then ``-`` is refused; a text output (CSV) named ``-`` goes to stdout.

    Returns:
        ``path``, or ``None`` when it is ``-`` (stdout) or not given.
    """
    if path is None:
        return None
    if str(path) == STDOUT:
        if binary:
            raise click.ClickException(f"{option} -: the output is {binary}, which is not "
                                       f"written to stdout; give a file name")
        return None
    from eenet._validation import EenetError, check_not_input

    check_out_dir(path)
    try:
        check_not_input(path, inputs or {}, option=option)
    except EenetError as err:
        raise click.ClickException(str(err)) from None
    return path


def existing_file(spec: str) -> str | None:
    """A ``--model``/``--data`` spec when it names a file (TorchScript, ``.npz``), else None:
    an input an output must not replace."""
    return spec if os.path.isfile(spec) else None


def parse_floats(text: str | None, name: str) -> list[float] | None:
    """``"1,2.5,3"`` -> floats; duplicates removed, order kept."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers",
                                 param_hint=name) from None
    if not values:
        raise click.BadParameter("give at least one number", param_hint=name)
    return list(dict.fromkeys(values))


def parse_names(text: str | None, name: str = "--methods") -> list[str] | None:
    """``"a, b,a"`` -> ``["a", "b"]`` (duplicates removed, order kept); an empty list is
    refused (it would otherwise mean "the default")."""
    if text is None:
        return None
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names:
        raise click.BadParameter("give at least one name", param_hint=name)
    return names


def given(ctx: click.Context, *names: str) -> list[str]:
    """The options among ``names`` (parameter names) the user gave, as spelled (``--bound``)."""
    from click.core import ParameterSource

    spelled = {p.name: p.opts[0] for p in ctx.command.params}
    return [spelled.get(n, n) for n in names
            if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)]


def command_seed(ctx: click.Context, seed: int | None) -> int:
    """A command's ``--seed``, or the group's."""
    return int(seed) if seed is not None else int(ctx.obj["seed"])


def json_ready(obj: Any) -> Any:
    """``obj`` with NumPy values as plain ones and NaN or infinity as ``None`` (JSON's
    ``null``): ``json.dumps`` would write the non-standard ``NaN`` otherwise."""
    from eenet._validation import plain

    obj = plain(obj)
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def echo_json(obj: Any) -> None:
    """Print ``obj`` as standard JSON (NaN and infinity become ``null``)."""
    click.echo(json.dumps(json_ready(obj), indent=2, allow_nan=False, default=str))


def fmt_costs(costs: Any) -> str:
    return "[" + ", ".join(f"{float(c):.4g}" for c in costs) + "]"


def _apply_shared(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Record a shared option given after the command, as the group records it before."""
    if value is None or value is False:
        return value
    obj = ctx.ensure_object(dict)
    if param.name == "device":
        _check_device(value)
        obj["device"] = value
    elif param.name == "seed":
        obj["seed"] = value
    elif param.name == "quiet":
        obj["progress"] = False
    elif param.name == "debug":
        obj["debug"] = True
    elif param.name == "verbose":
        logging.getLogger().setLevel(logging.DEBUG)
    return value


def _check_device(device: str) -> None:
    """Refuse an unavailable ``--device`` before any work, the same way everywhere."""
    if device == "auto":
        return
    from eenet._validation import EenetError, resolve_device

    try:
        resolve_device(device)
    except EenetError as err:
        raise click.ClickException(str(err)) from None


def _shared_options() -> list[click.Option]:
    """The group's options, accepted after a command name too (``eenet run ... --device
    cpu`` = ``eenet --device cpu run ...``); the last one given wins."""
    return [
        click.Option(["--seed"], type=int, default=None, expose_value=False,
                     callback=_apply_shared, help="Seed for every stochastic step."),
        click.Option(["--device"], type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                     expose_value=False, callback=_apply_shared,
                     help="Where to run networks and EENet training."),
        click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                     callback=_apply_shared, help="Progress bars and debug logging."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                     callback=_apply_shared, help="No progress bars."),
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_apply_shared,
                     help="Show the full traceback of every error."),
    ]


class _Command(click.Command):
    """A command that also takes the group's shared options (those it does not define
    itself: ``cache --device`` and ``fit --seed`` keep their own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        own = {p.name for p in self.params}
        self.params.extend(o for o in _shared_options() if o.name not in own)


class _Group(click.Group):
    command_class = _Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        order = ["cache", "import", "info", "fit", "calibrate", "evaluate", "sweep", "run",
                 "bench", "quickstart"]
        return [c for c in order if c in self.commands] + sorted(set(self.commands) - set(order))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="eenet")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for every stochastic step (commands may override).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to run networks (cache) and EENet training.")
@click.option("-v", "--verbose", is_flag=True, help="Progress bars and debug logging on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show the full traceback of every error.")
@click.pass_context
def main(ctx: click.Context, seed: int, device: str, verbose: bool, quiet: bool,
         debug: bool) -> None:
    """Learn and compare exit policies for frozen multi-exit networks under a latency budget.

    \b
    Shared options (--seed, --device, -v, -q, --debug) go before or after the
    command name.

    \b
    Typical flow:
      eenet cache --model pkg.mod:make_net --data fashion-mnist:val --out cache/val.h5
      eenet fit cache/val.h5 --budget 0.4 --out policy.pt
      eenet evaluate policy.pt cache/test.h5
      eenet sweep cache/val.h5 cache/test.h5 --out results.csv --plot results.png
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.formatwarning = _one_line_warning
    ctx.ensure_object(dict)
    ctx.obj.update(seed=seed, device=device, progress=not quiet, debug=debug)
    _check_device(device)




# The commands register themselves on `main` when their modules load.
from eenet.cli import ingest, policy, serve, sweep  # noqa: E402,F401
