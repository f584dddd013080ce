"""Is there anything in the exits' hidden features? The in-sample ceiling, with and without them.

For every network, a correctness predictor per exit is fitted on the TEST split itself (the
in-sample ceiling: no policy fitted on validation can do better with the same inputs), once on
the prediction features alone and once on the prediction features plus the exit's hidden
features (the input of its head's last linear layer, as ``eenet cache --features`` stores it,
projected to 64 dimensions). Each predictor's scores become thresholds with eenet's own
calibration (``Calibrator(mode="search")``, no guard, calibrated on the same split), at the
network's 10 default budgets; max-probability is calibrated the same way. An out-of-fold column
(the predictor fitted on 4/5 of the split, scoring the other fifth; thresholds still in-sample)
shows how much of the in-sample gain is the predictor fitting the split's noise.

The predictor is a logistic regression (torch, L-BFGS, light L2): its score is linear in the
features, the form that would fold into a head's last linear layer. Prediction features are
those EENet's scorer reads (``eenet.scores.features``): the probability vector (the 8 largest
probabilities when there are more than 16 classes), max probability, its logit, one minus the
normalised entropy, the vote ratio, the top-2 margin, the earlier exits' probabilities of this
exit's answer and agreement with the previous exit.

Networks: the bundled CNNs (``fashion_mnist_cnn4`` / ``cnn6``, re-cached on the test split with
``features=True, feature_dim=64, seed=s`` through :func:`eenet.ingest.model.cache_model`, costs
copied from ``cache/<name>_test.h5``), and two synthetic controls on one synthetic network
(``eenet.synthetic.synthetic_cache``, correctness noisier than its confidence): ``synthetic
+signal``, whose 64 features carry each exit's correctness along one random direction (a
shift of +-1 sd), and ``synthetic noise``, whose features are pure noise (what in-sample
fitting alone gains). Seeds move the projection (real networks), the synthetic draws and the
calibration's mixing draws.

``--overhead`` also times ``eenet cache`` of the 4-exit CNN on the test split with and without
``--features`` (interleaved runs, costs copied).

Usage:
    python benchmarks/feature_ceiling.py --seeds 3 --out benchmarks/results/feature_ceiling.csv
    python benchmarks/feature_ceiling.py --overhead 5 --networks none
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eenet import ExitCache, read_cache
from eenet.rules import Calibrator
from eenet.scores.features import (advance_history, max_prob, new_history, one_minus_entropy,
                                   probabilities, top_probs)
from eenet.sweep import default_budgets
from eenet.synthetic import synthetic_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _caches import MODELS  # noqa: E402

FEATURE_DIM = 64
N_FOLDS = 5
L2 = 1e-3


# ---- inputs -------------------------------------------------------------------------
def prediction_features(cache: ExitCache) -> np.ndarray:
    """EENet's per-exit prediction features, float32 ``[n_samples, n_exits, m]``."""
    logits = torch.from_numpy(np.asarray(cache.logits, np.float32))
    n, k_exits, c = logits.shape
    hist = new_history(n, c)
    out = []
    for k in range(k_exits):
        p = probabilities(logits[:, k])
        h = advance_history(hist, k, p)
        mp = max_prob(p).clamp(1e-6, 1 - 1e-6)
        top2 = p.topk(2, dim=1).values
        head = p if c <= 16 else top_probs(p, 8)
        summaries = [mp, torch.log(mp / (1 - mp)), one_minus_entropy(p), h["vote"],
                     top2[:, 0] - top2[:, 1], h["prev_at_pred"], h["mean_at_pred"], h["agree"]]
        out.append(torch.cat([head, torch.stack(summaries, dim=1)], dim=1))
    return torch.stack(out, dim=1).numpy()


