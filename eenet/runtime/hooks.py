"""Batch-1 early exit for a model that is not staged: forward hooks on its exit modules.

When to use it
--------------
Use :class:`HookedEarlyExit` for a multi-exit network whose forward computes
its exits one after another but is not split into ``stages`` and ``heads``
(a backbone with side branches, a transformer with a classifier on some
layers), when one sample at a time is enough. It puts a forward hook on the
module that produces each exit's logits (named with ``exit_modules``, or
found with one forward on ``example_input``). The hook of exit k scores it
with the policy's scorer, from exits 0..k with the scorer's state kept
across the hooks, and compares the score with the sample's threshold (the
last exit takes the sample whatever its score). When the sample leaves, the
hook raises a private exception that unwinds the rest of the model's
forward; the wrapper catches it and returns the exit's answer as an
:class:`~eenet.runtime.model.EarlyExitOutput`, the same as
:class:`~eenet.runtime.model.EarlyExitModel` returns.

What it cannot do
-----------------
- **Batches.** A sample that leaves cannot be taken out of the tensors inside
  a forward someone else wrote, so a batch of more than one sample raises
  :class:`~eenet._validation.EenetError`: batched early exit needs the staged
  protocol (:mod:`eenet.runtime.model`). An empty batch returns empty outputs.
- **Save work that runs before the exit fires.** Only what the forward does
  after exit k's module is skipped. A model that runs its whole backbone and
  then all its heads saves only the later heads (a warning says so when
  ``example_input`` shows it); one whose exits fire out of order (exit 1's
  module before exit 0's, or one module twice) is refused with an
  ``EenetError``, since exit k would be decided without exits 0..k-1.
- **Models without hooks**: TorchScript modules are refused; compiled
  (``torch.compile``) forwards do not call module hooks.
- **A forward that catches ``BaseException``** swallows the stop. The stop
  derives from ``BaseException``, so ``except Exception`` in the model's code
  does not catch it.

The hooks stay on the model while the wrapper lives and do nothing outside
its calls, so calling the model directly still works; :meth:`HookedEarlyExit.remove_hooks`
takes them off. One call at a time per wrapper (not thread-safe).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from eenet._validation import EenetError
from eenet.ingest.forward import (batch_len, exit_logits, find_exit_modules, match_exit_modules,
                                  record_module_outputs)
from eenet.ingest.resolve import describe
from eenet.policy import ExitPolicy
from eenet.runtime.model import EarlyExitOutput

__all__ = ["HookedEarlyExit"]


class _Exited(BaseException):
    """Raised from an exit's hook when the sample leaves; caught by ``HookedEarlyExit``.

    A ``BaseException`` so that a model's own ``except Exception`` does not
    swallow it (like ``KeyboardInterrupt``).
    """


class _Run:
    """The state of one sample's pass: next exit expected, scorer state, the answer."""

    __slots__ = ("thresholds", "next", "state", "exit", "score", "logits")

    def __init__(self, thresholds: np.ndarray) -> None:
        self.thresholds = thresholds  # float64 [n_exits]
        self.next = 0
        self.state: dict[str, Tensor] = {}
        self.exit = -1
        self.score: Tensor | None = None
        self.logits: Tensor | None = None


def _resolve_policy(policy: ExitPolicy | str | os.PathLike) -> ExitPolicy:
    return policy if isinstance(policy, ExitPolicy) else ExitPolicy.load(Path(policy))


