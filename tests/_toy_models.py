"""Tiny multi-exit models and factories for the tests of eenet.ingest and caching (CPU, no data)."""
from __future__ import annotations

import torch
from torch import nn

N_FEATURES = 6
N_CLASSES = 3


class StagedMLP(nn.Module):
    """A staged multi-exit MLP: ``stages``/``heads``; later stages much wider."""

    def __init__(self, widths: tuple[int, ...] = (8, 64, 512), n_features: int = N_FEATURES,
                 n_classes: int = N_CLASSES) -> None:
        super().__init__()
        stages, heads, d_in = [], [], n_features
        for w in widths:
            stages.append(nn.Sequential(nn.Linear(d_in, w), nn.ReLU()))
            heads.append(nn.Linear(w, n_classes))
            d_in = w
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(x))
        return outs


class HookedMLP(nn.Module):
    """A non-staged multi-exit MLP: heads are called inside forward, no stages/heads lists."""

    def __init__(self, n_features: int = N_FEATURES, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.block1 = nn.Linear(n_features, 16)
        self.block2 = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256))
        self.block3 = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024))
        self.exit_a = nn.Linear(16, n_classes)
        self.exit_b = nn.Sequential(nn.ReLU(), nn.Linear(256, n_classes))
        self.exit_c = nn.Linear(1024, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.relu(self.block1(x))
        b = self.block2(a)
        c = self.block3(b)
        return self.exit_a(a), self.exit_b(b), self.exit_c(c)


class SingleTensor(nn.Module):
    """Breaks the contract: returns one tensor instead of a list of exits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MixedClasses(nn.Module):
    """Breaks the contract: exits with different class counts."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_FEATURES, N_CLASSES)
        self.b = nn.Linear(N_FEATURES, N_CLASSES + 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.a(x), self.b(x)]


class NaNAfter(nn.Module):
    """A 2-exit model whose second exit is NaN for samples with index feature >= ``bad``."""

    def __init__(self, bad: float = 5.0) -> None:
        super().__init__()
        self.fc = nn.Linear(N_FEATURES, N_CLASSES)
        self.head = nn.Linear(N_CLASSES, N_CLASSES)
        self.bad = bad

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.fc(x)
        poison = torch.where(x[:, :1] >= self.bad, torch.nan, 0.0)
        return [h, self.head(h) + poison]


def staged() -> StagedMLP:
    torch.manual_seed(0)
    return StagedMLP()


def hooked() -> HookedMLP:
    torch.manual_seed(0)
    return HookedMLP()


def single_tensor() -> SingleTensor:
    return SingleTensor()


def mixed_classes() -> MixedClasses:
    return MixedClasses()


def nan_model() -> NaNAfter:
    return NaNAfter()


def not_a_model() -> str:
    return "a string"


def unlabelled() -> torch.utils.data.Dataset:
    """A dataset of bare tensors, no labels."""
    return torch.utils.data.TensorDataset(torch.randn(8, N_FEATURES))  # 1-tuples


def float_labels() -> list:
    return [(torch.randn(N_FEATURES), 0.5) for _ in range(4)]


def toy_data(n: int = 20) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, N_FEATURES, generator=g),
                                          torch.randint(0, N_CLASSES, (n,), generator=g))


class ReversedHeads(nn.Module):
    """Runs the whole backbone first and the heads last-to-first (FLOPs must not care)."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Linear(N_FEATURES, 10)
        self.b2 = nn.Linear(10, 40)
        self.h1 = nn.Linear(10, N_CLASSES)
        self.h2 = nn.Linear(40, N_CLASSES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.b1(x)
        b = self.b2(a)
        second = self.h2(b)
        first = self.h1(a)
        return [first, second]


# ---------------------------------------------------------------------------
# wide outputs (many chunks per cache), slow forwards (time to interrupt a run)
# ---------------------------------------------------------------------------
WIDE_CLASSES = 1000


class SlowStaged(StagedMLP):
    """A staged MLP whose forward sleeps ``delay`` seconds first (its stages do not)."""

    def __init__(self, delay: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        import time

        time.sleep(self.delay)
        return super().forward(x)


def wide() -> StagedMLP:
    """3 exits x 1000 classes: 12 kB of logits per sample, so ~80 samples per chunk."""
    torch.manual_seed(1)
    return StagedMLP(widths=(8, 16, 32), n_classes=WIDE_CLASSES)


def slow_wide() -> SlowStaged:
    """``wide()`` with 0.05 s per forward: a run of ``wide_data`` at batch 16 takes 1.5 s."""
    torch.manual_seed(1)
    return SlowStaged(0.05, widths=(8, 16, 32), n_classes=WIDE_CLASSES)


def wide_data(n: int = 480) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(2)
    return torch.utils.data.TensorDataset(torch.randn(n, N_FEATURES, generator=g),
                                          torch.randint(0, WIDE_CLASSES, (n,), generator=g))


class Stream(torch.utils.data.IterableDataset):
    """An iterable dataset (no length) over ``wide_data``."""

    def __iter__(self):
        return iter(wide_data())


def wide_stream() -> Stream:
    return Stream()


# ---------------------------------------------------------------------------
# a real small disk, where the test may mount one
# ---------------------------------------------------------------------------
def mount_tmpfs(path, size: str = "2m"):
    """Mount a tmpfs of ``size`` at ``path`` (a context manager); skips the test unless root
    may mount one."""
    import contextlib
    import os
    import subprocess

    import pytest

    @contextlib.contextmanager
    def mounted():
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
    return mounted()


# ---------------------------------------------------------------------------
# a dataset that fails part-way while a marker file exists (an interrupted run)
# ---------------------------------------------------------------------------
FLAKY_ENV = "EENET_TEST_FLAKY"
FLAKY_FROM = 250


def _flaky(index: int) -> None:
    import os

    marker = os.environ.get(FLAKY_ENV)
    if marker and os.path.exists(marker) and index >= FLAKY_FROM:
        raise RuntimeError(f"read failed at item {index}")


class FlakyWide(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.inner = wide_data()

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        _flaky(index)
        return self.inner[index]


class FlakyStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i, item in enumerate(wide_data()):
            _flaky(i)
            yield item


def flaky_wide() -> FlakyWide:
    return FlakyWide()


def flaky_stream() -> FlakyStream:
    return FlakyStream()