def _standardize(x: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    mu, sd = x[rows].mean(axis=0), x[rows].std(axis=0)
    return torch.from_numpy((x - mu) / np.where(sd > 1e-8, sd, 1.0)).double()


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS: weights ``[d + 1]`` (bias last)."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(xb.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y)
        loss = loss + 0.5 * L2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _logit(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    return (x @ w[:-1] + w[-1]).numpy()


def predictor_scores(inputs: list[np.ndarray], correct: np.ndarray, folds: int | None,
                     seed: int) -> np.ndarray:
    """Per-exit predicted correctness logits ``[n, K]``: fitted on every row (``folds``
    None) or out of fold (each fold scored by a fit on the others)."""
    n, k_exits = correct.shape
    scores = np.empty((n, k_exits))
    parts = [np.arange(n)] if folds is None else \
        np.array_split(np.random.default_rng(seed).permutation(n), folds)
    for k in range(k_exits):
        y = torch.from_numpy(correct[:, k].astype(np.float64))
        for held in parts:
            fit_rows = np.arange(n) if folds is None else np.setdiff1d(np.arange(n), held)
            x = _standardize(inputs[k], fit_rows)
            w = fit_logistic(x[fit_rows], y[fit_rows])
            scores[held, k] = _logit(x[held], w)
    return scores


# ---- thresholds and accuracy ---------------------------------------------------------
def calibrated(scores: np.ndarray, cache: ExitCache, budgets: np.ndarray, seed: int
               ) -> list[tuple[float, float]]:
    """(accuracy %, average cost) of search-calibrated thresholds at each budget, in-sample."""
    cal = Calibrator(scores, cache.correct(), cache.costs, mode="search", guard=False, seed=seed)
    out = []
    for b in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rule = cal.rule(float(b))
        out.append((100 * rule.val_accuracy, rule.val_cost))
    return out


def network_rows(name: str, cache: ExitCache, budgets: np.ndarray, seed: int) -> list[dict]:
    """Every variant of one (network, seed) at every budget."""
    assert cache.features is not None
    pred = prediction_features(cache)
    correct = cache.correct()
    k_exits = cache.n_exits
    plain = [pred[:, k] for k in range(k_exits)]
    both = [np.concatenate([pred[:, k], cache.features[k].astype(np.float32)], axis=1)
            for k in range(k_exits)]
    rng = np.random.default_rng([seed, 7])  # same-shape noise: what in-sample fitting gains
    noise = [np.concatenate([pred[:, k], rng.standard_normal(cache.features[k].shape)], axis=1)
             for k in range(k_exits)]
    variants = {
        "maxprob": cache.probs().max(axis=2),
        "prediction": predictor_scores(plain, correct, None, seed),
        "prediction+hidden": predictor_scores(both, correct, None, seed),
        "prediction+noise": predictor_scores(noise, correct, None, seed),
        "prediction (out of fold)": predictor_scores(plain, correct, N_FOLDS, seed),
        "prediction+hidden (out of fold)": predictor_scores(both, correct, N_FOLDS, seed),
    }
    rows = []
    for variant, scores in variants.items():
        for b, (acc, cost) in zip(budgets, calibrated(scores, cache, budgets, seed)):
            rows.append({"network": name, "seed": seed, "budget": float(b),
                         "variant": variant, "accuracy": acc, "avg_cost": cost,
                         "feature_dims": "x".join(str(f.shape[1]) for f in cache.features)})
    return rows


# ---- networks ----------------------------------------------------------------------
#: the bundled networks: name -> (model, test split); their caches are ``cache/{name}_test.h5``
BUNDLED = {**{name: (model, "fashion-mnist:test") for name, model in MODELS.items()},
           "wordnet": ("eenet.examples.models:wordnet_transformer", "wordnet:test")}


def bundled(name: str, seed: int, cache_dir: Path) -> ExitCache:
    """A bundled network's test split with features, projected with ``seed`` (cached on disk)."""
    from eenet.ingest.model import cache_model

    out = cache_dir / f"{name}_test_features_s{seed}.h5"
    if not out.exists():
        print(f"caching {name} test with features (seed {seed}) -> {out}", flush=True)
        model, data = BUNDLED[name]
        cache_model(model, data, out, costs_from=cache_dir / f"{name}_test.h5", device="cpu",
                    verbose=False, features=True, feature_dim=FEATURE_DIM, seed=seed)
    return read_cache(out)


def synthetic(signal: bool, seed: int, n: int = 10000) -> ExitCache:
    """A synthetic network whose 64-dimensional features carry each exit's correctness
    along one random unit direction (``signal``), or nothing."""
    base = synthetic_cache(n, n_exits=4, n_classes=10, seed=seed, noise=0.25)
    rng = np.random.default_rng([seed, 19])
    feats = []
    for k in range(base.n_exits):
        f = rng.standard_normal((n, FEATURE_DIM))
        if signal:
            u = rng.standard_normal(FEATURE_DIM)
            f += np.outer(np.where(base.correct()[:, k], 1.0, -1.0), u / np.linalg.norm(u))
        feats.append(f)
    return ExitCache(base.logits, base.labels, base.costs, features=feats,
                     model="synthetic +signal" if signal else "synthetic noise")


def networks(names: list[str], seed: int, cache_dir: Path) -> dict[str, tuple[ExitCache,
                                                                               np.ndarray]]:
    """name -> (test cache with features, the 10 budgets: the validation split's defaults)."""
    out = {}
    for name in names:
        if name in BUNDLED:
            test = bundled(name, seed, cache_dir)
            out[name] = (test, default_budgets(read_cache(cache_dir / f"{name}_val.h5"), 10))
        elif name in ("synthetic+signal", "synthetic-noise"):
            test = synthetic(name == "synthetic+signal", seed)
            out[name] = (test, default_budgets(test, 10))
        else:
            raise SystemExit(f"unknown network {name!r}")
    return out


# ---- caching overhead ------------------------------------------------------------
def overhead(runs: int, cache_dir: Path, tmp: Path) -> pd.DataFrame:
    """Wall time of caching the 4-exit CNN's test split with and without features, interleaved."""
    from eenet.ingest.model import cache_model

    rows = []
    for r in range(runs):
        for features in (False, True):
            out = tmp / f"overhead_{int(features)}.h5"
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            cache_model(MODELS["fashion_mnist_cnn4"], "fashion-mnist:test", out,
                        costs_from=cache_dir / "fashion_mnist_cnn4_test.h5", device="cpu",
                        verbose=False, features=features, feature_dim=FEATURE_DIM)
            rows.append({"run": r, "features": features, "seconds": time.perf_counter() - t0,
                         "bytes": out.stat().st_size})
            out.unlink()
    return pd.DataFrame(rows)


# ---- report ------------------------------------------------------------------------
def report(table: pd.DataFrame) -> str:
    """Per network and budget (the i-th budget of each seed; synthetic budgets move with
    the seed): accuracies (mean over seeds) and the gains of the hidden features."""
    table = table.assign(b=table.groupby(["network", "seed", "variant"])["budget"]
                         .rank(method="dense").astype(int))
    lines = ["| network | budget | maxprob | prediction | + hidden | gain (± sd) | "
             "+ noise: gain | hidden - maxprob | gain out of fold |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = ["", "| network | best gain, any budget | mean gain, 10 budgets | "
               "mean gain, 5 tightest | noise: mean gain, 5 tightest | out of fold: best, "
               "mean 5 tightest |", "|---|---:|---:|---:|---:|---:|"]
    for net, t in table.groupby("network", sort=False):
        acc = t.pivot_table(index=["b", "seed"], columns="variant", values="accuracy")
        d = pd.DataFrame({"g": acc["prediction+hidden"] - acc["prediction"],
                          "noise": acc["prediction+noise"] - acc["prediction"],
                          "vs_mp": acc["prediction+hidden"] - acc["maxprob"],
                          "oof": acc["prediction+hidden (out of fold)"] -
                          acc["prediction (out of fold)"]})
        m, sd, a = d.groupby("b").mean(), d.groupby("b").std(), acc.groupby("b").mean()
        budget = t.groupby("b")["budget"].mean()
        for b in m.index:
            lines.append(f"| {net} | {budget[b]:.4g} | {a.loc[b, 'maxprob']:.2f} | "
                         f"{a.loc[b, 'prediction']:.2f} | {a.loc[b, 'prediction+hidden']:.2f} | "
                         f"{m.loc[b, 'g']:+.2f} ± {sd.loc[b, 'g']:.2f} | "
                         f"{m.loc[b, 'noise']:+.2f} | {m.loc[b, 'vs_mp']:+.2f} | "
                         f"{m.loc[b, 'oof']:+.2f} |")
        tight = m.iloc[:5]
        summary.append(f"| {net} | {m['g'].max():+.2f} | {m['g'].mean():+.2f} | "
                       f"{tight['g'].mean():+.2f} | {tight['noise'].mean():+.2f} | "
                       f"{m['oof'].max():+.2f}, {tight['oof'].mean():+.2f} |")
    return "\n".join(lines + summary)


def save(table: pd.DataFrame, out: Path) -> str:
    """Write the rows to ``out`` (CSV) and the report beside it (``.md``); returns the report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    text = report(table)
    out.with_suffix(".md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--networks", default="fashion_mnist_cnn4,fashion_mnist_cnn6,"
                                          "synthetic+signal,synthetic-noise",
                    help="comma-separated, or 'none'")
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_ceiling.csv"))
    ap.add_argument("--report", type=Path, help="only print the report of this CSV")
    ap.add_argument("--overhead", type=int, default=0, metavar="RUNS",
                    help="also time caching with and without --features, RUNS runs each")
    args = ap.parse_args()
    if args.report:
        print(report(pd.read_csv(args.report)))
        return
    names = [] if args.networks == "none" else args.networks.split(",")
    rows = []
    for seed in range(args.seeds if names else 0):
        for name, (cache, budgets) in networks(names, seed, args.cache_dir).items():
            print(f"{name} seed {seed}: features {[f.shape[1] for f in cache.features]}",
                  flush=True)
            rows += network_rows(name, cache, budgets, seed)
    if rows:
        print(save(pd.DataFrame(rows), args.out))
    if args.overhead:
        t = overhead(args.overhead, args.cache_dir, args.cache_dir)
        t.to_csv(args.out.with_name("feature_overhead.csv"), index=False)
        s = t.groupby("features")["seconds"].agg(["min", "median"])
        size = t.groupby("features")["bytes"].first()
        print(t.to_string())
        print(f"best {s.loc[True, 'min']:.3f} s with features vs {s.loc[False, 'min']:.3f} s "
              f"without: x{s.loc[True, 'min'] / s.loc[False, 'min']:.3f}; medians x"
              f"{s.loc[True, 'median'] / s.loc[False, 'median']:.3f}; file "
              f"{size[True] / 2**20:.2f} vs {size[False] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