def _within(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


class HookedEarlyExit(nn.Module):
    """Serve a non-staged multi-exit model one sample at a time, stopping at the exit.

    Args:
        model: a multi-exit network whose exits are produced by submodules,
            one per exit, that run in exit order; put in eval mode.
        policy: a fitted :class:`~eenet.policy.ExitPolicy` (or a policy file)
            for this model's exits.
        exit_modules: the name of the module producing each exit's logits
            (``dict(model.named_modules())`` keys), one per exit, in order.
            Each must return its exit's logits as a tensor ``[1, n_classes]``.
        example_input: one sample the model accepts. Without ``exit_modules``
            the exit modules are found with one forward on it (the outermost
            module whose output holds an exit's tensor and no other exit's;
            see :func:`~eenet.ingest.forward.find_exit_modules`, which needs a
            forward returning the exits as a list or tuple of logits); with
            them, that forward checks their order and outputs. Either way it
            warns when no layer runs between the first and the last exit module.

    The module's ``forward(x, sample_ids=None)`` takes a batch of one sample
    and returns an :class:`~eenet.runtime.model.EarlyExitOutput` with one row.
    ``sample_ids`` (one id) decides which of a mixed rule's threshold vectors
    the sample uses; without it the samples are numbered in the order the
    wrapper sees them, as :class:`~eenet.runtime.model.EarlyExitModel` does.

    Raises:
        EenetError: neither ``exit_modules`` nor ``example_input``; unknown or
            shared module names; a policy for another number of exits or not
            fitted; a TorchScript model; exits that fire out of order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from eenet import ExitPolicy, synthetic_cache
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block1, self.block2 = nn.Linear(4, 8), nn.Linear(8, 8)
        ...         self.exit1, self.exit2 = nn.Linear(8, 10), nn.Linear(8, 10)
        ...     def forward(self, x):
        ...         a = self.block1(x)
        ...         first = self.exit1(a)
        ...         return [first, self.exit2(self.block2(a))]
        >>> policy = ExitPolicy("maxprob").fit(synthetic_cache(300, n_exits=2), budget=1.5)
        >>> served = HookedEarlyExit(Net(), policy, example_input=torch.zeros(1, 4))
        >>> served.exit_names
        ['exit1', 'exit2']
        >>> out = served(torch.zeros(1, 4))
        >>> out.exit.shape, out.logits.shape
        (torch.Size([1]), torch.Size([1, 10]))
    """

    def __init__(self, model: nn.Module, policy: ExitPolicy | str | os.PathLike, *,
                 exit_modules: Sequence[str] | None = None,
                 example_input: Any = None) -> None:
        super().__init__()
        if isinstance(model, torch.jit.ScriptModule):
            raise EenetError("a TorchScript model takes no forward hooks, so it cannot stop "
                             "at an exit; serve the eager model, or a staged one with "
                             "eenet.runtime.model.EarlyExitModel")
        self.model = model.eval()
        self.policy = _resolve_policy(policy)
        rule = self.policy.rule
        if rule is None:
            raise EenetError("the policy is not fitted; call ExitPolicy.fit() first")
        self.n_exits = rule.n_exits
        reference = self.policy.reference or {}
        self.n_classes = int(reference.get("n_classes", 0))
        if exit_modules is not None:
            if len(exit_modules) != self.n_exits:
                raise EenetError(f"exit_modules names {len(exit_modules)} modules but the "
                                 f"policy was fitted for {self.n_exits} exits; name one module "
                                 f"per exit")
            named = find_exit_modules(model, example_input, self.n_exits, exit_modules)
            names = [n for n, _ in named]
            leaves: list[int | None] = [None] * len(names)
            if example_input is not None:
                self._check_order(names, *record_module_outputs(model, example_input))
        elif example_input is not None:
            # One forward both finds the modules and checks their order.
            outs, records = record_module_outputs(model, example_input)
            exit_logits(outs, batch_len(example_input))  # the forward contract, or one line
            if len(outs) != self.n_exits:
                raise EenetError(f"the model returns {len(outs)} exits but the policy was "
                                 f"fitted for {self.n_exits}; fit a policy on a cache of this "
                                 f"model")
            found = match_exit_modules(outs, records)
            names, leaves = [n for n, _ in found], [i for _, i in found]
            self._check_order(names, outs, records)
        else:
            raise EenetError("HookedEarlyExit needs the module producing each exit: name them "
                             "with exit_modules=[...], or pass example_input (one sample) to "
                             "find them with one forward")
        self.exit_names = names
        self.samples_seen = 0
        self._run: _Run | None = None
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._make_hook(k, leaf))
                         for k, (n, leaf) in enumerate(zip(names, leaves))]

    def extra_repr(self) -> str:
        return f"exits={self.exit_names}, policy={self.policy.describe()}"

    def remove_hooks(self) -> None:
        """Take the hooks off the model; the wrapper cannot serve afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- checks ----------------------------------------------------------------
    def _check_order(self, names: list[str], outs: Any,
                     records: list[tuple[str, list[Tensor]]]) -> None:
        """Exit modules must finish once each, in exit order; warn when no backbone work
        runs between the first and the last exit (nothing to save by stopping)."""
        order = [n for n, _ in records if n in names]
        if order != names:
            raise EenetError(f"the exit modules finish in the order {order} during the forward, "
                             f"not once each in exit order {names}; early exit by hooks needs "
                             f"exit k's module to run before exit k + 1's (a model that "
                             f"computes its exits out of order cannot stop early); reorder "
                             f"the forward or use the staged protocol (eenet.runtime.model)")
        for n, ts in records:
            if n in names and self.n_classes and not any(
                    t.ndim == 2 and t.shape[1] == self.n_classes for t in ts):
                raise EenetError(f"exit module {n!r} returned {describe(ts)}; expected the "
                                 f"exit's logits [1, {self.n_classes}] (the policy's class "
                                 f"count)")
        modules = dict(self.model.named_modules())
        leaf = {n for n, m in modules.items() if n and next(m.children(), None) is None}
        first = next(i for i, (n, _) in enumerate(records) if n == names[0])
        last = next(i for i, (n, _) in enumerate(records) if n == names[-1])
        between = [n for n, _ in records[first + 1:last]
                   if n in leaf and not any(_within(n, e) for e in names)]
        if not between:
            warnings.warn(f"{type(self.model).__name__} runs no layer between its first and "
                          f"last exit modules (its backbone runs before the heads), so "
                          f"stopping at an exit saves only the later heads; compute each "
                          f"exit right after its block, or use the staged protocol",
                          stacklevel=3)

    # ---- serving ---------------------------------------------------------------
    def _make_hook(self, k: int, leaf: int | None) -> Callable[..., None]:
        last = self.n_exits - 1

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            run = self._run
            if run is None:  # the model called outside the wrapper
                return
            logits = output if leaf is None else [
                t for t in tree_leaves(output) if isinstance(t, Tensor)][leaf]
            if k != run.next:
                raise EenetError(
                    f"exit {k} ({self.exit_names[k]!r}) fired when exit {run.next} was "
                    f"expected; early exit by hooks needs each exit's module to run once, "
                    f"in exit order (a model that runs its heads out of order cannot stop "
                    f"early); reorder the forward or use the staged protocol "
                    f"(eenet.runtime.model)")
            if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != 1 or \
                    (self.n_classes and logits.shape[1] != self.n_classes):
                raise EenetError(f"exit module {self.exit_names[k]!r} returned "
                                 f"{describe(logits)}; expected exit {k}'s logits "
                                 f"[1, {self.n_classes or 'n_classes'}]")
            logits = logits.float()
            run.next = k + 1
            scorer = self.policy.scorer
            if k == 0:
                run.state = scorer.start(1, logits.shape[1], logits.device)
            if k == last:  # the last exit takes the sample whatever its score
                run.score = torch.full((1,), float("nan"), dtype=torch.float64,
                                       device=logits.device)
            else:
                score = scorer.score_exit(k, logits, run.state).double()
                if not score.item() >= run.thresholds[k]:  # one synchronisation per exit
                    return
                run.score = score
            run.exit, run.logits = k, logits
            raise _Exited

        return hook

    def _thresholds(self, sample_ids: Any) -> np.ndarray:
        """The sample's thresholds, float64 [n_exits]."""
        rule = self.policy.rule
        assert rule is not None
        first = self.samples_seen
        self.samples_seen += 1
        if rule.alt is None or rule.mix <= 0:
            return rule.values
        if sample_ids is None:
            ids = np.array([first], dtype=np.int64)
        else:
            ids = np.asarray(sample_ids.detach().cpu() if isinstance(sample_ids, Tensor)
                             else sample_ids, dtype=np.int64).reshape(-1)
            if ids.shape != (1,):
                raise EenetError(f"sample_ids must hold one id for a batch of one sample, got "
                                 f"shape {ids.shape}")
        return rule.per_sample(ids)[0]

    @torch.inference_mode()
    def forward(self, x: Any, sample_ids: Tensor | int | None = None) -> EarlyExitOutput:
        """Run one sample ``x`` (batch of 1) until the policy lets it leave.

        Args:
            x: the model's input for one sample (first axis the batch, of size 1).
            sample_ids: the sample's id (one value); default: a running counter.

        Returns:
            :class:`~eenet.runtime.model.EarlyExitOutput` with one row (none for
            an empty batch).

        Raises:
            EenetError: a batch of more than one sample, exits out of order, a
                forward that ends before the last exit fired, hooks removed.
        """
        batch = batch_len(x)
        if batch > 1:
            raise EenetError(f"HookedEarlyExit serves one sample at a time, got a batch of "
                             f"{batch}; batches need the staged protocol (stages and heads; "
                             f"see eenet.runtime.model.EarlyExitModel)")
        if not self._handles:
            raise EenetError("the hooks were removed (remove_hooks()); make a new "
                             "HookedEarlyExit to serve")
        if batch == 0:
            device = next(t.device for t in tree_leaves(x) if isinstance(t, Tensor))
            none = torch.empty(0, dtype=torch.long, device=device)
            return EarlyExitOutput(none, none.clone(),
                                   torch.empty(0, dtype=torch.float64, device=device),
                                   torch.empty(0, self.n_classes, device=device))
        if self._run is not None:
            raise EenetError("HookedEarlyExit was called again while serving a sample (from "
                             "inside the model or another thread); it serves one call at a "
                             "time")
        run = _Run(self._thresholds(sample_ids))
        self._run = run
        try:
            self.model(x)
        except _Exited:
            pass
        else:
            raise EenetError(f"the forward ended after exits 0..{run.next - 1} of "
                             f"{self.n_exits} fired; the exit modules "
                             f"{self.exit_names[run.next:]} never ran, so name the modules "
                             f"that produce the exits the model returns")
        finally:
            self._run = None
        logits = run.logits
        assert logits is not None and run.score is not None
        return EarlyExitOutput(logits.argmax(dim=1),
                               torch.full((1,), run.exit, dtype=torch.long,
                                          device=logits.device), run.score, logits)
