"""Commands that fit, calibrate and evaluate one policy."""
from __future__ import annotations

from pathlib import Path

import click

from eenet.cli import check_out_dir, command_seed, echo_json, handle_errors, main
import warnings


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
@handle_errors
def fit(ctx: click.Context, val: Path, budget: float, out: Path, method: str,
        calibration: str, no_guard: bool, holdout: float | None, seed: int | None,
        epochs: int | None, lr: float | None, hidden: int | None, alpha_ce: float | None,
        alpha_budget: float | None) -> None:
    """Fit an exit policy on a validation cache and calibrate it to the budget."""
    from eenet.exit_policy import ExitPolicy

    check_out_dir(out)
    seed = command_seed(ctx, seed)
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
@handle_errors
def calibrate(policy_path: Path, val: Path, budget: float | None, mode: str, no_guard: bool,
              out: Path | None) -> None:
    """Recompute a policy's thresholds on a cache, for its budget or a new one."""
    from eenet.cache import read_cache
    from eenet.exit_policy import ExitPolicy

    out = check_out_dir(out or policy_path)
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
@handle_errors
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
        echo_json(result.to_json())
        return
    click.echo(result.format_table())


