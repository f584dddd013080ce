"""Train the bundled multi-exit transformer on WordNet supersenses (one CPU thread, < 30 min).

Usage::

    python -m eenet.examples.train_wordnet --epochs 4 --seed 0 \\
        --out eenet/examples/wordnet_transformer.pt

Every exit is trained jointly on the unweighted sum of the exits' cross-entropies:
equal weights ask each layer's ``[CLS]`` state to be as good a classifier as it
can be, without favouring shallow or deep exits (and so no policy). The
network sees the ``train`` split only. AdamW with linear warm-up and cosine
decay; batches group sequences of similar length and are cut to their longest
sequence, which changes nothing (padding gets no attention) and saves most of
the compute. The run is seeded: the same seed, thread count and torch build give
the same weights. The checkpoint is a float16 state dict, loadable with
``torch.load(weights_only=True)``. The committed checkpoint took 554 s with the
defaults (4 epochs, peak learning rate 3e-3, batch 64, one thread) on a 2-core
machine while a second training ran on the other core; one thread beats two on
a 2-core machine other jobs share, since two threads spinning on busy cores wait
on each other.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from eenet.examples.models import WORDNET_ARCH, MultiExitTransformer
from eenet.examples.train import save_checkpoint
from eenet.examples.wordnet import PAD_ID, load_arrays


def trim(ids: Tensor) -> Tensor:
    """Cut a batch of token ids [b, t] to its longest sequence [b, t']."""
    longest = int((ids != PAD_ID).sum(1).max())
    return ids[:, :max(longest, 1)]


@torch.inference_mode()
def exit_accuracies(model: nn.Module, ids: Tensor, y: Tensor, batch_size: int = 512
                    ) -> np.ndarray:
    """Accuracy of every exit, float64 [n_exits], for token ids [n, seq_len]."""
    model.eval()
    hits = torch.zeros(len(model.heads), dtype=torch.long)
    for start in range(0, ids.shape[0], batch_size):
        outs = model(trim(ids[start:start + batch_size]))
        hits += torch.stack([(o.argmax(1) == y[start:start + batch_size]).sum() for o in outs])
    return hits.double().numpy() / ids.shape[0]


def batch_order(lengths: Tensor, batch_size: int, gen: torch.Generator,
                window: int = 50) -> list[Tensor]:
    """One epoch's batches: shuffled, then sorted by length within windows of ``window``
    batches so a batch holds sequences of similar length (less padding to cut), in a
    shuffled order.

    Returns:
        Index tensors, one per batch (the last may be shorter).
    """
    order = torch.randperm(lengths.shape[0], generator=gen)
    span = batch_size * window
    batches = []
    for start in range(0, order.shape[0], span):
        chunk = order[start:start + span]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0: the learning-rate factor at ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_model(epochs: float = 4.0, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                weight_decay: float = 0.01, data_dir: str | None = None,
                verbose: bool = True, **arch: int | float) -> tuple[nn.Module, dict]:
    """Train a :class:`MultiExitTransformer` (``WORDNET_ARCH``, updated by ``arch``) on ``train``.

    Args:
        epochs: passes over the training split (a fraction runs part of one).

    Returns:
        The trained model (eval mode) and a dict with per-exit ``val`` and
        ``test`` accuracies, ``seconds`` and the settings.
    """
    with torch.random.fork_rng(devices=[]):  # weight init and dropout, restored afterwards
        torch.manual_seed(seed)
        arch = {**WORDNET_ARCH, **arch}
        model = MultiExitTransformer(**arch)
        tokens = {"max_len": int(arch["max_len"]), "n_buckets": int(arch["n_buckets"])}
        ids, y = (torch.from_numpy(a) for a in load_arrays("train", data_dir, **tokens))
        gen = torch.Generator().manual_seed(seed)  # the shuffling order
        steps_per_epoch = math.ceil(ids.shape[0] / batch_size)
        total = max(1, round(epochs * steps_per_epoch))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _schedule(s, total, max(1, total // 20)))
        start_time = time.perf_counter()
        bar = tqdm(range(total), desc="training", file=sys.stderr, disable=not verbose)
        model.train()
        lengths = (ids != PAD_ID).sum(1)
        batches: list[Tensor] = []
        for step in bar:
            if step % steps_per_epoch == 0:
                batches = batch_order(lengths, batch_size, gen)
            idx = batches[step % steps_per_epoch]
            outs = model(trim(ids[idx]))
            loss = sum(nn.functional.cross_entropy(o, y[idx]) for o in outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item() / len(outs):.3f}")
        seconds = time.perf_counter() - start_time
    model.eval()
    report = {"epochs": epochs, "seed": seed, "seconds": seconds, "steps": total,
              "threads": torch.get_num_threads()}
    for split in ("val", "test"):
        x, t = (torch.from_numpy(a) for a in load_arrays(split, data_dir, **tokens))
        report[split] = exit_accuracies(model, x, t).tolist()
    return model, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eenet.examples.train_wordnet",
        description="Train the bundled multi-exit transformer on WordNet supersenses.",
        epilog="example: python -m eenet.examples.train_wordnet --epochs 4 --seed 0 "
               "--out eenet/examples/wordnet_transformer.pt")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (on a shared 2-core machine, 1 is faster)")
    parser.add_argument("--data-dir", default=None, help="folder of the WordNet data.* files")
    parser.add_argument("--d-model", type=int, default=WORDNET_ARCH["d_model"])
    parser.add_argument("--d-ff", type=int, default=WORDNET_ARCH["d_ff"])
    parser.add_argument("--layers", type=int, default=WORDNET_ARCH["n_layers"])
    parser.add_argument("--buckets", type=int, default=WORDNET_ARCH["n_buckets"],
                        help="hash buckets of the word table")
    parser.add_argument("--d-embed", type=int, default=WORDNET_ARCH.get("d_embed"),
                        help="width of the word table (projected to --d-model)")
    parser.add_argument("--out", type=Path, help="checkpoint path (.pt); none for a trial")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"directory of --out does not exist: {args.out.parent}")
    torch.set_num_threads(args.threads)
    model, report = train_model(args.epochs, args.seed, args.batch_size, args.lr,
                                data_dir=args.data_dir, verbose=not args.quiet,
                                d_model=args.d_model, d_ff=args.d_ff, n_layers=args.layers,
                                n_buckets=args.buckets, d_embed=args.d_embed)
    n_exits = len(model.heads)
    lines = [f"trained {n_exits}-layer transformer, {args.epochs:g} epochs ({report['steps']} "
             f"steps), seed {args.seed}, {report['seconds']:.0f} s on {report['threads']} "
             f"threads", "exit  " + "  ".join(f"{k:>6d}" for k in range(n_exits))]
    for split in ("val", "test"):
        lines.append(f"{split:<5} " + "  ".join(f"{a:6.4f}" for a in report[split]))
    if args.out is not None:
        dtype = save_checkpoint(model, args.out, max_mb=0.0)
        lines.append(f"saved {args.out} ({dtype}, {args.out.stat().st_size / 1024:.0f} KiB)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
