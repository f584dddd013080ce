"""A staged multi-exit network plus a fitted policy: an ``nn.Module`` that really stops computing.

The staged protocol
-------------------
A *staged* model has two module lists of equal length, ``stages`` and
``heads``, with exit k = ``heads[k](stages[k](...stages[0](x)))``::

    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([block1, block2, block3])
            self.heads = nn.ModuleList([head1, head2, head3])

An existing network adapts in a few lines: group the layers between two
exits into one stage and give each exit its classifier as a head. A stage may
pass a tensor or a tuple/dict of tensors whose first dimension is the batch
(a transformer's hidden states and attention mask, say); the runtime keeps
the rows of the samples still running in every one of them.

How a batch runs
----------------
After stage k the runtime runs head k and the policy's exit-k score on the
samples still running only; those whose score reaches their threshold leave
with head k's answer, and stage k + 1 runs on the rest. No stage runs for a
sample that has left, and a stage no sample reaches never runs. The order of
the batch is restored at the end. All of it is tensor indexing on the
model's device: no Python work per sample.

A model that is not staged (it only exposes its exit modules) can stop early
at batch size 1: see :class:`eenet.runtime.hooks.HookedEarlyExit`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from eenet._validation import EenetError
from eenet.ingest.forward import select_rows
from eenet.policy import ExitPolicy

__all__ = ["EarlyExitModel", "EarlyExitOutput", "staged_parts"]


class EarlyExitOutput(NamedTuple):
    """What :class:`EarlyExitModel` returns, one row per sample in the batch's order.

    Attributes:
        prediction: [batch] int64 arg-max class at the exit taken.
        exit: [batch] int64 exit taken (0-based).
        score: [batch] float64 the score that decided the exit (NaN at the last
            exit, which takes everyone left without a decision).
        logits: [batch, n_classes] float32 logits of the exit taken.
    """

    prediction: Tensor
    exit: Tensor
    score: Tensor
    logits: Tensor


def staged_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The ``stages`` and ``heads`` of a staged model.

    Raises:
        EenetError: the model does not follow the staged protocol.
    """
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(heads, nn.ModuleList):
        raise EenetError(f"{type(model).__name__} is not staged: batched early exit needs "
                         f"`stages` and `heads` nn.ModuleLists (exit k = heads[k](stages[k]"
                         f"(...))); see eenet.runtime.model, or serve batch size 1 with "
                         f"hooks (eenet.runtime.hooks.HookedEarlyExit)")
    if len(stages) != len(heads) or len(stages) == 0:
        raise EenetError(f"{type(model).__name__} has {len(stages)} stages and {len(heads)} "
                         f"heads; the staged protocol needs one head per stage")
    return stages, heads


def _resolve_policy(policy: ExitPolicy | str | os.PathLike) -> ExitPolicy:
    if isinstance(policy, ExitPolicy):
        return policy
    return ExitPolicy.load(Path(policy))


