"""eenet: learn which sample leaves a frozen multi-exit network at which exit.

A post-hoc exit-policy learner after EENet (Ilhan et al., "EENet: Learning to
Early Exit for Adaptive Inference", WACV 2024), with the classic policies
(MSDNet max-probability, BranchyNet entropy, PABEE patience) on the same data.

Example:
    >>> from eenet import ExitPolicy, synthetic_example
    >>> val, test = synthetic_example(seed=0)
    >>> ExitPolicy("entropy").fit(val, budget=4.0).evaluate(test).n_samples
    4000
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Heavy names (torch, pandas) load on first use, so `import eenet` and `eenet --help` stay fast.
_LAZY = {
    "ExitCache": "eenet.cache", "read_cache": "eenet.cache", "write_cache": "eenet.cache",
    "CacheWriter": "eenet.cache", "EenetError": "eenet._validation",
    "synthetic_cache": "eenet.synthetic", "synthetic_example": "eenet.synthetic",
    "ExitPolicy": "eenet.exit_policy", "evaluate_oracle": "eenet.exit_policy",
    "METHODS": "eenet.exit_policy", "EvalResult": "eenet.evaluate",
    "run_sweep": "eenet.sweep", "plot_sweep": "eenet.sweep",
    "import_exit_outputs": "eenet.ingest.arrays",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eenet' has no attribute {name!r}")
