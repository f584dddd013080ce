"""Caching speed and memory, measured side by side in one run.

Speed, on the bundled 4-exit network ``eenet.examples.models:fashion_mnist_cnn4``
and ``fashion-mnist:val`` (10,000 images), every variant repeated
``--repeats`` times, interleaved, median and best reported:

* the bare forward pass a user would write: load the model and the data, then
  ``model(x)`` for every batch of a ``DataLoader`` (batch 256, inference mode);
  also its two parts alone (loading; the forward loop);
* ``eenet cache`` (the library call ``cache_model``) with given costs, with
  ``--costs-from`` a validation cache, and with measured costs;
* the per-exit timing alone (``measure_costs``), against the forward loop.

Memory, each phase a fresh process reporting its own peak RSS (``VmHWM``), on a
50,000 x 5 x 1,000 cache (1 GB of float32 logits) made by a cheap synthetic
5-exit network defined below:

* the imports alone (the floor every phase stands on);
* the bare forward pass of that network over its data (the floor of writing);
* ``eenet cache`` writing the cache;
* ``eenet info`` on it (arg-max and labels, read block by block);
* ``read_cache`` loading it whole (for reference: the logits themselves).

Usage:
    python benchmarks/cache_speed.py --seed 0 --out benchmarks/results/caching.csv

On a machine shared with other work the best of several runs is the least
disturbed estimate; both the best and the median are written.

Needs the Debian package ``dataset-fashion-mnist`` and about 2 GB of free disk
in the temporary directory. Timings are never asserted anywhere.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import eenet
import eenet.examples  # noqa: F401  (registers fashion-mnist)
from eenet.ingest.costs import measure_costs
from eenet.ingest.data import load_dataset
from eenet.ingest.model import cache_model, load_model

HERE = Path(__file__).resolve().parent
MODEL = "eenet.examples.models:fashion_mnist_cnn4"
DATA = "fashion-mnist:val"
BATCH = 256
BIG = dict(n=50_000, k=5, c=1_000)
COLUMNS = ["dataset", "model", "variant", "repeats", "seconds_median", "seconds_best",
           "ratio_to", "ratio_best", "ratio_median", "peak_rss_mib", "floor_rss_mib",
           "needed_mib", "note", "seed", "load_avg", "eenet_version"]


# ---------------------------------------------------------------------------
# the synthetic 5-exit, 1000-class network and its data (for the memory phases)
# ---------------------------------------------------------------------------
class BigExits(nn.Module):
    """A cheap staged network: 5 exits of 1,000 logits each from 32 input features."""

    def __init__(self, n_exits: int = BIG["k"], n_classes: int = BIG["c"]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU())
                                    for _ in range(n_exits))
        self.heads = nn.ModuleList(nn.Linear(32, n_classes) for _ in range(n_exits))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(x))
        return outs


def big_model() -> BigExits:
    torch.manual_seed(0)
    return BigExits()


def big_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(BIG["n"], 32, generator=g),
                         torch.randint(0, BIG["c"], (BIG["n"],), generator=g))


# ---------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bare_forward(model: nn.Module, dataset: Any) -> None:
    with torch.inference_mode():
        for x, _ in DataLoader(dataset, batch_size=BATCH):
            model(x)


def speed(seed: int, repeats: int, work: Path) -> list[dict[str, Any]]:
    """Every variant ``repeats`` times, interleaved so drifting load hits all alike."""
    val = work / "val.h5"
    cache_model(MODEL, DATA, val, costs="measured", batch_size=BATCH, device="cpu",
                verbose=False, seed=seed)

    def load() -> tuple[nn.Module, Any]:
        return load_model(MODEL, device="cpu"), load_dataset(DATA)

    model, dataset = load()
    example = next(iter(DataLoader(dataset, batch_size=BATCH)))[0]
    variants: dict[str, Callable[[], Any]] = {
        "bare forward (load + loop)": lambda: _bare_forward(*load()),
        "load model + data": load,
        "forward loop": lambda: _bare_forward(model, dataset),
        "eenet cache, given costs": lambda: cache_model(
            MODEL, DATA, work / "given.h5", costs=[1.0, 2.0, 3.0, 4.0], batch_size=BATCH,
            device="cpu", verbose=False, seed=seed),
        "eenet cache, --costs-from val": lambda: cache_model(
            MODEL, DATA, work / "copied.h5", costs_from=val, batch_size=BATCH,
            device="cpu", verbose=False, seed=seed),
        "eenet cache, measured costs": lambda: cache_model(
            MODEL, DATA, work / "measured.h5", costs="measured", batch_size=BATCH,
            device="cpu", verbose=False, seed=seed),
        "per-exit timing alone": lambda: measure_costs(model, example, device="cpu",
                                                       batch_size=BATCH),
    }
    for fn in variants.values():  # warm-up: allocator, thread pool, file cache
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for i in rng.permutation(len(order)):
            times[order[i]].append(_timed(variants[order[i]]))
    reference = {"eenet cache, given costs": "bare forward (load + loop)",
                 "eenet cache, --costs-from val": "bare forward (load + loop)",
                 "eenet cache, measured costs": "bare forward (load + loop)",
                 "per-exit timing alone": "forward loop"}
    rows = []
    for name, ts in times.items():
        ref = reference.get(name, "")
        rows.append({"dataset": DATA, "model": "fashion_mnist_cnn4", "variant": name,
                     "repeats": repeats, "seconds_median": statistics.median(ts),
                     "seconds_best": min(ts), "ratio_to": ref,
                     # on a shared machine the best of several runs is the least disturbed
                     "ratio_best": min(ts) / min(times[ref]) if ref else None,
                     "ratio_median": (statistics.median(ts) / statistics.median(times[ref])
                                      if ref else None)})
    return rows


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------
# Run in the measured process: its own high-water mark, read at exit. (The rusage of a
# child counts the memory of the parent it was forked from, so it is no use here.)
_REPORT_PEAK = """
import atexit, runpy, sys
def _report(path=sys.argv[1]):
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    with open(path, "w") as out:
        out.write(peak)