class EarlyExitModel(nn.Module):
    """Serve a staged multi-exit network under a fitted exit policy, stopping early for real.

    Args:
        model: a staged multi-exit network (see the module docstring); it is
            put in eval mode and its parameters are not trained further.
        policy: a fitted :class:`~eenet.policy.ExitPolicy` or the path of a
            policy file (``eenet fit``).

    The module's ``forward(x, sample_ids=None)`` returns an
    :class:`EarlyExitOutput`. ``sample_ids`` (int64 [batch]) decide which
    samples a mixed rule (PABEE's two patience values) sends where; without
    them the samples are numbered in the order the module sees them, so a
    stream of requests gets the same exits as a simulation over the same
    samples in that order.

    Example:
        >>> import torch
        >>> from eenet import ExitPolicy, synthetic_cache
        >>> from eenet.examples.models import MultiExitCNN
        >>> net = MultiExitCNN(3).eval()
        >>> cache = synthetic_cache(300, n_exits=3, n_classes=10)
        >>> served = EarlyExitModel(net, ExitPolicy("maxprob").fit(cache, budget=3.0))
        >>> out = served(torch.randn(5, 1, 28, 28))
        >>> out.exit.shape, out.prediction.dtype
        (torch.Size([5]), torch.int64)
    """

    def __init__(self, model: nn.Module, policy: ExitPolicy | str | os.PathLike) -> None:
        super().__init__()
        self.model = model.eval()
        self.stages, self.heads = staged_parts(model)
        self.policy = _resolve_policy(policy)
        rule = self.policy.rule
        if rule is None:
            raise EenetError("the policy is not fitted; call ExitPolicy.fit() first")
        if rule.n_exits != len(self.stages):
            raise EenetError(f"the policy was fitted for {rule.n_exits} exits but the model "
                             f"has {len(self.stages)}; fit a policy on a cache of this model")
        self.n_exits = len(self.stages)
        self.n_classes = int(self.policy.reference["n_classes"])  # type: ignore[index]
        self.samples_seen = 0
        self.stage_calls = [0] * self.n_exits  # how many times each stage ran, for tests/stats
        # plain lists: indexing an nn.ModuleList costs microseconds, a list nanoseconds
        self._stage_list, self._head_list = list(self.stages), list(self.heads)
        self._shared: dict[torch.device, tuple[Any, Tensor]] = {}  # rule, thresholds

    def extra_repr(self) -> str:
        return f"policy={self.policy.describe()}"

    def _thresholds(self, sample_ids: Tensor | None, batch: int, device: torch.device
                    ) -> Tensor:
        """Each sample's thresholds, float64 [batch, n_exits] (or [n_exits] shared by all)."""
        rule = self.policy.rule
        first = self.samples_seen
        self.samples_seen += batch
        if rule.alt is None or rule.mix <= 0:  # type: ignore[union-attr]
            kept = self._shared.get(device)
            if kept is None or kept[0] is not rule:  # a recalibrated policy has a new rule
                kept = (rule, torch.as_tensor(rule.values, dtype=torch.float64,  # type: ignore
                                              device=device))
                self._shared[device] = kept
            return kept[1]
        if sample_ids is None:
            ids = np.arange(first, first + batch)
        else:
            ids = np.asarray(sample_ids.detach().cpu() if isinstance(sample_ids, Tensor)
                             else sample_ids, dtype=np.int64)
            if ids.shape != (batch,):
                raise EenetError(f"sample_ids must have shape ({batch},), got {ids.shape}")
        per_sample = rule.per_sample(ids)  # type: ignore[union-attr]
        return torch.as_tensor(np.ascontiguousarray(per_sample), dtype=torch.float64,
                               device=device)

    def _check_classes(self, logits: Tensor) -> None:
        """Refuse exit outputs of another class count than the policy's ([batch, n_classes])."""
        if logits.ndim != 2 or logits.shape[1] != self.n_classes:
            raise EenetError(f"the network's first exit gives logits of shape "
                             f"{list(logits.shape)} but the policy was fitted for "
                             f"{self.n_classes} classes; serve the network of the policy's "
                             f"cache, or fit a policy on a cache of this network")

    @torch.inference_mode()
    def forward(self, x: Any, sample_ids: Tensor | None = None) -> EarlyExitOutput:
        """Run the batch ``x``, each sample only as deep as the policy sends it."""
        batch, device = _batch_and_device(x)
        thresholds = self._thresholds(sample_ids, batch, device)
        if batch == 1:
            return self._forward_one(x, thresholds, device)
        return self._forward_batch(x, thresholds, batch, device)

    def _forward_one(self, x: Any, thresholds: Tensor, device: torch.device
                     ) -> EarlyExitOutput:
        """One sample: no bookkeeping, it just stops."""
        state: dict[str, Tensor] = {}
        last = self.n_exits - 1
        h = x
        for k in range(self.n_exits):
            self.stage_calls[k] += 1
            h = self._stage_list[k](h)
            logits = self._head_list[k](h).float()
            if k == 0:
                self._check_classes(logits)
                state = self.policy.scorer.start(1, logits.shape[1], device)
            if k == last:
                score = torch.full((1,), float("nan"), dtype=torch.float64, device=device)
                break
            score = self.policy.scorer.score_exit(k, logits, state).double()
            if bool(score >= thresholds[..., k]):  # one synchronisation per exit
                break
        return EarlyExitOutput(logits.argmax(dim=1), torch.full((1,), k, device=device),
                               score, logits)

    def _forward_batch(self, x: Any, thresholds: Tensor, batch: int, device: torch.device
                       ) -> EarlyExitOutput:
        """A batch: samples that leave are written out, the rest go on, compacted."""
        per_sample = thresholds.ndim == 2
        running = torch.arange(batch, device=device)  # original positions still running
        out_exit = torch.full((batch,), self.n_exits - 1, dtype=torch.long, device=device)
        out_score = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        out_logits = torch.empty(0, self.n_classes, device=device)
        state: dict[str, Tensor] = {}
        h = x
        for k in range(self.n_exits):
            if running.numel() == 0:
                break
            self.stage_calls[k] += 1
            h = self._stage_list[k](h)
            logits = self._head_list[k](h).float()
            if k == 0:
                self._check_classes(logits)
                out_logits = logits.new_empty((batch, logits.shape[1]))
                state = self.policy.scorer.start(batch, logits.shape[1], device)
            if k == self.n_exits - 1:
                out_logits[running] = logits
                break
            score = self.policy.scorer.score_exit(k, logits, state).double()
            leave = score >= (thresholds[:, k] if per_sample else thresholds[k])
            n_leave = int(leave.sum())  # one synchronisation per exit
            if n_leave == running.numel():  # everyone left: no compaction needed
                out_exit[running], out_score[running], out_logits[running] = k, score, logits
                break
            if n_leave == 0:
                continue
            gone = running[leave]
            out_exit[gone], out_score[gone], out_logits[gone] = k, score[leave], logits[leave]
            stay = ~leave
            running, h = running[stay], select_rows(h, stay)
            thresholds = thresholds[stay] if per_sample else thresholds
            state = {name: value[stay] for name, value in state.items()}
        if batch == 0:
            return EarlyExitOutput(out_exit, out_exit.clone(), out_score, out_logits)
        return EarlyExitOutput(out_logits.argmax(dim=1), out_exit, out_score, out_logits)


def _batch_and_device(x: Any) -> tuple[int, torch.device]:
    """The batch size and device of a batch: its first tensor's."""
    if isinstance(x, Tensor):
        return int(x.shape[0]), x.device
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(x):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0]), leaf.device
    raise EenetError("the model input holds no tensor with a batch dimension")
