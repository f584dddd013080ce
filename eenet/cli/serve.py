"""Commands that serve a fitted policy on the real network: run, bench."""
from __future__ import annotations

from pathlib import Path

import click

from eenet.cli import check_output, echo_json, existing_file, handle_errors, main

_MODEL_OPTIONS = [
    click.option("--model", "model_spec", required=True,
                 help="Factory 'package.module:function' of a staged multi-exit model "
                      "(stages and heads module lists) or a TorchScript file."),
    click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="State dict checkpoint, loaded with weights_only=True."),
    click.option("--data", "data_spec", required=True,
                 help="'package.module:function' returning a Dataset, an .npz with x and "
                      "y, or fashion-mnist:train|val|test."),
    click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                 help="Folder of a named dataset's files."),
    click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True),
    click.option("--limit", type=click.IntRange(1), help="Use only the first N samples."),
]


def _policy_and_model(fn):
    """The POLICY argument and the options that load the network and the data."""
    for option in reversed(_MODEL_OPTIONS):
        fn = option(fn)
    return click.argument("policy_path", metavar="POLICY",
                          type=click.Path(exists=True, dir_okay=False, path_type=Path))(fn)


def _served(ctx: click.Context, policy_path: Path, model_spec: str, weights: Path | None):
    """The network under the policy, built under the seed as ``eenet cache`` builds it (a
    factory that draws its weights then gives the same network; ``serve`` refuses one
    whose parameters are not those of the network the policy was fitted on)."""
    from eenet._validation import resolve_device, seeded
    from eenet.ingest.model import load_model
    from eenet.runtime import EarlyExitModel

    dev = resolve_device(ctx.obj["device"])
    with seeded(ctx.obj["seed"], dev):
        model = load_model(model_spec, weights, dev)
    return EarlyExitModel(model, policy_path), dev


def _inputs_of(policy_path: Path, model_spec: str, weights: Path | None, data_spec: str
               ) -> dict[str, Path | str | None]:
    """The command's input files, which its output must not replace."""
    return {"POLICY": policy_path, "--weights": weights, "--model": existing_file(model_spec),
            "--data": existing_file(data_spec)}


@main.command(epilog="Example: eenet run policy.pt --model "
                     "eenet.examples.models:fashion_mnist_cnn4 --data fashion-mnist:test "
                     "--out results/predictions.csv")
@_policy_and_model
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with one row per sample: sample, prediction, exit, score, label; "
                   "- for stdout (the summary then goes to stderr).")
@click.pass_context
@handle_errors
def run(ctx: click.Context, policy_path: Path, model_spec: str, weights: Path | None,
        data_spec: str, data_dir: Path | None, batch_size: int, limit: int | None,
        out: Path) -> None:
    """Serve a policy on the network over a dataset: each sample stops at its exit."""
    import numpy as np
    import pandas as pd

    from eenet._validation import atomic_output
    from eenet.ingest.data import load_dataset
    from eenet.runtime.bench import serve

    csv_out = check_output(out, inputs=_inputs_of(policy_path, model_spec, weights, data_spec))
    served, dev = _served(ctx, policy_path, model_spec, weights)
    result = serve(served, load_dataset(data_spec, data_dir), batch_size=batch_size,
                   device=str(dev), limit=limit, verbose=ctx.obj["progress"])
    table = pd.DataFrame({"sample": np.arange(result.n_samples), "prediction": result.prediction,
                          "exit": result.exit, "score": result.score, "label": result.label})
    if csv_out is None:  # --out -: stdout carries the CSV alone
        click.echo(table.to_csv(index=False), nl=False)
    else:
        with atomic_output(csv_out) as tmp:
            table.to_csv(tmp, index=False)
    fractions = np.bincount(result.exit, minlength=served.n_exits) / result.n_samples
    known = result.label >= 0
    accuracy = (f", accuracy {float((result.prediction == result.label)[known].mean()):.4f}"
                if known.any() else "")
    click.echo(f"{'served' if csv_out is None else f'wrote {out}:'} {result.n_samples} "
               f"samples{accuracy}, exit fractions " + " ".join(f"{f:.3f}" for f in fractions),
               err=csv_out is None)


@main.command(epilog="Example: eenet bench policy.pt --model "
                     "eenet.examples.models:fashion_mnist_cnn4 --data fashion-mnist:test "
                     "--limit 2000")
@_policy_and_model
@click.option("--batch1-samples", type=click.IntRange(1), default=1000, show_default=True,
              help="Samples timed one at a time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON row.")
@click.pass_context
@handle_errors
def bench(ctx: click.Context, policy_path: Path, model_spec: str, weights: Path | None,
          data_spec: str, data_dir: Path | None, batch_size: int, limit: int | None,
          batch1_samples: int, as_json: bool) -> None:
    """Realized latency of a served policy against its budget and the full network."""
    from eenet.ingest.data import load_dataset
    from eenet.runtime.bench import bench_policy

    served, dev = _served(ctx, policy_path, model_spec, weights)
    result = bench_policy(served, load_dataset(data_spec, data_dir), batch_size=batch_size,
                          device=str(dev), limit=limit, n_batch1=batch1_samples,
                          verbose=ctx.obj["progress"])
    if as_json:
        echo_json(result.to_row())
        return
    click.echo(result.format_table())
