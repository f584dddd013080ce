"""Commands that make and describe exit caches: cache, import, info."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from eenet.cli import (check_output, echo_json, existing_file, fmt_costs, given, handle_errors,
                       main, parse_floats, parse_names)


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
                   "or a registered NAME:SPLIT such as fashion-mnist:val.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of a registered dataset's files.")
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
@click.option("--costs-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reuse the cost vectors of this cache (e.g. the validation cache of the "
                   "same network), so both splits share one set of latencies.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
@click.option("--exit-modules", help="Comma-separated names of the exit modules to time with "
                                     "hooks (non-staged models; found automatically if omitted).")
@click.option("--autocast", is_flag=True, help="Run the forward under torch.autocast "
                                               "(float16 on CUDA, bfloat16 on CPU).")
@click.option("--timing/--no-timing", default=None,
              help="Time every exit. Default: only for measured --costs; --timing also "
                   "stores latencies beside flops or given costs.")
@click.option("--resume", is_flag=True,
              help="Keep progress next to --out and continue an interrupted run of the same "
                   "arguments from its last complete chunk.")
@click.option("--distributed", is_flag=True, default=None,
              help="Shard the data over the ranks torchrun started (automatic when "
                   "WORLD_SIZE > 1): torchrun --nproc_per_node=P -m eenet cache ...")
@click.option("--features", is_flag=True,
              help="Also store each exit's hidden features: the input of its head's last "
                   "nn.Linear, float16 (one process, not with --resume).")
@click.option("--feature-dim", type=click.IntRange(1), default=64, show_default=True,
              help="Features wider than this are stored through a seeded Gaussian random "
                   "projection (seeded by --seed, stored in the cache).")
@click.pass_context
@handle_errors
def cache(ctx: click.Context, model_spec: str, weights: Path | None, data_spec: str,
          data_dir: Path | None, out: Path, split: str | None, device: str | None,
          batch_size: int, num_workers: int, limit: int | None, costs: str, cost_unit: str,
          costs_from: Path | None, dtype: str, exit_modules: str | None, autocast: bool,
          timing: bool | None, resume: bool, distributed: bool | None, features: bool,
          feature_dim: int) -> None:
    """Run a frozen multi-exit network once and store every exit's output."""
    import eenet.examples  # noqa: F401  (registers the bundled dataset names)
    from eenet._validation import Interrupted
    from eenet.cache import read_costs
    from eenet.ingest.model import CacheOptions, cache_model
    from eenet.ingest.stream import PartialRun

    check_output(out, inputs={"--weights": weights, "--costs-from": costs_from,
                              "--model": existing_file(model_spec),
                              "--data": existing_file(data_spec)},
                 binary="an HDF5 cache")
    if given(ctx, "feature_dim") and not features:
        raise click.UsageError("--feature-dim sets the width of stored features; add "
                               "--features")
    if given(ctx, "cost_unit") and (costs in ("measured", "flops") or costs_from is not None):
        raise click.UsageError("--cost-unit is the unit of given --costs values; measured "
                               "costs are in ms, flops in FLOPs, and --costs-from copies the "
                               "unit with the costs")
    cost_spec: Any = costs if costs in ("measured", "flops") else parse_floats(costs, "--costs")
    opts = CacheOptions(weights=weights, data_dir=data_dir, split=split,
                        device=device or ctx.obj["device"], batch_size=batch_size,
                        num_workers=num_workers, limit=limit, costs=cost_spec,
                        cost_unit=cost_unit, costs_from=costs_from, timing=timing,
                        exit_modules=parse_names(exit_modules), dtype=dtype,
                        autocast=autocast, seed=ctx.obj["seed"],
                        verbose=ctx.obj["progress"], resume=resume,
                        distributed=distributed or None, features=features,
                        feature_dim=feature_dim)
    try:
        path = cache_model(model_spec, data_spec, out, opts)
    except (KeyboardInterrupt, Interrupted):
        if resume:
            click.echo(f"complete chunks are kept in {PartialRun(out).dir}; run the same "
                       f"command again to continue", err=True)
        raise
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return  # rank 0 reports for a distributed run
    c = read_costs(path)
    n_samples, n_exits, n_classes = c.shape
    click.echo(f"wrote {path}: {n_samples} samples x {n_exits} exits x {n_classes} "
               f"classes, costs {fmt_costs(c.costs)} {c.cost_unit} ({c.cost_source}"
               f"{', from ' + str(costs_from) if costs_from else ''})")


@main.command("import", epilog="Example: eenet import val_logits.npz --out cache/val.h5 "
                                "--costs 1.2,2.5,3.9,5.1 --cost-unit ms")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labels file when SRC has none (.npy, .npz, .pt, .txt).")
@click.option("--costs", help="Cumulative per-exit costs c1,c2,... (overrides SRC's).")
@click.option("--cost-unit", default="ms", show_default=True)
@click.option("--costs-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reuse the cost vectors of this cache (e.g. the validation cache).")
@click.option("--layout", type=click.Choice(["nkc", "knc"]), default="nkc", show_default=True,
              help="nkc = [samples, exits, classes]; knc = [exits, samples, classes].")
@click.option("--probs", is_flag=True, help="SRC holds probabilities, not logits.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True)
@click.option("--model", default="", help="Model name to record.")
@click.option("--dataset", default="", help="Dataset name to record.")
@click.option("--split", default="", help="Split name to record.")
@click.pass_context
@handle_errors
def import_(ctx: click.Context, src: Path, out: Path, labels: Path | None, costs: str | None,
            cost_unit: str, costs_from: Path | None, layout: str, probs: bool, dtype: str,
            model: str, dataset: str, split: str) -> None:
    """Turn logits or probabilities you already have into an exit cache."""
    from eenet.ingest.arrays import import_exit_outputs

    check_output(out, inputs={"SRC": src, "--labels": labels, "--costs-from": costs_from},
                 binary="an HDF5 cache")
    if costs_from is not None and given(ctx, "cost_unit"):
        raise click.UsageError("--costs-from copies the unit with the costs; drop --cost-unit")
    c = import_exit_outputs(src, out, dtype=dtype, labels=labels,
                            costs=parse_floats(costs, "--costs"), cost_unit=cost_unit,
                            costs_from=costs_from, layout=layout, probs=probs, model=model,
                            dataset=dataset, split=split)
    click.echo(f"wrote {out}: {c.n_samples} samples x {c.n_exits} exits x {c.n_classes} "
               f"classes, costs {fmt_costs(c.costs)} {c.cost_unit}")



@main.command(epilog="Example: eenet info cache/fmnist_val.h5 --json")
@click.argument("cache_path", metavar="CACHE",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def info(cache_path: Path, as_json: bool) -> None:
    """Summarise an exit cache: sizes, costs, per-exit and oracle accuracy."""
    from eenet.cache import summarize_cache

    s = summarize_cache(cache_path)  # reads the logits block by block
    if as_json:
        echo_json(s)
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
    if s.get("features"):
        shapes = ", ".join(f"{'x'.join(map(str, shape))}{' (projected)' if proj else ''}"
                           for shape, proj in zip(s["features"], s["feature_projected"]))
        click.echo(f"  features (float16, per exit): {shapes}")
