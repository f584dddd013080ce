"""Speed, scaling and memory of fitting and sweeping, as ratios side by side in one run.

Every measurement runs in a fresh Python process (so one-off imports and lazy
initialisation count where a user pays them), on synthetic caches drawn from
one population (``eenet.synthetic_cache``):

* ``fit``: one EENet budget and one max-probability budget on N = 10,000,
  K = 4, C = 100, in process (the first fit after ``import eenet``), next to a
  reference trainer with the paper's settings (mini-batch 512, learning rate
  3e-5, a fixed 100 epochs, no early stopping) run through the same code;
* ``command``: the whole ``eenet fit`` and ``eenet sweep`` (20 budgets x eenet,
  maxprob, entropy, patience, static, oracle) commands, interpreter start
  included;
* ``scaling``: fit and sweep time as N grows (1k .. 1M, K = 4) and as K grows
  (2 .. 16, N = 10,000), C = 10;
* ``memory``: peak RSS of fitting EENet and max-probability and of a sweep on
  a 50,000 x 5 x 1,000 cache (1 GB of float32 logits), as a ratio to the logits.

Usage:
    python benchmarks/fit_speed.py --out benchmarks/results/fit_speed.csv
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

import pandas as pd

ROWS: list[dict] = []
HERE = Path(__file__).resolve()
METHODS = "eenet,maxprob,entropy,patience,static,oracle"


def record(part: str, measure: str, value: float, unit: str, reference: float | None = None,
           note: str = "") -> None:
    import eenet

    ROWS.append({"part": part, "measure": measure, "value": value, "unit": unit,
                 "ratio": None if reference is None else value / reference, "note": note,
                 "eenet_version": eenet.__version__})
    ratio = "" if reference is None else f"  (x{value / reference:.2f})"
    print(f"{measure:<66} {value:>10.3f} {unit}{ratio}  {note}", flush=True)


def child(task: dict) -> dict:
    """Run one measurement in a fresh process; returns its JSON result."""
    out = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(task)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cache(n: int, k: int, c: int, seed: int):
    import numpy as np

    from eenet import synthetic_cache

    acc = np.linspace(0.45, 0.78, k)
    return synthetic_cache(n, n_exits=k, n_classes=c, seed=seed, base_acc=tuple(acc))


def run_child(task: dict) -> dict:
    """The measurement itself (inside the fresh process)."""
    started = time.perf_counter()
    import numpy as np

    import eenet
    from eenet import ExitPolicy, run_sweep

    imported = time.perf_counter() - started
    kind = task["kind"]
    if kind in ("fit", "scale-fit"):
        cache = _cache(task["n"], task["k"], task["c"], task["seed"])
        budget = float(np.mean(cache.costs[:2]))
        name, _, calib = task["method"].partition(":")
        t0 = time.perf_counter()
        policy = ExitPolicy(name, calibration=calib or None, seed=task["seed"],
                            **task.get("hparams", {})).fit(cache, budget)
        first = time.perf_counter() - t0
        return {"import_s": imported, "fit_s": first,
                "epochs": policy.scorer.diagnostics.get("epochs_run") if name == "eenet"
                else None}
    if kind in ("sweep", "scale-sweep"):
        val = _cache(task["n"], task["k"], task["c"], task["seed"])
        test = _cache(task["n"], task["k"], task["c"], task["seed"] + 1)
        t0 = time.perf_counter()
        run_sweep(val, test, n_budgets=task["budgets"], methods=task["methods"].split(","),
                  seeds=[task["seed"]], verbose=False)
        return {"import_s": imported, "sweep_s": time.perf_counter() - t0}
    if kind == "memory":
        cache = eenet.read_cache(task["path"])
        rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if task["what"] == "sweep":
            run_sweep(cache, cache, n_budgets=5, methods=METHODS.split(","), seeds=[0],
                      jobs=1, verbose=False)
        else:
            ExitPolicy(task["what"]).fit(cache, float(cache.costs[1]))
        return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "after_read_mib": rss_read}
    raise ValueError(kind)


def bench_fit(seed: int) -> None:
    base = dict(kind="fit", n=10_000, k=4, c=100, seed=seed)
    mp = child({**base, "method": "maxprob"})
    ee = child({**base, "method": "eenet"})
    ref = child({**base, "method": "eenet", "hparams": {"batch_size": 512, "lr": 3e-5,
                                                        "epochs": 100, "patience": 100}})
    record("fit", "import eenet (fresh process)", ee["import_s"], "s")
    record("fit", "fit maxprob (geometric + guard), N=10k K=4 C=100", mp["fit_s"], "s")
    record("fit", f"fit eenet (defaults; {ee['epochs']} epochs), same cache", ee["fit_s"], "s")
    record("fit", "fit eenet, reference trainer (batch 512, lr 3e-5, 100 epochs)",
           ref["fit_s"], "s", ee["fit_s"], "ratio to the default eenet fit")


def _timed_command(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eenet", "-q", *args], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def bench_commands(seed: int) -> None:
    from eenet import write_cache

    with tempfile.TemporaryDirectory() as d:
        val, test = Path(d) / "val.h5", Path(d) / "test.h5"
        write_cache(val, _cache(10_000, 4, 100, seed))
        write_cache(test, _cache(10_000, 4, 100, seed + 1))
        t_fit = _timed_command(["fit", str(val), "--budget", "2.0", "--out",
                                str(Path(d) / "p.pt")])
        t_help = _timed_command(["--help"])
        t_sweep = _timed_command(["sweep", str(val), str(test), "--n-budgets", "20",
                                  "--methods", METHODS, "--out", str(Path(d) / "s.csv")])
    record("command", "eenet --help (interpreter start and imports)", t_help, "s")
    record("command", "eenet fit (eenet, one budget), N=10k K=4 C=100", t_fit, "s", t_help)
    record("command", "eenet sweep 20 budgets x 6 methods, same caches", t_sweep, "s", t_fit,
           f"{os.cpu_count()} cores; ratio to one eenet fit command")


def bench_scaling(seed: int, max_n: int) -> None:
    ns = [n for n in (1_000, 10_000, 100_000, 1_000_000) if n <= max_n]
    for n in ns:
        for method in ("eenet", "maxprob", "maxprob:search"):
            r = child(dict(kind="scale-fit", n=n, k=4, c=10, seed=seed, method=method))
            record("scaling", f"fit {method}, N={n:,} K=4 C=10", r["fit_s"], "s",
                   None, f"{r['fit_s'] / n * 1e6:.1f} us per sample")
        if n <= 100_000:
            r = child(dict(kind="scale-sweep", n=n, k=4, c=10, seed=seed, budgets=5,
                           methods=METHODS))
            record("scaling", f"sweep 5 budgets x 6 methods, N={n:,} K=4 C=10", r["sweep_s"],
                   "s", None, f"{r['sweep_s'] / n * 1e6:.1f} us per sample")
    for k in (2, 4, 8, 16):
        for method in ("eenet", "maxprob", "maxprob:search"):
            r = child(dict(kind="scale-fit", n=10_000, k=k, c=10, seed=seed, method=method))
            record("scaling", f"fit {method}, N=10,000 K={k} C=10", r["fit_s"], "s")


def bench_memory(seed: int) -> None:
    import numpy as np

    from eenet.cache import CacheWriter

    n, k, c = 50_000, 5, 1000
    logits_mib = n * k * c * 4 / 2**20
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "big.h5")
        rng = np.random.default_rng(seed)
        with CacheWriter(path, n_exits=k, n_classes=c) as w:
            for start in range(0, n, 2000):
                b = min(2000, n - start)
                logits = rng.normal(size=(b, k, c)).astype(np.float32)
                labels = rng.integers(0, c, b)
                logits[np.arange(b), :, labels] += np.linspace(1, 6, k, dtype=np.float32)
                w.write(logits, labels)
            w.set_costs(np.arange(1, k + 1, dtype=float), cost_unit="ms", cost_source="given")
        for what in ("maxprob", "eenet", "sweep"):
            r = child(dict(kind="memory", path=path, what=what))
            label = "sweep (5 budgets x 6 methods, jobs 1)" if what == "sweep" \
                else f"fit {what}"
            record("memory", f"peak RSS: {label}, N=50k K=5 C=1000", r["peak_rss_mib"], "MiB",
                   logits_mib, f"logits are {logits_mib:.0f} MiB; after reading "
                   f"{r['after_read_mib']:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fit_speed.csv"))
    ap.add_argument("--parts", default="fit,command,scaling,memory")
    ap.add_argument("--max-n", type=int, default=1_000_000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    import eenet

    print(f"eenet {eenet.__version__}, {os.cpu_count()} cores", flush=True)
    parts = args.parts.split(",")
    if "fit" in parts:
        bench_fit(args.seed)
    if "command" in parts:
        bench_commands(args.seed)
    if "scaling" in parts:
        bench_scaling(args.seed, args.max_n)
    if "memory" in parts:
        bench_memory(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(ROWS).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
