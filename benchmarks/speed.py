"""Speed and memory of eenet, as ratios measured side by side in one run.

Measures (DESIGN.md section 8):

* fit time of one budget on N = 10,000, K = 4, C = 100 (EENet and the
  max-probability baseline), and a sweep of 20 budgets x all methods;
* caching overhead: ``cache_model`` (HDF5 streaming, validation) over a bare
  forward pass of the same model and data;
* peak memory of writing, reading and fitting on a large cache
  (N = 50,000, K = 5, C = 1,000; 1 GB of float32 logits), each in a fresh
  process, as a ratio to the size of the logits.

Usage:
    python benchmarks/speed.py --out benchmarks/results/speed.csv
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import eenet
from eenet.exit_policy import ExitPolicy
from eenet.sweep import run_sweep
from eenet.synthetic import synthetic_cache

ROWS: list[dict] = []


def record(measure: str, value: float, unit: str, reference: float | None = None,
           note: str = "") -> None:
    ROWS.append({"measure": measure, "value": value, "unit": unit,
                 "ratio": None if reference is None else value / reference, "note": note,
                 "eenet_version": eenet.__version__})
    ratio = "" if reference is None else f"  (x{value / reference:.2f})"
    print(f"{measure:<58} {value:>12.3f} {unit}{ratio}  {note}", flush=True)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------
def bench_fit(seed: int) -> None:
    val = synthetic_cache(10_000, n_exits=4, n_classes=100, seed=seed,
                          base_acc=(0.45, 0.6, 0.7, 0.75))
    test = synthetic_cache(10_000, n_exits=4, n_classes=100, seed=seed + 1,
                           base_acc=(0.45, 0.6, 0.7, 0.75))
    budget = float(np.mean(val.costs[:2]) + 1.0)
    t_max, _ = timed(lambda: ExitPolicy("maxprob", seed=seed).fit(val, budget))
    t_search, _ = timed(lambda: ExitPolicy("maxprob", calibration="search",
                                           seed=seed).fit(val, budget))
    t_eenet, _ = timed(lambda: ExitPolicy("eenet", seed=seed).fit(val, budget))
    record("fit maxprob (geometric+guard), N=10k K=4 C=100", t_max, "s")
    record("fit maxprob (search+guard), N=10k K=4 C=100", t_search, "s", t_max)
    record("fit eenet (default), N=10k K=4 C=100", t_eenet, "s", t_max)
    methods = ["eenet", "maxprob", "entropy", "patience", "static", "oracle"]
    t_sweep, table = timed(run_sweep, val, test, n_budgets=20, methods=methods, seeds=[seed],
                           jobs=os.cpu_count(), verbose=False)
    record(f"sweep 20 budgets x {len(methods)} methods, jobs={os.cpu_count()}", t_sweep, "s",
           t_eenet, "ratio to one EENet fit")


# ---------------------------------------------------------------------------
def bench_caching(seed: int) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from eenet.ingest.model import cache_model

    n = 10_000
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, n)
    with tempfile.TemporaryDirectory() as d:
        npz = Path(d) / "data.npz"
        np.savez(npz, x=x, y=y)
        model = __import__("eenet.examples.models", fromlist=["x"]).fashion_mnist_cnn4()
        loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                            batch_size=256)

        def bare() -> None:
            with torch.inference_mode():
                for xb, _ in loader:
                    model(xb)

        bare()  # warm-up
        t_bare, _ = timed(bare)
        t_cache, _ = timed(cache_model, "eenet.examples.models:fashion_mnist_cnn4", str(npz),
                           Path(d) / "c.h5", costs=[1.0, 2.0, 3.0, 4.0], verbose=False,
                           device="cpu", time_exits=False)
        t_measured, _ = timed(cache_model, "eenet.examples.models:fashion_mnist_cnn4",
                              str(npz), Path(d) / "m.h5", costs="measured", verbose=False,
                              device="cpu")
    record("bare forward, bundled CNN, 10k images, batch 256", t_bare, "s")
    record("eenet cache (given costs, no timing), same model and data", t_cache, "s", t_bare,
           "caching overhead")
    record("eenet cache (measured costs), same model and data", t_measured, "s", t_bare,
           "incl. timing every exit")


# ---------------------------------------------------------------------------
BIG = dict(n=50_000, k=5, c=1000)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_part(part: str, path: str) -> dict:
    """Run one memory phase in this (fresh) process.

    Peak memory is the peak of what Python and numpy allocate during the
    phase (``tracemalloc``; numpy reports its buffers to it), so the import
    of torch and its one-off allocations do not blur the figure. The
    process's peak RSS is reported beside it.
    """
    import tracemalloc

    n, k, c = BIG["n"], BIG["k"], BIG["c"]
    import torch  # noqa: F401  (imported before measuring)

    tracemalloc.start()
    base = 0.0
    if part == "write":
        rng = np.random.default_rng(0)
        with eenet.CacheWriter(path, n_exits=k, n_classes=c) as w:
            for start in range(0, n, 1000):
                b = min(1000, n - start)
                w.write(rng.normal(size=(b, k, c)).astype(np.float32),
                        rng.integers(0, c, b))
            w.set_costs(np.arange(1, k + 1, dtype=float), cost_unit="ms",
                        cost_source="given")
    elif part == "read":
        eenet.read_cache(path)
    elif part == "fit":
        cache = eenet.read_cache(path)
        ExitPolicy("maxprob").fit(cache, 3.0).evaluate(cache)
    elif part == "fit-eenet":
        cache = eenet.read_cache(path)
        ExitPolicy("eenet").fit(cache, 3.0).evaluate(cache)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    return {"part": part, "baseline_mib": base, "peak_mib": peak, "peak_rss_mib": _peak_mib()}


def bench_memory(parts: list[str]) -> None:
    logits_mib = BIG["n"] * BIG["k"] * BIG["c"] * 4 / 2**20
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "big.h5")
        for part in ["write"] + [p for p in parts if p != "write"]:
            out = subprocess.run([sys.executable, __file__, "--memory-part", part, "--path",
                                  path], check=True, capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            extra = res["peak_mib"] - res["baseline_mib"]
            record(f"peak allocated memory: {part}, N=50k K=5 C=1000", extra, "MiB",
                   logits_mib, f"logits are {logits_mib:.0f} MiB; process peak RSS "
                   f"{res['peak_rss_mib']:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.csv"))
    ap.add_argument("--parts", default="fit,caching,memory")
    ap.add_argument("--memory-parts", default="write,read,fit,fit-eenet")
    ap.add_argument("--memory-part", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_part:
        print(json.dumps(memory_part(args.memory_part, args.path)))
        return
    parts = args.parts.split(",")
    print(f"eenet {eenet.__version__}, {os.cpu_count()} cores", flush=True)
    if "fit" in parts:
        bench_fit(args.seed)
    if "caching" in parts:
        bench_caching(args.seed)
    if "memory" in parts:
        bench_memory(args.memory_parts.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(ROWS).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
