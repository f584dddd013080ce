"""The WordNet-supersense transformer: per-exit accuracy and cost, a bag-of-words reference,
and served latency against the budget.

1. Per exit of ``eenet.examples.models:wordnet_transformer`` (from the caches
   ``cache/wordnet_{val,test}.h5``, built when absent: val timed on this
   machine, test reusing its costs): test and validation accuracy, the
   cumulative latency at batch 1 on one thread, and FLOPs.
2. The sanity reference: a hashed bag of words (lower-cased words of the same
   text, ``zlib.crc32`` into 32,768 buckets, counts), one linear layer, 4
   epochs of Adam on the ``train`` split, its test accuracy over ``--bow-seeds``
   seeds; and the same at 16,384 and 65,536 buckets (what sharing buckets costs).
3. Served latency: ``eenet`` and ``maxprob`` fitted on val at three budgets
   (each paying its own measured cost), served on the first ``--limit`` test
   samples with :class:`eenet.runtime.EarlyExitModel`
   (:func:`eenet.runtime.bench.bench_policy`): realized batch-1 latency over
   the budget, speed-up over the full network, runtime and simulated accuracy.

Usage:
    python benchmarks/wordnet_example.py --out benchmarks/results/wordnet_example.csv
"""
from __future__ import annotations

import argparse
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import eenet
from eenet import EenetError, ExitCache, ExitPolicy, read_cache
from eenet.examples import wordnet as wn
from eenet.ingest.data import load_dataset
from eenet.ingest.model import cache_model, load_model
from eenet.runtime import EarlyExitModel
from eenet.runtime.bench import bench_policy
from eenet.runtime.overhead import choose_overhead

MODEL = "eenet.examples.models:wordnet_transformer"
BOW_BUCKETS = 32_768


