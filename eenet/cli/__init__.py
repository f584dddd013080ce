"""The ``eenet`` command line: cache, import, info, fit, calibrate, evaluate, sweep, quickstart.

Each command parses its options, calls one library function, writes its
output and echoes a one-line summary. eenet's errors reach the user as one
line on stderr with a non-zero exit code, never as a traceback.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from eenet import __version__

DEFAULT_CACHE_DIR = Path("cache")


# ---------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------
def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn eenet's and the OS's errors into one-line ClickExceptions."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eenet._validation import EenetError

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return fn(*args, **kwargs)
                finally:
                    seen = set()
                    for w in caught:
                        text = str(w.message)
                        if text not in seen:
                            seen.add(text)
                            click.echo(f"warning: {text}", err=True)
        except click.ClickException:
            raise
        except (EenetError, ValueError, OSError, KeyError, RuntimeError) as err:
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not isinstance(err, EenetError):
                text = f"{type(err).__name__}: {text}"
            raise click.ClickException(text) from None
        except MemoryError:
            raise click.ClickException("out of memory; use a smaller --batch-size or "
                                       "--limit, or a machine with more memory") from None

    return wrapper


def _out_path(path: Path) -> Path:
    if not path.parent.is_dir():
        raise click.ClickException(f"output directory {path.parent} does not exist; "
                                   f"create it first (mkdir -p {path.parent})")
    return path


def _parse_floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers",
                                 param_hint=name) from None
    if not values:
        raise click.BadParameter("give at least one number", param_hint=name)
    return values


def _parse_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [v.strip() for v in text.split(",") if v.strip()]


def _seed(ctx: click.Context, seed: int | None) -> int:
    return int(seed) if seed is not None else int(ctx.obj["seed"])


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, allow_nan=True, default=float))


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        order = ["cache", "import", "info", "fit", "calibrate", "evaluate", "sweep",
                 "quickstart"]
        return [c for c in order if c in self.commands] + sorted(set(self.commands) - set(order))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="eenet")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for every stochastic step (commands may override).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to run networks (cache) and EENet training.")
@click.option("-v", "--verbose", is_flag=True, help="Progress bars and debug logging on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, seed: int, device: str, verbose: bool, quiet: bool) -> None:
    """Learn and compare exit policies for frozen multi-exit networks under a latency budget.

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
    ctx.obj.update(seed=seed, device=device, progress=not quiet, verbose=verbose)




# The commands register themselves on `main` when their modules load.
from eenet.cli import ingest, policy, sweep  # noqa: E402,F401
