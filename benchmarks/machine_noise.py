"""How steady is this machine's speed? One fixed workload timed in short blocks.

Every latency in RESULTS.md compares a timing with a cache's costs timed at another
moment, so it is only as good as the machine's speed is steady. This script times a
fixed single-thread workload (a chain of 128x128 matrix-vector products and tanh, the
stand-in of ``where_eenet_pays.py``) in blocks of ``--block`` seconds for ``--seconds``
seconds and prints the spread of the per-step time: on a steady machine the slowest
block is within a few percent of the fastest.

With ``--drift CACHE`` it also re-times the network the cache was made from
``--repeats`` times, a second apart, as ``eenet bench`` and ``eenet fit`` do
(:func:`eenet.runtime.drift.measure_drift`), and prints each reading of the full
model's drift against the cache.

Usage:
    python benchmarks/machine_noise.py --seconds 12
    python benchmarks/machine_noise.py --drift cache/fashion_mnist_cnn4_val.h5 --repeats 8
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def block_times(seconds: float, block: float) -> np.ndarray:
    """Microseconds per workload step, one value per block of ``block`` seconds."""
    torch.set_num_threads(1)
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)) / 12
    v = w[0].clone()
    out = []
    with torch.inference_mode():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            started, steps = time.perf_counter(), 0
            while time.perf_counter() - started < block:
                for _ in range(50):
                    v = torch.tanh(w @ v)
                steps += 50
            out.append((time.perf_counter() - started) / steps * 1e6)
    return np.asarray(out)


def drift_readings(cache_path: str, repeats: int) -> list[float]:
    """The full model's relative drift against the cache, re-timed ``repeats`` times."""
    from eenet import read_cache
    from eenet.runtime.drift import measure_drift
    from eenet.runtime.overhead import _recorded_network

    cache = read_cache(cache_path)
    model, x = _recorded_network(cache)
    out = []
    for _ in range(repeats):
        out.append(measure_drift(model, x, cache.costs).full_model)
        time.sleep(1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--block", type=float, default=0.2)
    ap.add_argument("--drift", metavar="CACHE", help="also re-time this cache's network")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    t = block_times(args.seconds, args.block)
    q = np.percentile(t, [0, 50, 90, 100])
    print(f"{len(t)} blocks of {args.block:g} s: µs per step min {q[0]:.2f}, median {q[1]:.2f}, "
          f"90th percentile {q[2]:.2f}, max {q[3]:.2f}; slowest / fastest {q[3] / q[0]:.2f}, "
          f"blocks over 1.10 x fastest {np.mean(t > 1.1 * q[0]):.0%}")
    if args.drift:
        r = drift_readings(args.drift, args.repeats)
        print(f"{args.drift}: the full model re-timed {len(r)} times, 1 s apart: drift "
              + " ".join(f"{100 * v:+.1f}%" for v in r))


if __name__ == "__main__":
    main()
