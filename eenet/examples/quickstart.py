"""The whole pipeline on a bundled network (``eenet quickstart``, ``make demo``).

Caches the validation and test splits of a bundled example (the test split
reuses the validation split's measured latencies), sweeps every method over
the default budgets with several seeds, and writes a CSV, a plot and the
summary table. Examples (:data:`EXAMPLES`): ``fashion-mnist``, the 4-exit
CNN on Fashion-MNIST (the default), and ``wordnet``, the 6-exit transformer
on WordNet supersenses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from eenet._validation import CacheError, check_choice
from eenet.cache import ExitCache, read_cache
from eenet.report import format_summary, plot_sweep
from eenet.runtime.overhead import choose_overhead
from eenet.sweep import AUTO, DEFAULT_METHODS, run_sweep

#: The quick start's columns: every method, and what ``--method auto`` picks at each budget.
QUICKSTART_METHODS = [*DEFAULT_METHODS, AUTO]

__all__ = ["EXAMPLES", "QUICKSTART_MODEL", "Example", "run_quickstart"]


@dataclass(frozen=True)
class Example:
    """A bundled network and its data, as the quick start runs them.

    Attributes:
        model: the factory's import path.
        dataset: the registered dataset name (``NAME:SPLIT`` with val and test).
        cache_stem: caches are ``{cache_stem}_{split}.h5``.
        results_stem: outputs are ``{results_stem}.csv|png|txt``.
        title: the plot's title.
    """

    model: str
    dataset: str
    cache_stem: str
    results_stem: str
    title: str


EXAMPLES = {
    "fashion-mnist": Example("eenet.examples.models:fashion_mnist_cnn4", "fashion-mnist",
                             "fashion_mnist_cnn4", "quickstart",
                             "Fashion-MNIST, 4-exit CNN: accuracy vs latency"),
    "wordnet": Example("eenet.examples.models:wordnet_transformer", "wordnet", "wordnet",
                       "quickstart_wordnet",
                       "WordNet supersenses, 6-exit transformer: accuracy vs latency"),
}
QUICKSTART_MODEL = EXAMPLES["fashion-mnist"].model


def _cached_split(example: Example, split: str, cache_dir: Path, *, data_dir: Path | None,
                  force: bool, device: str, seed: int, verbose: bool,
                  echo: Callable[[str], Any], like: Path | None = None) -> ExitCache:
    """Read or build the example's cache of ``split``.

    With ``like``, the split reuses that cache's measured cost vectors:
    per-exit latency is a property of the network and the machine, not of
    the split, and timing it twice on a busy machine gives two answers.
    """
    from eenet.ingest.model import cache_model

    path = cache_dir / f"{example.cache_stem}_{split}.h5"
    if path.exists() and not force:
        try:
            cache = read_cache(path)
            if like is None or np.allclose(cache.costs, read_cache(like).costs):
                echo(f"using {path} ({cache.n_samples} samples)")
                return cache
            echo(f"rebuilding {path}: its costs differ from the validation cache's")
        except CacheError as err:
            echo(f"rebuilding {path}: {err}")
    echo(f"caching the {split} split of the bundled model to {path} ...")
    cache_model(example.model, f"{example.dataset}:{split}", path, data_dir=data_dir,
                device=device, costs_from=like, verbose=verbose, seed=seed)
    return read_cache(path)


def run_quickstart(*, example: str = "fashion-mnist", cache_dir: Path = Path("cache"),
                   results_dir: Path = Path("results"),
                   data_dir: Path | None = None, n_budgets: int = 10,
                   methods: Sequence[str] | None = None, seeds: int = 3, force: bool = False,
                   seed: int = 0, device: str = "auto", overhead: str = "auto",
                   verbose: bool = True, echo: Callable[[str], Any] = print) -> str:
    """Cache a bundled network's val/test splits, sweep, write CSV, PNG and the table.

    ``example`` is a key of :data:`EXAMPLES`. ``overhead`` is ``eenet sweep
    --overhead``: by default every policy pays its own measured cost, as it
    would when served.

    Returns:
        The summary table (also written next to the CSV, e.g. ``quickstart.txt``).

    Raises:
        EenetError: an unknown example.
    """
    check_choice("example", example, tuple(EXAMPLES))
    chosen = EXAMPLES[example]
    cache_dir, results_dir = Path(cache_dir), Path(results_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(data_dir=data_dir, force=force, device=device, seed=seed, verbose=verbose,
              echo=echo)
    val = _cached_split(chosen, "val", cache_dir, **kw)
    test = _cached_split(chosen, "test", cache_dir, like=Path(val.path), **kw)
    methods = list(methods or QUICKSTART_METHODS)
    echo(f"sweeping {n_budgets} budgets x {len(methods)} methods x {seeds} "
         f"seeds (fit on val, evaluate on test) ...")
    table = run_sweep(val, test, n_budgets=n_budgets, methods=methods,
                      seeds=[seed + i for i in range(seeds)],
                      overhead=choose_overhead(overhead, val), verbose=verbose)
    csv = results_dir / f"{chosen.results_stem}.csv"
    table.to_csv(csv, index=False)
    png = plot_sweep(table, results_dir / f"{chosen.results_stem}.png",
                     cost_unit=val.cost_unit, title=chosen.title)
    summary = format_summary(table, cost_unit=val.cost_unit)
    (results_dir / f"{chosen.results_stem}.txt").write_text(summary + "\n")
    echo(f"wrote {csv} and {png}")
    return summary
