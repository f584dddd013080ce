"""Per-exit hidden features in the exit cache: stored, read, carried by views, captured by
``eenet cache --features`` (the input of each head's last linear layer, projected when wide),
imported, shown by ``eenet info``, and refused in one line where they cannot be had."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from eenet._validation import EenetError
from eenet.cache import ExitCache, random_projection, read_cache, summarize_cache, write_cache
from eenet.cache.writer import CacheWriter
from eenet.cli import main
from eenet.ingest.arrays import import_exit_outputs
from eenet.ingest.model import cache_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared test helpers
import _toy_models  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, ["-q", *(str(a) for a in args)])


def one_error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def small_cache(n: int = 40, features: bool = True) -> ExitCache:
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(n, 5)), rng.normal(size=(n, 8))) if features else None
    proj = (None, random_projection(20, 8, 3, 1)) if features else None
    return ExitCache(rng.normal(size=(n, 2, 3)).astype(np.float32), rng.integers(0, 3, n),
                     np.array([1.0, 2.0]), sample_ids=np.arange(n) + 100, features=feats,
                     feature_projections=proj)


# ---- the format ---------------------------------------------------------------------
def test_features_round_trip_and_views(tmp_path):
    c = small_cache()
    back = read_cache(write_cache(tmp_path / "f.h5", c))
    assert [f.dtype for f in back.features] == [np.float16, np.float16]
    for a, b in zip(c.features, back.features):
        np.testing.assert_array_equal(a, b)
    assert back.feature_projections[0] is None
    np.testing.assert_array_equal(back.feature_projections[1], random_projection(20, 8, 3, 1))
    idx = np.array([5, 1, 7])
    sub = back.subset(idx)
    np.testing.assert_array_equal(sub.features[1], back.features[1][idx])
    rest, held = back.holdout_split(0.25, seed=1)
    for part in (rest, held):
        rows = part.sample_ids - 100
        for k in range(2):
            np.testing.assert_array_equal(part.features[k], back.features[k][rows])
    summary = summarize_cache(tmp_path / "f.h5")
    assert summary["features"] == [[40, 5], [40, 8]]
    assert summary["feature_projected"] == [False, True]
    assert summary == {**back.summary(), "path": summary["path"]}


def test_caches_without_features_read_as_before(tmp_path):
    c = small_cache(features=False)
    back = read_cache(write_cache(tmp_path / "plain.h5", c))
    assert back.features is None and back.feature_projections is None
    assert back.subset([0, 1]).features is None
    assert summarize_cache(tmp_path / "plain.h5")["features"] is None
    # a copy of a featured cache with the features dropped keeps no stale trace of them
    featured = read_cache(write_cache(tmp_path / "f.h5", small_cache()))
    bare = dataclasses.replace(featured, features=None, feature_projections=None)
    with h5py.File(write_cache(tmp_path / "bare.h5", bare)) as f:
        assert "feature_dims" not in f.attrs and "features_0" not in f


def test_bad_features_are_refused():
    c = small_cache()
    with pytest.raises(EenetError, match="features has 1 arrays for 2 exits"):
        ExitCache(c.logits, c.labels, c.costs, features=c.features[:1])
    with pytest.raises(EenetError, match=r"exit 1 have shape \(39, 8\)"):
        ExitCache(c.logits, c.labels, c.costs, features=(c.features[0], c.features[1][:-1]))
    with pytest.raises(EenetError, match="overflow float16"):
        ExitCache(c.logits, c.labels, c.costs,
                  features=(c.features[0], c.features[1].astype(np.float32) * 1e6))


def test_writer_needs_features_with_every_batch(tmp_path):
    with pytest.raises(EenetError, match="give features with every batch"):
        with CacheWriter(tmp_path / "w.h5", n_exits=2, n_classes=3, feature_dims=[4, 4]) as w:
            w.write(np.zeros((3, 2, 3)), np.zeros(3, int))
    assert not (tmp_path / "w.h5").exists()


# ---- capture while caching ----------------------------------------------------------
def _head_inputs(model: _toy_models.StagedMLP, x: torch.Tensor) -> list[np.ndarray]:
    out = []
    with torch.no_grad():
        for stage in model.stages:
            x = stage(x)
            out.append(x.numpy())
    return out


@pytest.mark.parametrize("feature_dim", [64, 600])
def test_cache_features_are_the_heads_last_linear_input(tmp_path, feature_dim):
    out = cache_model("_toy_models:staged", "_toy_models:toy_data", tmp_path / "t.h5",
                      costs=[1, 2, 3], features=True, feature_dim=feature_dim, seed=5,
                      batch_size=8, verbose=False)
    c = read_cache(out)
    inputs = _head_inputs(_toy_models.staged(), _toy_models.toy_data().tensors[0])
    assert [f.shape for f in c.features] == [(20, min(w, feature_dim)) for w in (8, 64, 512)]
    for k, x in enumerate(inputs):
        proj = c.feature_projections[k]
        if x.shape[1] > feature_dim:  # projected, by the stored and reproducible matrix
            want = random_projection(x.shape[1], feature_dim, 5, k)
            np.testing.assert_array_equal(proj, want)
            x = x @ proj
        else:
            assert proj is None
        np.testing.assert_allclose(c.features[k].astype(np.float32), x, rtol=2e-3, atol=2e-3)
    assert c.attrs["feature_source"] == "last_linear_input"


def test_cache_without_features_is_unchanged(tmp_path):
    c = read_cache(cache_model("_toy_models:staged", "_toy_models:toy_data", tmp_path / "t.h5",
                               costs=[1, 2, 3], verbose=False))
    assert c.features is None


class NoLinearHead(nn.Module):
    """A staged model of two exits whose second head (an identity) holds no nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(6, 3), nn.Linear(3, 3)])
        self.heads = nn.ModuleList([nn.Linear(3, 3), nn.Identity()])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.stages[0](x)
        return [self.heads[0](a), self.heads[1](self.stages[1](a))]


