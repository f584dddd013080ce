"""The bundled staged multi-exit CNN for Fashion-MNIST.

``MultiExitCNN`` is a chain of convolutional *stages*, each followed by a
small classifier *head* (average pooling + linear). Exit ``k`` is
``heads[k](stages[k](...stages[0](x)))``, which is what makes the model
*staged*: eenet can run it truncated after any stage to time each exit
exactly. Later stages are wider and deeper, so the exits get meaningfully
more expensive.

Factories for ``eenet cache --model``:

- :func:`fashion_mnist_cnn4`: 4 exits, trained weights from the package
  (``fashion_mnist_cnn4.pt``);
- :func:`fashion_mnist_cnn6`: 6 thinner stages, ``fashion_mnist_cnn6.pt``.

Both are trained by ``python -m eenet.examples.train``. The text example,
:func:`wordnet_transformer` (a 6-layer multi-exit transformer on WordNet
supersenses, :mod:`eenet.examples.transformer`), is trained by
``python -m eenet.examples.train_wordnet``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from eenet._validation import EenetError, first_line
from eenet.examples.transformer import MultiExitTransformer

# One stage: (output channels, number of 3x3 conv layers, 2x2 max-pool at the end,
# side of the head's average-pooled grid). Heads pool to a small grid rather than
# globally: with global pooling the shallow exits lose 5-10 points of accuracy.
StagePlan = tuple[int, int, bool, int]

PLANS: dict[int, tuple[StagePlan, ...]] = {
    4: ((16, 1, True, 3), (32, 1, True, 4), (64, 2, False, 3), (128, 1, True, 3)),
    6: ((12, 1, True, 3), (24, 1, True, 3), (32, 1, False, 3), (48, 1, False, 3),
        (64, 1, False, 3), (96, 1, True, 3)),
}
CHECKPOINTS = {4: "fashion_mnist_cnn4.pt", 6: "fashion_mnist_cnn6.pt"}
WORDNET_CHECKPOINT = "wordnet_transformer.pt"
#: the bundled WordNet transformer; sizes keep the float16 checkpoint under 4 MB
WORDNET_ARCH: dict[str, int | float] = {
    "n_classes": 45, "n_buckets": 65_536, "d_embed": 16, "max_len": 40, "n_layers": 6,
    "d_model": 64, "n_heads": 4, "d_ff": 256, "dropout": 0.1}
PACKAGE_DIR = Path(__file__).resolve().parent


def _default_plan(n_exits: int) -> tuple[StagePlan, ...]:
    if n_exits in PLANS:
        return PLANS[n_exits]
    # Widths double every other stage; pool on the first two stages and the last.
    return tuple((16 * 2 ** (k // 2), 1, k < 2 or k == n_exits - 1, 3)
                 for k in range(n_exits))


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class ExitHead(nn.Sequential):
    """Average pooling to a ``grid x grid`` map + linear.

    Features [b, c, h, w] -> pooled [b, c, grid, grid] -> logits [b, n_classes].
    """

    def __init__(self, channels: int, n_classes: int, grid: int = 1) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(grid), nn.Flatten(),
                         nn.Linear(channels * grid * grid, n_classes))


class MultiExitCNN(nn.Module):
    """A staged multi-exit CNN: ``stages`` and ``heads`` of equal length.

    Args:
        n_exits: number of exits (stages); 4 and 6 have tuned plans, other
            counts get a generic widening plan.
        n_classes: classes per exit.
        in_channels: input image channels.
        plan: optional per-stage ``(channels, n_convs, pool, head_grid)``
            tuples, one per exit, overriding the default.

    Shapes:
        input ``[batch, in_channels, 28, 28]``; ``forward`` returns a list of
        ``n_exits`` tensors ``[batch, n_classes]``.

    Example:
        >>> m = MultiExitCNN(4).eval()
        >>> [tuple(o.shape) for o in m(torch.zeros(2, 1, 28, 28))]
        [(2, 10), (2, 10), (2, 10), (2, 10)]
    """

    def __init__(self, n_exits: int = 4, n_classes: int = 10, in_channels: int = 1,
                 plan: Sequence[StagePlan] | None = None) -> None:
        super().__init__()
        if n_exits < 1:
            raise EenetError(f"n_exits must be at least 1, got {n_exits}")
        plan = tuple(plan) if plan is not None else _default_plan(n_exits)
        if len(plan) != n_exits:
            raise EenetError(f"plan has {len(plan)} stages for {n_exits} exits")
        self.n_exits, self.n_classes = n_exits, n_classes
        stages, heads = [], []
        c_in = in_channels
        for c_out, n_convs, pool, grid in plan:
            layers: list[nn.Module] = []
            for j in range(n_convs):
                layers += _conv_block(c_in if j == 0 else c_out, c_out)
            if pool:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            heads.append(ExitHead(c_out, n_classes, grid))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(x))
        return outs


def load_checkpoint(model: nn.Module, path: str | Path,
                    train_command: str = "eenet.examples.train") -> nn.Module:
    """Load a state dict saved by ``eenet.examples.train`` into ``model``.

    Half-precision tensors in the file are cast to the model's dtypes.

    Raises:
        EenetError: the file is missing or does not match the model.
    """
    path = Path(path)
    if not path.is_file():
        raise EenetError(f"checkpoint {path} not found; train it with `python -m "
                         f"{train_command} --out {path}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise EenetError(f"checkpoint {path} cannot be read ({first_line(err)}); "
                         f"retrain it with `python -m {train_command}`") from None
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise EenetError(f"checkpoint {path} does not match {type(model).__name__}: "
                         f"{first_line(err)}") from None
    return model


def _pretrained(n_exits: int) -> MultiExitCNN:
    model = MultiExitCNN(n_exits)
    load_checkpoint(model, PACKAGE_DIR / CHECKPOINTS[n_exits])
    return model.eval()


def fashion_mnist_cnn4() -> MultiExitCNN:
    """The 4-exit example network with its trained weights (``fashion_mnist_cnn4.pt``)."""
    return _pretrained(4)


def fashion_mnist_cnn6() -> MultiExitCNN:
    """The 6-exit example network with its trained weights (``fashion_mnist_cnn6.pt``)."""
    return _pretrained(6)


def wordnet_transformer() -> MultiExitTransformer:
    """The 6-exit WordNet-supersense transformer with its trained weights.

    Reads token ids ``[batch, 40]`` from ``--data wordnet:SPLIT``
    (:mod:`eenet.examples.wordnet`); 45 classes. The word table holds 65,536
    hash buckets 16 wide, projected to the model's 64 (``WORDNET_ARCH``).
    """
    model = MultiExitTransformer(**WORDNET_ARCH)  # type: ignore[arg-type]
    load_checkpoint(model, PACKAGE_DIR / WORDNET_CHECKPOINT, "eenet.examples.train_wordnet")
    return model.eval()