def wordnet_caches(cache_dir: Path) -> tuple[ExitCache, ExitCache]:
    """(val, test) caches of the transformer, built under ``cache_dir`` when absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    val, test = cache_dir / "wordnet_val.h5", cache_dir / "wordnet_test.h5"
    if not val.exists():
        print(f"caching wordnet val -> {val}", flush=True)
        cache_model(MODEL, "wordnet:val", val, costs="measured", device="cpu", verbose=False)
    if not test.exists():
        print(f"caching wordnet test -> {test}", flush=True)
        cache_model(MODEL, "wordnet:test", test, costs_from=val, device="cpu", verbose=False)
    return read_cache(val), read_cache(test)


def exit_rows(val: ExitCache, test: ExitCache) -> list[dict]:
    """One row per exit: accuracies, batch-1 latency (ms, cumulative) and FLOPs."""
    acc = {name: (c.predictions() == c.labels[:, None]).mean(axis=0)
           for name, c in (("val", val), ("test", test))}
    lat, flops = val.extra_costs["latency_ms_batch1"], val.extra_costs["flops"]
    return [{"what": f"exit {k}", "test_accuracy": float(acc["test"][k]),
             "val_accuracy": float(acc["val"][k]), "latency_ms_batch1": float(lat[k]),
             "flops": float(flops[k])} for k in range(val.n_exits)]


def bag_of_words(synsets: list[wn.Synset], rows: np.ndarray, n_buckets: int = BOW_BUCKETS
                 ) -> list[torch.Tensor]:
    """Hashed word ids of ``rows``, one int64 tensor per sample (buckets 0 .. n_buckets-1)."""
    return [torch.tensor([zlib.crc32(w.encode("utf-8")) % n_buckets
                          for w in wn.WORD_PATTERN.findall(synsets[r].text.lower())] or [0],
                         dtype=torch.long) for r in rows]


class BagOfWords(nn.Module):
    """A linear layer on hashed word counts: ``sum_w W[:, w] + b``, as an ``EmbeddingBag``."""

    def __init__(self, n_buckets: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.EmbeddingBag(n_buckets, n_classes, mode="sum")
        nn.init.zeros_(self.weight.weight)  # a linear layer starts near 0, not at N(0, 1)
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, docs: list[torch.Tensor]) -> torch.Tensor:
        offsets = torch.tensor([0] + [len(d) for d in docs[:-1]]).cumsum(0)
        return self.weight(torch.cat(docs), offsets) + self.bias


def bow_reference(seed: int, epochs: int = 4, batch_size: int = 64,
                  n_buckets: int = BOW_BUCKETS) -> dict:
    """The hashed bag-of-words logistic regression: test accuracy after ``epochs`` of Adam."""
    synsets = wn.read_synsets()
    labels = np.array([s.lex_filenum for s in synsets], dtype=np.int64)
    train, test = (wn.split_indices(labels, s) for s in ("train", "test"))
    x_train, x_test = (bag_of_words(synsets, rows, n_buckets) for rows in (train, test))
    y_train, y_test = torch.from_numpy(labels[train]), torch.from_numpy(labels[test])
    torch.manual_seed(seed)
    model = BagOfWords(n_buckets, wn.N_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for s in range(0, len(train), batch_size):
            idx = order[s:s + batch_size]
            loss = nn.functional.cross_entropy(model([x_train[i] for i in idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.inference_mode():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return {"what": f"bag of words ({n_buckets} buckets, linear, {epochs} epochs Adam, "
                    f"seed {seed})",
            "test_accuracy": accuracy, "seconds": time.perf_counter() - start}


def served_rows(val: ExitCache, test: ExitCache, limit: int, n_batch1: int, seed: int
                ) -> list[dict]:
    """eenet and maxprob at three budgets, each paying its own cost, served on test."""
    net = load_model(MODEL, device="cpu")
    data = load_dataset("wordnet:test")
    head = test.subset(np.arange(limit))
    overhead = choose_overhead("model", val)
    rows = []
    for budget in val.costs[0] + (val.costs[-1] - val.costs[0]) * np.array([0.2, 0.4, 0.6]):
        for method in ("eenet", "maxprob"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    policy = ExitPolicy(method, seed=seed).fit(val, float(budget),
                                                               overhead=overhead)
                except EenetError as err:  # its own cost puts the first exit over budget
                    print(f"{method} at {budget:.4f} ms: {err}", flush=True)
                    continue
                b = bench_policy(EarlyExitModel(net, policy), data, batch_size=256,
                                 limit=limit, n_batch1=n_batch1)
                simulated = policy.evaluate(head)
            rows.append({"what": f"served {method}", "budget_ms": float(budget),
                         "latency_ms_batch1": b.latency_ms_batch1,
                         "latency_over_budget": b.latency_ms_batch1 / budget,
                         "full_now_over_cached": b.full_ms_batch1 / float(val.costs[-1]),
                         "latency_over_budget_at_cached_speed": b.latency_ms_batch1
                         / b.full_ms_batch1 * float(val.costs[-1]) / budget,
                         "own_cost_first_exit_ms": float(policy.overhead[0]),
                         "speedup_b1": b.full_ms_batch1 / b.latency_ms_batch1,
                         "speedup_b256": b.full_ms_batchB / b.latency_ms_batchB,
                         "test_accuracy": b.accuracy,
                         "simulated_accuracy": simulated.accuracy,
                         "exit_fractions": ";".join(f"{f:.3f}" for f in b.exit_fractions)})
            r = rows[-1]
            print(f"{method:8s} B={budget:.4f} ms: batch-1 {r['latency_ms_batch1']:.4f} ms = "
                  f"{r['latency_over_budget']:.3f} B, speed-up b1 {r['speedup_b1']:.2f} "
                  f"b256 {r['speedup_b256']:.2f}, acc {b.accuracy:.4f} (simulated "
                  f"{simulated.accuracy:.4f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bow-seeds", type=int, default=3,
                    help="seeds of the 32,768-bucket bag-of-words reference")
    ap.add_argument("--limit", type=int, default=2000, help="test samples served")
    ap.add_argument("--batch1", type=int, default=500, help="of them, timed one at a time")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/wordnet_example.csv"))
    args = ap.parse_args()
    val, test = wordnet_caches(args.cache_dir)
    rows = exit_rows(val, test)
    for r in rows:
        print(f"{r['what']}: test {r['test_accuracy']:.4f} val {r['val_accuracy']:.4f} "
              f"{r['latency_ms_batch1']:.4f} ms {r['flops'] / 1e6:.2f} MFLOPs", flush=True)
    for n_buckets in (16_384, BOW_BUCKETS, 65_536):
        seeds = range(args.seed, args.seed + (args.bow_seeds if n_buckets == BOW_BUCKETS
                                              else 1))
        for seed in seeds:
            rows.append(bow_reference(seed, n_buckets=n_buckets))
            print(f"{rows[-1]['what']}: test {rows[-1]['test_accuracy']:.4f} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    rows += served_rows(val, test, args.limit, args.batch1, args.seed)
    table = pd.DataFrame(rows)
    table["seed"], table["eenet_version"] = args.seed, eenet.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
