"""Fashion-MNIST from the gzipped idx files, read with numpy alone.

The files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); torchvision is not needed.

Splits follow the EENet paper's protocol for small image sets: the backbone
trains on 50,000 training images, a fixed held-out set of 10,000 training
images is the validation split on which exit policies are fitted, and the
official 10,000 test images are the test split. The held-out images are the
first 10,000 indices of ``numpy.random.default_rng(0).permutation(60000)``
(``VAL_SEED = 0``), kept in increasing index order; the remaining 50,000,
also in index order, are ``train``.

Images are scaled to [0, 1] and normalised with the mean and standard
deviation of the 60,000 official training images, giving float32 tensors
[1, 28, 28]; labels are int64 in [0, 10).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from eenet._validation import EenetError, check_choice

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "EENET_FASHION_MNIST_DIR"
SPLITS = ("train", "val", "test")
N_CLASSES = 10
N_VAL = 10_000
VAL_SEED = 0
# Pixel statistics of the 60,000 official training images, after scaling to [0, 1].
MEAN = 0.2860406
STD = 0.3530242
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
Split = Literal["train", "val", "test"]


def data_directory(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the idx files, checked to contain all four.

    Args:
        data_dir: explicit directory; else ``$EENET_FASHION_MNIST_DIR``; else
            ``/usr/share/datasets/fashion-mnist``.

    Raises:
        EenetError: a file is missing, with the install command.
    """
    where = Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)
    needed = [name for pair in _FILES.values() for name in pair]
    if not all((where / name).is_file() for name in needed):
        raise EenetError(f"Fashion-MNIST not found in {where}: run `sudo apt-get install "
                         f"dataset-fashion-mnist` or set {ENV_VAR}")
    return where


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one gzipped idx file (big-endian header, uint8 payload)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise EenetError(f"{path}: cannot read the gzipped idx file ({err}); reinstall "
                         f"dataset-fashion-mnist") from None
    # Header: two zero bytes, a type code (0x08 = uint8), the number of
    # dimensions, then one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise EenetError(f"{path}: not a uint8 idx file with {ndim} dimensions; reinstall "
                         f"dataset-fashion-mnist")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise EenetError(f"{path}: holds {len(raw) - offset} bytes of data for shape {shape}; "
                         f"the file is truncated, reinstall dataset-fashion-mnist")
    # Copied out of the read-only bytes buffer, so torch can wrap it without a warning.
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def split_indices(split: Literal["train", "val"]) -> np.ndarray:
    """Indices into the 60,000 official training images of ``train`` or ``val``.

    Example:
        >>> len(split_indices("val")), len(split_indices("train"))
        (10000, 50000)
    """
    perm = np.random.default_rng(VAL_SEED).permutation(60_000)
    chosen = perm[:N_VAL] if split == "val" else perm[N_VAL:]
    return np.sort(chosen)


def load_arrays(split: Split, data_dir: str | os.PathLike | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Raw images and labels of one split.

    Returns:
        ``images`` uint8 [n_samples, 28, 28] and ``labels`` int64 [n_samples].
    """
    check_choice("Fashion-MNIST split", split, SPLITS)
    where = data_directory(data_dir)
    image_file, label_file = _FILES["test" if split == "test" else "train"]
    images = _read_idx(where / image_file, 3)
    labels = _read_idx(where / label_file, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise EenetError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels in "
                         f"the {split} files; reinstall dataset-fashion-mnist")
    if split != "test":
        idx = split_indices(split)
        images, labels = images[idx], labels[idx]
    return images, labels


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, 28, 28] -> normalised float32 tensor [n, 1, 28, 28]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x = x.div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(1)  # [n, 28, 28] -> [n, 1, 28, 28]


def load_fashion_mnist(split: Split = "val",
                       data_dir: str | os.PathLike | None = None) -> TensorDataset:
    """One split as a dataset of (image float32 [1, 28, 28], label int64 0-d tensor).

    Args:
        split: ``"train"`` (50,000 images the network trains on), ``"val"``
            (10,000 held-out training images, for fitting exit policies) or
            ``"test"`` (the official 10,000 test images).
        data_dir: directory of the idx files (see :func:`data_directory`).

    Returns:
        A ``TensorDataset`` over ``[n_samples, 1, 28, 28]`` images and
        ``[n_samples]`` labels.

    Raises:
        EenetError: unknown split, or the files are missing or damaged.

    Example:
        >>> ds = load_fashion_mnist("test")  # doctest: +SKIP
        >>> len(ds), ds[0][0].shape  # doctest: +SKIP
        (10000, torch.Size([1, 28, 28]))
    """
    images, labels = load_arrays(split, data_dir)
    return TensorDataset(normalise(images), torch.from_numpy(labels))


def train() -> TensorDataset:
    """The 50,000-image training split (for ``--data eenet.examples.fashion_mnist:train``)."""
    return load_fashion_mnist("train")


def val() -> TensorDataset:
    """The 10,000-image validation split."""
    return load_fashion_mnist("val")


def test() -> TensorDataset:
    """The official 10,000-image test split."""
    return load_fashion_mnist("test")


test.__test__ = False  # a dataset factory, not a pytest test
