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
        from eenet._checks import EenetError

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


# ---------------------------------------------------------------------------
# cache / import / info
# ---------------------------------------------------------------------------
@main.command(epilog="Example: eenet cache --model eenet.examples.models:fashion_mnist_cnn4 "
                     "--data fashion-mnist:val --out cache/fmnist_val.h5")
@click.option("--model", "model_spec", required=True,
              help="Factory 'package.module:function' or a TorchScript file.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="State dict checkpoint, loaded with weights_only=True.")
@click.option("--data", "data_spec", required=True,
              help="'package.module:function' returning a Dataset, an .npz with x and y, "
                   "or fashion-mnist:train|val|test.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the built-in dataset's files.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HDF5 exit cache to write.")
@click.option("--split", help="Split name to record (parsed from the data spec if omitted).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Overrides the group's --device.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Cache only the first N samples.")
@click.option("--costs", default="measured", show_default=True,
              help="'measured' (timed on this device), 'flops', or given values c1,c2,...")
@click.option("--cost-unit", default="ms", show_default=True,
              help="Unit of given --costs values.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
@click.option("--exit-modules", help="Comma-separated names of the exit modules to time with "
                                     "hooks (non-staged models; found automatically if omitted).")
@click.option("--autocast", is_flag=True, help="Run the forward under torch.autocast "
                                               "(float16 on CUDA, bfloat16 on CPU).")
@click.option("--no-timing", is_flag=True, help="With flops or given --costs, skip timing the "
                                                "exits (their latencies are not stored).")
@click.pass_context
@_friendly
def cache(ctx: click.Context, model_spec: str, weights: Path | None, data_spec: str,
          data_dir: Path | None, out: Path, split: str | None, device: str | None,
          batch_size: int, num_workers: int, limit: int | None, costs: str, cost_unit: str,
          dtype: str, exit_modules: str | None, autocast: bool, no_timing: bool) -> None:
    """Run a frozen multi-exit network once and store every exit's output."""
    from eenet.exits import cache_model
    from eenet.cache import read_cache

    _out_path(out)
    cost_spec: Any = costs if costs in ("measured", "flops") else _parse_floats(costs, "--costs")
    path = cache_model(model_spec, data_spec, out, weights=weights, data_dir=data_dir,
                       split=split, device=device or ctx.obj["device"], batch_size=batch_size,
                       num_workers=num_workers, limit=limit, costs=cost_spec,
                       cost_unit_given=cost_unit, dtype=dtype,
                       exit_modules=_parse_names(exit_modules), verbose=ctx.obj["progress"],
                       seed=ctx.obj["seed"], autocast=autocast, time_exits=not no_timing)
    c = read_cache(path)
    click.echo(f"wrote {path}: {c.n_samples} samples x {c.n_exits} exits x {c.n_classes} "
               f"classes, costs {_fmt_costs(c.costs)} {c.cost_unit} ({c.cost_source})")


@main.command("import", epilog="Example: eenet import val_logits.npz --out cache/val.h5 "
                                "--costs 1.2,2.5,3.9,5.1 --cost-unit ms")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labels file when SRC has none (.npy, .npz, .pt, .txt).")
@click.option("--costs", help="Cumulative per-exit costs c1,c2,... (overrides SRC's).")
@click.option("--cost-unit", default="ms", show_default=True)
@click.option("--layout", type=click.Choice(["nkc", "knc"]), default="nkc", show_default=True,
              help="nkc = [samples, exits, classes]; knc = [exits, samples, classes].")
@click.option("--probs", is_flag=True, help="SRC holds probabilities, not logits.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
@click.option("--model", default="", help="Model name to record.")
@click.option("--dataset", default="", help="Dataset name to record.")
@click.option("--split", default="", help="Split name to record.")
@_friendly
def import_(src: Path, out: Path, labels: Path | None, costs: str | None, cost_unit: str,
            layout: str, probs: bool, dtype: str, model: str, dataset: str, split: str) -> None:
    """Turn logits or probabilities you already have into an exit cache."""
    from eenet.importing import import_exit_outputs

    _out_path(out)
    c = import_exit_outputs(src, out, dtype=dtype, labels=labels,
                            costs=_parse_floats(costs, "--costs"), cost_unit=cost_unit,
                            layout=layout, probs=probs, model=model, dataset=dataset,
                            split=split)
    click.echo(f"wrote {out}: {c.n_samples} samples x {c.n_exits} exits x {c.n_classes} "
               f"classes, costs {_fmt_costs(c.costs)} {c.cost_unit}")


def _fmt_costs(costs: Any) -> str:
    return "[" + ", ".join(f"{float(c):.4g}" for c in costs) + "]"


@main.command(epilog="Example: eenet info cache/fmnist_val.h5 --json")
@click.argument("cache_path", metavar="CACHE",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def info(cache_path: Path, as_json: bool) -> None:
    """Summarise an exit cache: sizes, costs, per-exit and oracle accuracy."""
    from eenet.cache import read_cache

    s = read_cache(cache_path).summary()
    if as_json:
        _echo_json(s)
        return
    click.echo(f"{s['path']}")
    click.echo(f"  model {s['model'] or '-'}   dataset {s['dataset'] or '-'}   "
               f"split {s['split'] or '-'}")
    click.echo(f"  {s['n_samples']} samples, {s['n_exits']} exits, {s['n_classes']} classes, "
               f"logits {s['logits_dtype']} ({s['logits_kind']})")
    click.echo(f"  costs in {s['cost_unit']} ({s['cost_source']}"
               f"{', ' + s['device'] if s['device'] else ''})")
    click.echo(f"  {'exit':<10} {'cost':>12} {'accuracy':>9}")
    for name, cost, acc in zip(s["exit_names"], s["costs"], s["exit_accuracy"]):
        click.echo(f"  {name:<10} {cost:>12.4g} {acc:>9.4f}")
    click.echo(f"  last-exit accuracy {s['last_exit_accuracy']:.4f}   "
               f"oracle (any exit right) {s['oracle_accuracy']:.4f}")


# ---------------------------------------------------------------------------
# fit / calibrate / evaluate
# ---------------------------------------------------------------------------
_CALIBRATIONS = ["default", "assignment", "geometric", "search", "patience"]


def _read_split(path: Path, holdout: float | None, seed: int, part: str):
    from eenet.cache import read_cache

    c = read_cache(path)
    if holdout is None:
        return c
    fit_part, held_part = c.holdout_split(holdout, seed=seed)
    return fit_part if part == "fit" else held_part


@main.command(epilog="Example: eenet fit cache/fmnist_val.h5 --budget 0.3 --out policy.pt")
@click.argument("val", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budget", type=float, required=True, help="Average cost per sample, in the "
                                                          "cache's cost unit.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", default="eenet", show_default=True,
              help="eenet, eenet-paper, maxprob (msdnet), entropy (branchynet), patience "
                   "(pabee), static.")
@click.option("--calibration", type=click.Choice(_CALIBRATIONS), default="default",
              show_default=True, help="How scores become thresholds (default: the method's).")
@click.option("--no-guard", is_flag=True, help="Calibrate against B itself, without the "
                                               "budget guard's margin.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fit on a seeded stratified part of VAL, keeping this share for "
                   "`eenet evaluate --holdout`.")
@click.option("--seed", type=int, default=None, help="Overrides the group's --seed.")
@click.option("--epochs", type=click.IntRange(1), help="EENet: maximum training epochs.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="EENet: learning rate.")
@click.option("--hidden", type=click.IntRange(1), help="EENet: hidden width of the heads.")
@click.option("--alpha-ce", type=click.FloatRange(0), help="EENet: weight of the "
                                                           "assignment loss.")
@click.option("--alpha-budget", type=click.FloatRange(0), help="EENet: weight of the "
                                                               "budget loss.")
@click.pass_context
@_friendly
def fit(ctx: click.Context, val: Path, budget: float, out: Path, method: str,
        calibration: str, no_guard: bool, holdout: float | None, seed: int | None,
        epochs: int | None, lr: float | None, hidden: int | None, alpha_ce: float | None,
        alpha_budget: float | None) -> None:
    """Fit an exit policy on a validation cache and calibrate it to the budget."""
    from eenet.exit_policy import ExitPolicy

    _out_path(out)
    seed = _seed(ctx, seed)
    hparams = {k: v for k, v in dict(epochs=epochs, lr=lr, hidden=hidden, alpha_ce=alpha_ce,
                                     alpha_budget=alpha_budget).items() if v is not None}
    cache_ = _read_split(val, holdout, seed, "fit")
    policy = ExitPolicy(method, calibration=None if calibration == "default" else calibration,
                        guard=not no_guard, seed=seed, device=ctx.obj["device"], **hparams)
    policy.fit(cache_, budget, verbose=ctx.obj["progress"])
    policy.provenance.update(holdout=holdout, fit_cache=str(val.resolve()))
    policy.save(out)
    click.echo(f"wrote {out}: {policy.describe()}")


@main.command(epilog="Example: eenet calibrate policy.pt cache/fmnist_val.h5 --budget 0.25 "
                     "--out policy_025.pt")
@click.argument("policy_path", metavar="POLICY",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("val", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budget", type=float, help="New budget (default: the policy's).")
@click.option("--mode", type=click.Choice(_CALIBRATIONS), default="default",
              show_default=True, help="Calibration mode (default: the policy's).")
@click.option("--no-guard", is_flag=True, help="Calibrate against B itself.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write (default: overwrite POLICY).")
@_friendly
def calibrate(policy_path: Path, val: Path, budget: float | None, mode: str, no_guard: bool,
              out: Path | None) -> None:
    """Recompute a policy's thresholds on a cache, for its budget or a new one."""
    from eenet.cache import read_cache
    from eenet.exit_policy import ExitPolicy

    out = _out_path(out or policy_path)
    policy = ExitPolicy.load(policy_path)
    policy.calibrate(read_cache(val), budget, mode=None if mode == "default" else mode,
                     guard=False if no_guard else None)
    policy.save(out)
    click.echo(f"wrote {out}: {policy.describe()}")


@main.command(epilog="Example: eenet evaluate policy.pt cache/fmnist_test.h5 --json")
@click.argument("policy_path", metavar="POLICY",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("test", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Evaluate on the held-out share of TEST (as split by `fit --holdout`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@_friendly
def evaluate(ctx: click.Context, policy_path: Path, test: Path, holdout: float | None,
             as_json: bool) -> None:
    """Apply a policy to a held-out cache: accuracy, realized cost, exit distribution."""
    from eenet.exit_policy import ExitPolicy

    policy = ExitPolicy.load(policy_path)
    if holdout is None and policy.provenance.get("fit_cache") == str(test.resolve()):
        holdout = policy.provenance.get("holdout")
        if holdout is None:
            warnings.warn(f"{test} is the cache the policy was fitted on; the accuracy is "
                          f"optimistic. Evaluate on another split.", stacklevel=1)
    cache_ = _read_split(test, holdout, int(policy.seed), "held")
    result = policy.evaluate(cache_)
    if as_json:
        _echo_json(result.to_json())
        return
    click.echo(result.format_table())


# ---------------------------------------------------------------------------
# sweep / quickstart
# ---------------------------------------------------------------------------
@main.command(epilog="Example: eenet sweep cache/fmnist_val.h5 cache/fmnist_test.h5 "
                     "--n-budgets 12 --out results/sweep.csv --plot results/sweep.png")
@click.argument("val", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("test", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budgets", help="Comma-separated budgets (default: spread between the first "
                                "and last exit's cost).")
@click.option("--n-budgets", type=click.IntRange(1), default=12, show_default=True)
@click.option("--methods", default="eenet,maxprob,entropy,patience,static,oracle",
              show_default=True, help="Comma-separated method names.")
@click.option("--calibration", type=click.Choice(_CALIBRATIONS), default="default",
              show_default=True, help="Calibration for every method (default: each method's).")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True,
              help="Repeat stochastic fits with seeds seed..seed+N-1.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="With a single cache: hold out this share (seeded, stratified) as test.")
@click.option("--jobs", type=click.IntRange(1), default=None,
              help="Parallel fits (default: the number of cores).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw accuracy vs cost to this PNG.")
@click.pass_context
@_friendly
def sweep(ctx: click.Context, val: Path, test: Path | None, budgets: str | None,
          n_budgets: int, methods: str, calibration: str, seeds: int, holdout: float | None,
          jobs: int | None, out: Path, plot: Path | None) -> None:
    """Many budgets x many methods: an accuracy-vs-cost CSV, a plot and a summary table."""
    from eenet.sweep import format_summary, plot_sweep, run_sweep

    _out_path(out)
    if plot is not None:
        _out_path(plot)
    seed = ctx.obj["seed"]
    if test is None and holdout is None:
        raise click.UsageError("give a TEST cache, or --holdout to split VAL")
    if test is not None and holdout is not None:
        raise click.UsageError("give either a TEST cache or --holdout, not both")
    val_cache = _read_split(val, holdout, seed, "fit")
    test_cache = _read_split(test or val, holdout, seed, "held")
    table = run_sweep(val_cache, test_cache, budgets=_parse_floats(budgets, "--budgets"),
                      n_budgets=n_budgets, methods=_parse_names(methods),
                      calibration=None if calibration == "default" else calibration,
                      seeds=[seed + i for i in range(seeds)], jobs=jobs,
                      verbose=ctx.obj["progress"])
    table.to_csv(out, index=False)
    if plot is not None:
        plot_sweep(table, plot, val_cache, title=f"{val_cache.model or val.stem}")
    click.echo(format_summary(table, cost_unit=val_cache.cost_unit))
    click.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))


@main.command(epilog="Example: eenet quickstart --results-dir results")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE_DIR, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the Fashion-MNIST idx files.")
@click.option("--n-budgets", type=click.IntRange(2), default=10, show_default=True)
@click.option("--methods", default="eenet,maxprob,entropy,patience,static,oracle",
              show_default=True)
@click.option("--force", is_flag=True, help="Rebuild the caches even if present.")
@click.pass_context
@_friendly
def quickstart(ctx: click.Context, cache_dir: Path, results_dir: Path, data_dir: Path | None,
               n_budgets: int, methods: str, force: bool) -> None:
    """The whole pipeline on the bundled Fashion-MNIST example, in a few minutes."""
    from eenet.sweep import run_quickstart

    summary = run_quickstart(cache_dir=cache_dir, results_dir=results_dir, data_dir=data_dir,
                             n_budgets=n_budgets, methods=_parse_names(methods), force=force,
                             seed=ctx.obj["seed"], device=ctx.obj["device"],
                             verbose=ctx.obj["progress"], echo=click.echo)
    click.echo(summary)


if __name__ == "__main__":  # pragma: no cover
    main()
