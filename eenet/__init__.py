"""eenet: learn which sample leaves a frozen multi-exit network at which exit.

A post-hoc exit-policy learner after EENet (Ilhan et al., "EENet: Learning to
Early Exit for Adaptive Inference", WACV 2024), with the classic policies
(MSDNet max-probability, BranchyNet entropy, PABEE patience) on the same data.
"""
from __future__ import annotations

__version__ = "0.1.0"
