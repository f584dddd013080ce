"""eenet: learn which sample leaves a frozen multi-exit network at which exit.

A post-hoc exit-policy learner after EENet (Ilhan et al., "EENet: Learning to
Early Exit for Adaptive Inference", WACV 2024), with the classic policies
(MSDNet max-probability, BranchyNet entropy, PABEE patience) on the same data.
The pipeline, by package: :mod:`eenet.ingest` makes exit caches
(:mod:`eenet.cache`), :mod:`eenet.scores` scores every exit, :mod:`eenet.rules`
turns scores into exits under a budget, :mod:`eenet.policy` ties a scorer to a
rule, :mod:`eenet.evaluate`, :mod:`eenet.sweep` and :mod:`eenet.report` measure
it.

Example:
    >>> from eenet import ExitPolicy, synthetic_example
    >>> val, test = synthetic_example(seed=0)
    >>> ExitPolicy("entropy").fit(val, budget=4.0).evaluate(test).n_samples
    4000
"""
from __future__ import annotations

__version__ = "0.2.0"

from eenet._validation import CacheError, EenetError  # noqa: E402
from eenet.cache import ExitCache, read_cache, write_cache  # noqa: E402
from eenet.evaluate import EvalResult  # noqa: E402
from eenet.policy import ExitPolicy  # noqa: E402
from eenet.scores import METHODS  # noqa: E402
from eenet.sweep import run_sweep  # noqa: E402
from eenet.synthetic import synthetic_cache, synthetic_example  # noqa: E402

import eenet.examples  # noqa: E402,F401  (registers the bundled dataset names)

__all__ = ["CacheError", "EenetError", "EvalResult", "ExitCache", "ExitPolicy", "METHODS",
           "__version__", "read_cache", "run_sweep", "synthetic_cache", "synthetic_example",
           "write_cache"]
