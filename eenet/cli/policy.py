"""Commands that fit, calibrate and evaluate one policy."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from eenet.cli import check_output, command_seed, echo_json, given, handle_errors, main
from eenet.rules import CALIBRATIONS
from eenet.rules.certified import RISK_RANGES
from eenet.rules.certify import COST_BOUNDS, RISK_BOUNDS
from eenet.scores import METHODS
from eenet.scores.eenet import EENetConfig

#: ``--method`` accepts every name and alias of the method table (any case).
METHOD_CHOICE = click.Choice(sorted({alias for m in METHODS.values() if m.deployable
                                     for alias in (m.name, *m.aliases)} | {"auto"}),
                             case_sensitive=False)
CALIBRATION_CHOICE = click.Choice(["default", *CALIBRATIONS])
_EENET_DEFAULTS = {f.name: f.default for f in fields(EENetConfig)}
OVERHEAD_HELP = ("Charge each policy its own cost per exit (scoring, thresholds, bookkeeping), "
                 "measured like the network's, so the budget fitted is the budget its runtime "
                 "spends. auto: when the cache's costs were measured (latency or FLOPs), not "
                 "when they were given, timed inside the network the cache records when it "
                 "loads here, around a stand-in network otherwise; model: inside the recorded "
                 "network or an error; on: around the stand-in; off: never.")


def read_split(path: Path, holdout: float | None, seed: int, part: str):
    """The cache at ``path``, or its ``fit``/``held`` part of a seeded stratified split."""
    from eenet.cache import read_cache

    cache = read_cache(path)
    if holdout is None:
        return cache
    fit_part, held_part = cache.holdout_split(holdout, seed=seed)
    return fit_part if part == "fit" else held_part


_GUARANTEE_OPTIONS = [
    click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 help="Certify the budget: the expected cost on new data is at most B with "
                      "this probability (fits on part of the cache, certifies on the rest; "
                      "replaces the guard)."),
    click.option("--cost-bound", type=click.Choice(sorted(COST_BOUNDS)), default="wsr",
                 show_default=True, help="Upper confidence bound for --confidence."),
    click.option("--risk", type=click.Choice(sorted(RISK_RANGES)),
                 help="Bound a risk against the full model: consistency (answer differs), "
                      "gap (early wrong minus full wrong), brier (Brier score difference)."),
    click.option("--epsilon", type=float, help="The risk level for --risk."),
    click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 default=0.1, show_default=True,
                 help="Miss probability of the risk guarantee (not used by crc)."),
    click.option("--bound", "risk_bound", type=click.Choice(sorted(RISK_BOUNDS)),
                 default="crc", show_default=True,
                 help="crc: in expectation; ucb-hb, ucb-wsr, ltt: with probability 1 - delta."),
    click.option("--certify-fraction", type=click.FloatRange(0, 1, min_open=True,
                                                             max_open=True),
                 default=0.5, show_default=True,
                 help="Share of the cache kept to certify a --confidence or --risk."),
]


def guarantee_options(fn):
    for option in reversed(_GUARANTEE_OPTIONS):
        fn = option(fn)
    return fn


def make_guarantee(confidence: float | None, cost_bound: str, risk: str | None,
                   epsilon: float | None, delta: float, risk_bound: str):
    """The :class:`~eenet.rules.certified.Guarantee` the options ask for, or None.

    Options that only shape a guarantee are refused when none is asked for
    (they would be ignored).
    """
    ctx = click.get_current_context()
    if confidence is None and risk is None and epsilon is None:
        unused = given(ctx, "cost_bound", "delta", "risk_bound", "certify_fraction")
        if unused:
            raise click.UsageError(f"only a guarantee uses {', '.join(unused)}; add "
                                   f"--confidence, or --risk with --epsilon")
        return None
    if confidence is None and given(ctx, "cost_bound"):
        raise click.UsageError("--cost-bound bounds the cost certified by --confidence; add "
                               "--confidence or drop it")
    from eenet.rules.certified import Guarantee

    return Guarantee(confidence=confidence, cost_bound=cost_bound, risk=risk, epsilon=epsilon,
                     delta=delta, risk_bound=risk_bound)


def _eenet_option(name: str, kind: click.ParamType, text: str):
    return click.option(f"--{name.replace('_', '-')}", name, type=kind, show_default=True,
                        default=_EENET_DEFAULTS[name], help=f"EENet: {text}.")


@main.command(epilog="Example: eenet fit cache/fmnist_val.h5 --budget 0.3 --out policy.pt")
@click.argument("val", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budget", type=float, help="Average cost per sample, in the cache's cost unit "
                                          "(required unless --risk alone).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", type=METHOD_CHOICE, default="eenet", show_default=True,
              help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()
                             if m.deployable) + "; auto: the candidate most accurate at the "
              "budget on folds of VAL, each charged its own cost (eenet.auto)")
@click.option("--calibration", type=CALIBRATION_CHOICE, default="default", show_default=True,
              help="How scores become thresholds (default: the method's). "
                   + "; ".join(f"{k}: {v}" for k, v in CALIBRATIONS.items()))
@click.option("--no-guard", is_flag=True, help="Calibrate against B itself, without the "
                                               "budget guard's margin.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fit on a seeded stratified part of VAL, keeping this share for "
                   "`eenet evaluate --holdout`.")
@click.option("--seed", type=int, default=None, help="Overrides the group's --seed.")
@click.option("--overhead", type=click.Choice(["auto", "on", "model", "off"]), default="auto",
              show_default=True, help=OVERHEAD_HELP)
@guarantee_options
@_eenet_option("epochs", click.IntRange(1), "maximum training epochs")
@_eenet_option("lr", click.FloatRange(0, min_open=True), "learning rate")
@_eenet_option("hidden", click.IntRange(1), "hidden width of the heads")
@_eenet_option("alpha_ce", click.FloatRange(0), "weight of the assignment loss")
@_eenet_option("alpha_budget", click.FloatRange(0), "weight of the budget loss")
@click.pass_context
@handle_errors
def fit(ctx: click.Context, val: Path, budget: float | None, out: Path, method: str,
        calibration: str, no_guard: bool, holdout: float | None, seed: int | None,
        overhead: str, confidence: float | None, cost_bound: str, risk: str | None,
        epsilon: float | None, delta: float, risk_bound: str, certify_fraction: float,
        **hparams: float) -> None:
    """Fit an exit policy on a validation cache and calibrate it to the budget."""
    from eenet.policy import ExitPolicy
    from eenet.runtime.overhead import choose_overhead
    from eenet.scores import get_method

    check_output(out, inputs={"VAL": val}, binary="a policy file")
    seed = command_seed(ctx, seed)
    learned = method.lower() == "auto" or get_method(method).learned
    changed = {k: v for k, v in hparams.items() if v != _EENET_DEFAULTS[k]}
    if changed and not learned:
        raise click.UsageError(f"{', '.join('--' + k.replace('_', '-') for k in changed)} "
                               f"apply to learned methods (eenet, eenet-paper) only")
    guarantee = make_guarantee(confidence, cost_bound, risk, epsilon, delta, risk_bound)
    if budget is None and (guarantee is None or guarantee.confidence is not None):
        raise click.UsageError("give --budget (or --risk with --epsilon alone)")
    cache = read_split(val, holdout, seed, "fit")
    if method.lower() == "auto":
        policy = _fit_auto(ctx, cache, budget, calibration, no_guard, seed, overhead, guarantee,
                           changed)
    else:
        policy = ExitPolicy(method, calibration=None if calibration == "default"
                            else calibration, guard=not no_guard, seed=seed,
                            device=ctx.obj["device"], **(changed if learned else {}))
        policy.fit(cache, budget, overhead=choose_overhead(overhead, cache),
                   guarantee=guarantee, certify_fraction=certify_fraction,
                   verbose=ctx.obj["progress"])
    policy.provenance.update(holdout=holdout, fit_cache=str(val.resolve()))
    policy.save(out)
    click.echo(f"wrote {out}: {policy.describe()}")


def _fit_auto(ctx: click.Context, cache, budget: float | None, calibration: str,
              no_guard: bool, seed: int, overhead: str, guarantee, hparams: dict):
    """``fit --method auto``: every candidate on folds of the cache, the best one kept."""
    from eenet.auto import fit_auto
    from eenet.runtime.overhead import choose_overhead

    if guarantee is not None:
        raise click.UsageError("--method auto compares accuracies out of fold and cannot "
                               "certify a budget or a risk; fit the chosen method with "
                               "--confidence/--risk")
    if calibration != "default":
        raise click.UsageError("--method auto uses each candidate's default calibration; "
                               "drop --calibration or name a method")
    return fit_auto(cache, budget, overhead=choose_overhead(overhead, cache), seed=seed,
                    guard=not no_guard, device=ctx.obj["device"],
                    verbose=ctx.obj["progress"], **hparams)


@main.command(epilog="Example: eenet calibrate policy.pt cache/fmnist_val.h5 --risk consistency "
                     "--epsilon 0.02 --out policy_safe.pt")
@click.argument("policy_path", metavar="POLICY",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("val", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--budget", type=float, help="New budget (default: the policy's).")
@click.option("--mode", type=CALIBRATION_CHOICE, default="default", show_default=True,
              help="Calibration (default: the policy's).")
@click.option("--no-guard", is_flag=True, help="Calibrate against B itself.")
@guarantee_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write (default: overwrite POLICY).")
@handle_errors
def calibrate(policy_path: Path, val: Path, budget: float | None, mode: str, no_guard: bool,
              confidence: float | None, cost_bound: str, risk: str | None,
              epsilon: float | None, delta: float, risk_bound: str, certify_fraction: float,
              out: Path | None) -> None:
    """Recompute a policy's thresholds on a cache, for its budget or a new one."""
    from eenet.cache import read_cache
    from eenet.policy import ExitPolicy

    # POLICY itself is the default output: it is read whole before anything is written
    out = check_output(out or policy_path, inputs={"VAL": val}, binary="a policy file")
    policy = ExitPolicy.load(policy_path)
    policy.calibrate(read_cache(val), budget, mode=None if mode == "default" else mode,
                     guard=False if no_guard else None,
                     guarantee=make_guarantee(confidence, cost_bound, risk, epsilon, delta,
                                              risk_bound),
                     certify_fraction=certify_fraction)
    policy.save(out)
    click.echo(f"wrote {out}: {policy.describe()}")


@main.command(epilog="Example: eenet evaluate policy.pt cache/fmnist_test.h5 --json")
@click.argument("policy_path", metavar="POLICY",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("test", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Evaluate on the held-out share of TEST (as split by `fit --holdout`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def evaluate(policy_path: Path, test: Path, holdout: float | None, as_json: bool) -> None:
    """Apply a policy to a held-out cache: accuracy, realized cost, exit distribution, risk."""
    from eenet.policy import ExitPolicy

    policy = ExitPolicy.load(policy_path)
    if holdout is None and policy.provenance.get("fit_cache") == str(test.resolve()):
        holdout = policy.provenance.get("holdout")
    result = policy.evaluate(read_split(test, holdout, policy.seed, "held"))
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(result.format_table())
