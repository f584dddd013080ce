"""The bundled example: a staged multi-exit CNN trained on Fashion-MNIST.

- :mod:`eenet.examples.fashion_mnist`: the dataset from the Debian package
  ``dataset-fashion-mnist`` (train / val / test splits, numpy only);
- :mod:`eenet.examples.models`: ``MultiExitCNN`` and the factories
  ``fashion_mnist_cnn4`` / ``fashion_mnist_cnn6`` that load the committed
  checkpoints;
- :mod:`eenet.examples.train`: the script that trained them.

Example::

    eenet cache --model eenet.examples.models:fashion_mnist_cnn4 \\
        --data fashion-mnist:val --out cache/fmnist_val.h5
"""
from __future__ import annotations

from eenet.ingest.data import register_dataset

# `--data fashion-mnist:SPLIT` (the loader is imported only when the name is used)
register_dataset("fashion-mnist", "eenet.examples.fashion_mnist:load_fashion_mnist",
                 splits=("train", "val", "test"))
