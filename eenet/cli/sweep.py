"""Commands over many budgets and methods: sweep, quickstart."""
from __future__ import annotations

from pathlib import Path

import click

from eenet.cli import (DEFAULT_CACHE_DIR, check_output, given, handle_errors, main,
                       parse_floats, parse_names)
from eenet.cli.policy import CALIBRATION_CHOICE, OVERHEAD_HELP, read_split
from eenet.rules.certified import RISK_RANGES
from eenet.rules.certify import RISK_BOUNDS
from eenet.examples.quickstart import QUICKSTART_METHODS
from eenet.sweep import DEFAULT_METHODS


@main.command(epilog="Example: eenet sweep cache/fmnist_val.h5 cache/fmnist_test.h5 "
                     "--n-budgets 12 --out results/sweep.csv --plot results/sweep.png")
@click.argument("val", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("test", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budgets", help="Comma-separated budgets (default: spread between the first "
                                "and last exit's cost).")
@click.option("--n-budgets", type=click.IntRange(1), default=12, show_default=True)
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help="Comma-separated method names or aliases, NAME:CALIBRATION for another "
                   "calibration (e.g. maxprob:search).")
@click.option("--calibration", type=CALIBRATION_CHOICE, default="default", show_default=True,
              help="Calibration for every method that accepts it (default: each method's).")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True,
              help="Repeat every fit with seeds seed..seed+N-1.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="With a single cache: hold out this share (seeded, stratified) as test.")
@click.option("--jobs", type=click.IntRange(1), default=None,
              help="Parallel fits (default: the number of cores).")
@click.option("--overhead", type=click.Choice(["auto", "on", "model", "off"]), default="auto",
              show_default=True, help=OVERHEAD_HELP)
@click.option("--epsilons", help="Risk levels, comma-separated: a risk-control sweep (each "
                                 "method fitted with --risk at every level) instead of budgets.")
@click.option("--risk", type=click.Choice(sorted(RISK_RANGES)), default="consistency",
              show_default=True, help="The risk of an --epsilons sweep.")
@click.option("--bound", "risk_bound", type=click.Choice(sorted(RISK_BOUNDS)), default="crc",
              show_default=True, help="The risk bound of an --epsilons sweep.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.1, show_default=True, help="Miss probability (not used by crc).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The CSV to write; - for stdout (the summary then goes to stderr).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw accuracy vs cost (risk and cost vs epsilon) to this PNG.")
@click.pass_context
@handle_errors
def sweep(ctx: click.Context, val: Path, test: Path | None, budgets: str | None,
          n_budgets: int, methods: str, calibration: str, seeds: int, holdout: float | None,
          jobs: int | None, overhead: str, epsilons: str | None, risk: str, risk_bound: str,
          delta: float, out: Path, plot: Path | None) -> None:
    """Many budgets x many methods: an accuracy-vs-cost CSV, a plot and a summary table."""
    import contextlib

    from eenet._validation import atomic_output, same_file
    from eenet.report import format_risk_summary, format_summary, plot_risk_sweep, plot_sweep
    from eenet.rules.certified import Guarantee
    from eenet.runtime.overhead import choose_overhead
    from eenet.sweep import run_sweep

    _check_sweep_options(ctx, test, holdout, epsilons)
    csv_out = check_output(out, inputs={"VAL": val, "TEST": test})
    check_output(plot, "--plot", inputs={"VAL": val, "TEST": test}, binary="a PNG image")
    if plot is not None and csv_out is not None and same_file(plot, csv_out):
        raise click.UsageError(f"--out and --plot both name {plot}; give each its own file")
    seed = ctx.obj["seed"]
    val_cache = read_split(val, holdout, seed, "fit")
    test_cache = read_split(test or val, holdout, seed, "held")
    table = run_sweep(val_cache, test_cache, budgets=parse_floats(budgets, "--budgets"),
                      n_budgets=n_budgets, methods=parse_names(methods),
                      calibration=None if calibration == "default" else calibration,
                      seeds=[seed + i for i in range(seeds)], jobs=jobs,
                      device=ctx.obj["device"], overhead=choose_overhead(overhead, val_cache),
                      risk=Guarantee(risk=risk, epsilon=0.0, delta=delta, risk_bound=risk_bound)
                      if epsilons else None,
                      epsilons=parse_floats(epsilons, "--epsilons") or (),
                      verbose=ctx.obj["progress"])
    unit, title = val_cache.cost_unit, val_cache.model or val.stem
    # both files appear together or not at all
    with contextlib.ExitStack() as stack:
        if csv_out is not None:
            table.to_csv(stack.enter_context(atomic_output(csv_out)), index=False)
        if plot is not None and epsilons:
            plot_risk_sweep(table, plot, risk=risk, cost_unit=unit, title=title)
        elif plot is not None:
            plot_sweep(table, plot, cost_unit=unit, title=title)
    if csv_out is None:  # --out -: stdout carries the CSV alone
        click.echo(table.to_csv(index=False), nl=False)
    click.echo(format_risk_summary(table, risk=risk, cost_unit=unit) if epsilons
               else format_summary(table, cost_unit=unit), err=csv_out is None)
    wrote = [str(p) for p in (csv_out, plot) if p is not None]
    if wrote:
        click.echo("wrote " + " and ".join(wrote), err=csv_out is None)


def _check_sweep_options(ctx: click.Context, test: Path | None, holdout: float | None,
                         epsilons: str | None) -> None:
    """Refuse options that contradict each other or that this kind of sweep would ignore."""
    if test is None and holdout is None:
        raise click.UsageError("give a TEST cache, or --holdout to split VAL")
    if test is not None and holdout is not None:
        raise click.UsageError("give either a TEST cache or --holdout, not both")
    if epsilons is not None and given(ctx, "budgets", "n_budgets"):
        raise click.UsageError(f"{' and '.join(given(ctx, 'budgets', 'n_budgets'))} set a "
                               f"budget sweep, --epsilons a risk sweep (no budget); give one "
                               f"(`eenet fit --risk R --epsilon E --budget B` fits one policy "
                               f"under both)")
    if epsilons is None and given(ctx, "risk", "risk_bound", "delta"):
        raise click.UsageError(f"only a risk sweep uses "
                               f"{', '.join(given(ctx, 'risk', 'risk_bound', 'delta'))}; add "
                               f"--epsilons E1,E2,...")


@main.command(epilog="Example: eenet quickstart --example wordnet --results-dir results")
@click.option("--example", type=click.Choice(["fashion-mnist", "wordnet"]),
              default="fashion-mnist", show_default=True,
              help="The bundled network: the 4-exit CNN on Fashion-MNIST, or the 6-exit "
                   "transformer on WordNet supersenses.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE_DIR, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the example's data files (Fashion-MNIST idx files, or "
                   "WordNet's data.noun, data.verb, data.adj, data.adv).")
@click.option("--n-budgets", type=click.IntRange(2), default=10, show_default=True)
@click.option("--methods", default=",".join(QUICKSTART_METHODS), show_default=True)
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True,
              help="Seeds per fit; the table marks ties within the seed-to-seed spread.")
@click.option("--overhead", type=click.Choice(["auto", "on", "model", "off"]), default="auto",
              show_default=True, help=OVERHEAD_HELP)
@click.option("--force", is_flag=True, help="Rebuild the caches even if present.")
@click.pass_context
@handle_errors
def quickstart(ctx: click.Context, example: str, cache_dir: Path, results_dir: Path,
               data_dir: Path | None, n_budgets: int, methods: str, seeds: int, overhead: str,
               force: bool) -> None:
    """The whole pipeline on a bundled example (Fashion-MNIST or WordNet), in a few minutes."""
    from eenet.examples.quickstart import run_quickstart

    summary = run_quickstart(example=example, cache_dir=cache_dir, results_dir=results_dir,
                             data_dir=data_dir, n_budgets=n_budgets,
                             methods=parse_names(methods), seeds=seeds, overhead=overhead,
                             force=force, seed=ctx.obj["seed"], device=ctx.obj["device"],
                             verbose=ctx.obj["progress"], echo=click.echo)
    click.echo(summary)