atexit.register(_report)
sys.argv = sys.argv[2:]
if sys.argv[0] == "-c":
    sys.argv = sys.argv[1:]
    exec(compile(sys.argv[0], "<phase>", "exec"), {"__name__": "__main__"})
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _peak_rss_mib(argv: list[str], cwd: Path, work: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh Python process running ``argv``.

    ``argv`` is ``["-m", module, *args]`` or ``["-c", code, *args]``.
    """
    report = work / "peak.txt"
    cmd = [sys.executable, "-c", _REPORT_PEAK, str(report)] + \
        (argv[1:] if argv[0] == "-m" else argv)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stderr[-2000:]}")
    return int(report.read_text()) / 1024, seconds


# The bare forward of the big network over its data, as a user would write it.
BARE_BIG = """
import torch
from torch.utils.data import DataLoader
import cache_speed as cs
model, data = cs.big_model().eval(), cs.big_data()
with torch.inference_mode():
    for x, _ in DataLoader(data, batch_size=cs.BATCH):
        model(x)
"""


def _best_of(repeats: int, argv: list[str], work: Path) -> tuple[float, float]:
    """(largest peak RSS, shortest time) over ``repeats`` runs of one phase."""
    runs = [_peak_rss_mib(argv, HERE, work) for _ in range(repeats)]
    return max(r[0] for r in runs), min(r[1] for r in runs)


def memory(work: Path, repeats: int) -> list[dict[str, Any]]:
    n, k, c = BIG["n"], BIG["k"], BIG["c"]
    big = work / "big.h5"
    logits_mib = n * k * c * 4 / 2**20
    batch_mib = BATCH * k * c * 4 / 2**20
    floor, _ = _peak_rss_mib(["-c", "import eenet.cli, eenet.ingest.model, eenet.cache"],
                             HERE, work)
    bare, t_bare = _best_of(repeats, ["-c", BARE_BIG], work)
    write, t_write = _best_of(repeats, ["-m", "eenet", "-q", "cache", "--model",
                                        "cache_speed:big_model", "--data",
                                        "cache_speed:big_data", "--out", str(big), "--costs",
                                        "1,2,3,4,5", "--batch-size", str(BATCH), "--device",
                                        "cpu"], work)
    info, t_info = _best_of(repeats, ["-m", "eenet", "info", str(big), "--json"], work)
    full, t_full = _best_of(1, ["-c", "import sys; from eenet.cache import read_cache; "
                                      "read_cache(sys.argv[1])", str(big)], work)
    size_mib = big.stat().st_size / 2**20
    shape = f"{n} x {k} x {c}"
    base = {"dataset": f"synthetic {shape}", "model": "cache_speed:big_model",
            "repeats": repeats, "floor_rss_mib": floor}
    # What each phase cannot do without. Writing: a batch of logits and the chunk it
    # fills (here one chunk is one batch). Info: per-exit correctness (bool), the labels
    # and one chunk to decompress. Reading whole: the logits.
    needed = {"write": 2 * batch_mib, "info": (n * k + n * 8) / 2**20 + batch_mib,
              "read": logits_mib}
    return [
        {**base, "variant": "imports only (floor)", "peak_rss_mib": floor},
        {**base, "variant": "bare forward (load + loop)", "seconds_best": t_bare,
         "peak_rss_mib": bare},
        {**base, "variant": "eenet cache (write 1 GB)", "seconds_best": t_write,
         "peak_rss_mib": write, "floor_rss_mib": bare, "needed_mib": needed["write"],
         "ratio_to": "bare forward (load + loop)", "ratio_best": t_write / t_bare,
         "note": f"file {size_mib:.0f} MiB for {logits_mib:.0f} MiB of logits; floor = "
                 f"the bare forward's peak"},
        {**base, "variant": "eenet info (streamed)", "seconds_best": t_info,
         "peak_rss_mib": info, "needed_mib": needed["info"]},
        {**base, "variant": "read_cache (whole)", "repeats": 1, "seconds_best": t_full,
         "peak_rss_mib": full, "needed_mib": needed["read"]},
    ]


# ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "caching.csv")
    parser.add_argument("--repeats", type=int, default=9,
                        help="runs of each speed variant (the best and the median are kept)")
    parser.add_argument("--big-repeats", type=int, default=3,
                        help="runs of each phase on the 1 GB cache")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = speed(args.seed, args.repeats, Path(tmp))
        if not args.skip_memory:
            rows += memory(Path(tmp), args.big_repeats)
    load = f"{load_before:.2f}->{os.getloadavg()[0]:.2f}"
    table = pd.DataFrame([{**r, "seed": args.seed, "load_avg": load,
                           "eenet_version": eenet.__version__} for r in rows],
                         columns=COLUMNS)
    table.to_csv(args.out, index=False, float_format="%.4g")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["seed", "eenet_version", "dataset"]).to_string(index=False))
    print(f"wrote {args.out} (torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
          f"load average {load})")


if __name__ == "__main__":
    main()
