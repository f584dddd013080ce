"""The bundled examples: a staged multi-exit CNN on Fashion-MNIST, a transformer on WordNet.

- :mod:`eenet.examples.fashion_mnist`: the dataset from the Debian package
  ``dataset-fashion-mnist`` (train / val / test splits, numpy only);
- :mod:`eenet.examples.models`: ``MultiExitCNN`` and the factories
  ``fashion_mnist_cnn4`` / ``fashion_mnist_cnn6`` that load the committed
  checkpoints;
- :mod:`eenet.examples.train`: the script that trained them;
- :mod:`eenet.examples.wordnet`: WordNet 3.0 supersenses from the Debian package
  ``wordnet-base`` (45 classes, hashed word tokens, stratified 80/10/10 split);
- :mod:`eenet.examples.transformer`: ``MultiExitTransformer``, a staged pre-LN
  encoder with an exit after every layer; the factory
  ``eenet.examples.models:wordnet_transformer`` loads its committed checkpoint,
  trained by :mod:`eenet.examples.train_wordnet`.

Example::

    eenet cache --model eenet.examples.models:fashion_mnist_cnn4 \\
        --data fashion-mnist:val --out cache/fmnist_val.h5
    eenet cache --model eenet.examples.models:wordnet_transformer \\
        --data wordnet:val --out cache/wordnet_val.h5
"""
from __future__ import annotations

from eenet.ingest.data import register_dataset

# `--data fashion-mnist:SPLIT` and `--data wordnet:SPLIT` (loaders imported on use)
register_dataset("fashion-mnist", "eenet.examples.fashion_mnist:load_fashion_mnist",
                 splits=("train", "val", "test"))
register_dataset("wordnet", "eenet.examples.wordnet:load_wordnet",
                 splits=("train", "val", "test"))
