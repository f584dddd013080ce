"""Train the bundled multi-exit CNN on Fashion-MNIST (CPU, a few minutes).

Usage::

    python -m eenet.examples.train --exits 4 --epochs 3 --seed 0 \\
        --out eenet/examples/fashion_mnist_cnn4.pt

Every exit is trained jointly with the sum of the per-exit cross-entropies
(weights configurable), on the 50,000-image ``train`` split only; the
``val`` and ``test`` splits are never seen during training. The run is
seeded: the same seed, thread count and torch build give the same weights.
The checkpoint is a plain state dict (float32, or float16 when float32 would
exceed ``--max-mb``), loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from eenet._validation import EenetError
from eenet.examples.fashion_mnist import load_fashion_mnist
from eenet.examples.models import MultiExitCNN

logger = logging.getLogger(__name__)


@torch.inference_mode()
def exit_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1000) -> np.ndarray:
    """Accuracy of every exit, float64 [n_exits], for images ``x`` [n, 1, 28, 28]."""
    model.eval()
    hits = None
    for start in range(0, x.shape[0], batch_size):
        outs = model(x[start:start + batch_size])
        right = torch.stack([o.argmax(1) == y[start:start + batch_size] for o in outs])
        hits = right.sum(1) if hits is None else hits + right.sum(1)
    return hits.double().numpy() / x.shape[0]


def train_model(n_exits: int = 4, epochs: int = 3, seed: int = 0, batch_size: int = 128,
                lr: float = 5e-3, weight_decay: float = 5e-4,
                exit_weights: Sequence[float] | None = None, data_dir: str | None = None,
                verbose: bool = True) -> tuple[MultiExitCNN, dict]:
    """Train a :class:`MultiExitCNN` on the ``train`` split.

    Loss: ``sum_k w_k CE(exit_k, y)`` (``w_k = 1`` by default). AdamW with a
    one-cycle learning-rate schedule.

    Returns:
        The trained model (eval mode) and a dict with per-exit ``val`` and
        ``test`` accuracies, ``seconds`` and the settings.
    """
    # The global torch RNG (weight init) is seeded here and restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(n_exits, epochs, seed, batch_size, lr, weight_decay, exit_weights,
                      data_dir, verbose)


def _train(n_exits: int, epochs: int, seed: int, batch_size: int, lr: float,
           weight_decay: float, exit_weights: Sequence[float] | None, data_dir: str | None,
           verbose: bool) -> tuple[MultiExitCNN, dict]:
    weights = torch.tensor(list(exit_weights) if exit_weights is not None
                           else [1.0] * n_exits, dtype=torch.float32)
    if weights.numel() != n_exits:
        raise EenetError(f"exit_weights has {weights.numel()} values for {n_exits} exits")
    gen = torch.Generator().manual_seed(seed)  # the shuffling order
    x_train, y_train = load_fashion_mnist("train", data_dir).tensors
    model = MultiExitCNN(n_exits)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    start_time = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}",
                   file=sys.stderr, disable=not verbose)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            outs = model(x_train[idx])
            losses = torch.stack([loss_fn(o, y_train[idx]) for o in outs])
            loss = (weights * losses).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start_time
    model.eval()
    report = {"n_exits": n_exits, "epochs": epochs, "seed": seed, "seconds": seconds,
              "threads": torch.get_num_threads()}
    for split in ("val", "test"):
        x, y = load_fashion_mnist(split, data_dir).tensors
        report[split] = exit_accuracies(model, x, y).tolist()
    return model, report


def save_checkpoint(model: nn.Module, out: str | Path, max_mb: float = 2.0) -> str:
    """Save the state dict as float32, or float16 if float32 would exceed ``max_mb``.

    Returns:
        The dtype used, ``"float32"`` or ``"float16"``.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    dtype = "float32"
    if buf.tell() > max_mb * 2 ** 20:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        dtype = "float16"
    torch.save(state, out)
    return dtype


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eenet.examples.train",
        description="Train the bundled multi-exit CNN on Fashion-MNIST.",
        epilog="example: python -m eenet.examples.train --exits 4 --epochs 3 --seed 0 "
               "--out eenet/examples/fashion_mnist_cnn4.pt")
    parser.add_argument("--exits", type=int, default=4, help="number of exits (4 or 6 tuned)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    parser.add_argument("--exit-weights", type=float, nargs="+", default=None,
                        help="per-exit loss weights (default: all 1)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST idx directory")
    parser.add_argument("--max-mb", type=float, default=2.0,
                        help="store float16 if the float32 checkpoint is larger")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"directory of --out does not exist: {args.out.parent}")
    model, report = train_model(args.exits, args.epochs, args.seed, args.batch_size,
                                args.lr, exit_weights=args.exit_weights,
                                data_dir=args.data_dir, verbose=not args.quiet)
    dtype = save_checkpoint(model, args.out, args.max_mb)
    size_kb = args.out.stat().st_size / 1024
    lines = [f"trained {args.exits}-exit CNN, {args.epochs} epochs, seed {args.seed}, "
             f"{report['seconds']:.0f} s on {report['threads']} threads",
             "exit  " + "  ".join(f"{k:>6d}" for k in range(args.exits))]
    for split in ("val", "test"):
        lines.append(f"{split:<5} " + "  ".join(f"{a:6.4f}" for a in report[split]))
    lines.append(f"saved {args.out} ({dtype}, {size_kb:.0f} KiB)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