def no_linear_head() -> NoLinearHead:
    return NoLinearHead()


def test_head_without_linear_is_one_line(tmp_path):
    res = run("cache", "--model", "test_features_cache:no_linear_head", "--data",
              "_toy_models:toy_data", "--costs", "1,2", "--features", "--out", tmp_path / "n.h5")
    line = one_error_line(res)
    assert "exit 1's head 'heads.1' (Identity) holds no nn.Linear" in line
    assert not (tmp_path / "n.h5").exists()


def test_features_refused_with_resume(tmp_path):
    res = run("cache", "--model", "_toy_models:staged", "--data", "_toy_models:toy_data",
              "--costs", "1,2,3", "--features", "--resume", "--out", tmp_path / "r.h5")
    assert "drop --resume" in one_error_line(res)


# ---- import and info ---------------------------------------------------------------
def test_import_features_npz_and_pt(tmp_path):
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(12, 2, 3)), rng.integers(0, 3, 12)
    f0, f1 = rng.normal(size=(12, 4)), rng.normal(size=(12, 7))
    np.savez(tmp_path / "a.npz", logits=logits, labels=labels, features_0=f0, features_1=f1)
    c = import_exit_outputs(tmp_path / "a.npz", tmp_path / "a.h5", costs=[1, 2])
    back = read_cache(tmp_path / "a.h5")
    np.testing.assert_array_equal(back.features[1], f1.astype(np.float16))
    assert c.feature_projections == (None, None)
    torch.save({"logits": torch.tensor(logits), "labels": torch.tensor(labels),
                "features": [torch.tensor(f0), torch.tensor(f1)]}, tmp_path / "b.pt")
    import_exit_outputs(tmp_path / "b.pt", tmp_path / "b.h5", costs=[1, 2])
    np.testing.assert_array_equal(read_cache(tmp_path / "b.h5").features[0],
                                  f0.astype(np.float16))
    res = run("info", tmp_path / "b.h5")
    assert "features (float16, per exit): 12x4, 12x7" in res.output
    info = json.loads(run("info", "--json", tmp_path / "b.h5").output)
    assert info["features"] == [[12, 4], [12, 7]]


def test_import_bad_features_is_one_line(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "gap.npz", logits=rng.normal(size=(6, 2, 3)),
             labels=rng.integers(0, 3, 6), features_0=np.zeros((6, 2)),
             features_2=np.zeros((6, 2)))
    res = run("import", tmp_path / "gap.npz", "--costs", "1,2", "--out", tmp_path / "g.h5")
    assert "number them from 0" in one_error_line(res)
    np.savez(tmp_path / "one.npz", logits=rng.normal(size=(6, 2, 3)),
             labels=rng.integers(0, 3, 6), features_0=np.zeros((6, 2)))
    res = run("import", tmp_path / "one.npz", "--costs", "1,2", "--out", tmp_path / "o.h5")
    assert "features has 1 arrays for 2 exits" in one_error_line(res)
    assert not (tmp_path / "g.h5").exists() and not (tmp_path / "o.h5").exists()
