"""The bundled networks' exit caches, built on first use (shared by the benchmark scripts)."""
from __future__ import annotations

import argparse
from pathlib import Path

from eenet import ExitCache, read_cache

MODELS = {
    "fashion_mnist_cnn4": "eenet.examples.models:fashion_mnist_cnn4",
    "fashion_mnist_cnn6": "eenet.examples.models:fashion_mnist_cnn6",
}


def bundled_caches(name: str, cache_dir: Path, data_dir: Path | None = None
                   ) -> tuple[ExitCache, ExitCache]:
    """(validation, test) caches of a bundled network, cached under ``cache_dir`` if absent.

    The validation split is timed on this machine (``--costs measured``); the test
    split reuses those costs (``costs_from``): the network's per-exit latency does
    not depend on the split, and timing it twice only adds noise.
    """
    from eenet.ingest.model import cache_model

    cache_dir.mkdir(parents=True, exist_ok=True)
    val, test = cache_dir / f"{name}_val.h5", cache_dir / f"{name}_test.h5"
    if not val.exists():
        print(f"caching {name} val -> {val}", flush=True)
        cache_model(MODELS[name], "fashion-mnist:val", val, data_dir=data_dir,
                    costs="measured", device="cpu", verbose=False)
    if not test.exists():
        print(f"caching {name} test -> {test}", flush=True)
        cache_model(MODELS[name], "fashion-mnist:test", test, data_dir=data_dir,
                    costs_from=val, device="cpu", verbose=False)
    return read_cache(val), read_cache(test)


def add_cache_options(ap: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--data-dir``, the options of every script on the bundled networks."""
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"),
                    help="where the bundled networks' caches are kept (built when absent)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="Fashion-MNIST idx files (default: the Debian package's)")
