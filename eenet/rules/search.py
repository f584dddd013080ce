"""Validation-optimal thresholds for every budget at once (eenet's ``search`` calibration).

:class:`SearchFamily` builds, once per set of scores, a *staircase*: candidate
threshold vectors sorted by their cost on the calibration data, each more
accurate than every cheaper one. The thresholds for a budget are the last
step that fits it. Because the staircase does not depend on the budget, a
larger budget never gets a less accurate rule on the calibration data, and
the guard and the confidence bounds can walk the same family.

How the candidates are found (hand-written: no library optimises this
piecewise-constant, cost-constrained objective). Every exit k < K-1 chooses
its threshold from a grid of score quantiles plus ``+inf`` (the exit closed);
a coarse grid keeps the search from fitting single samples. Then:

1. Lagrangian relaxation: for prices ``lam`` on a fixed grid, coordinate
   ascent maximises ``#correct - lam * total_cost / c_{K-1}``, each
   coordinate step solved exactly over its grid, warm-started from the
   previous price. These are the accuracy-cost trade-offs on the convex hull.
2. Repair: from every price solution and from MSDNet's geometric quota
   thresholds at a fixed ladder of costs, coordinate ascent on accuracy with
   the candidate's own cost as a hard cap (the hull skips the budgets between
   its vertices; this fills them).
3. Neighbours: every single-exit change of every solution above, which the
   exact coordinate step evaluates for free. The staircase of all these
   candidates has a step every fraction of a percent of the cost range.
"""
from __future__ import annotations

import warnings

import numpy as np

from eenet._validation import BUDGET_RTOL
from eenet.rules.distributions import fit_quota, geometric_fractions

__all__ = ["SearchFamily"]


class _Grid:
    """Per-exit threshold grids and the exact coordinate step over them.

    ``bins_t[k, n]`` counts the grid values at or below ``scores[n, k]``, so
    sample n passes grid index g at exit k iff ``bins_t[k, n] > g``. With the
    other thresholds fixed, the accuracy and cost of every candidate at exit k
    follow from one ``bincount`` and a cumulative sum over the samples that
    reach exit k: one coordinate step costs O(n_samples * n_exits) whatever
    the grid size.
    """

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: np.ndarray,
                 n_grid: int, extra: list[np.ndarray]) -> None:
        n, k_exits = scores.shape
        self.n, self.k_exits = n, k_exits
        self.correct_t = np.ascontiguousarray(correct.T, dtype=np.float64)  # [n_exits, n]
        self.costs = costs
        self.grids: list[np.ndarray] = []
        self.bins_t = np.empty((k_exits - 1, n), dtype=np.int64)  # [n_exits - 1, n]
        levels = np.linspace(0.0, 1.0, n_grid)
        for k in range(k_exits - 1):
            cand = [np.quantile(scores[:, k], levels), [np.inf]]
            cand += [th[k:k + 1] for th in extra]
            grid = np.unique(np.concatenate(cand))
            self.grids.append(grid)
            self.bins_t[k] = np.searchsorted(grid, scores[:, k], side="right")
        self.closed = np.array([g.size - 1 for g in self.grids], dtype=np.int64)
        self._rows = np.arange(n)
        self.correct_flat = self.correct_t.ravel()

    def index_of(self, thresholds: np.ndarray) -> np.ndarray:
        return np.array([int(np.searchsorted(g, t)) for g, t in
                         zip(self.grids, thresholds[:-1])], dtype=np.int64)

    def thresholds(self, g: np.ndarray) -> np.ndarray:
        out = np.full(self.k_exits, -np.inf)
        for k, grid in enumerate(self.grids):
            out[k] = grid[g[k]]
        return out

    def _first_two(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's first passing exit under ``g`` and the next one after it."""
        last = self.k_exits - 1
        first = np.full(self.n, last, dtype=np.intp)
        second = first
        for j in range(last - 1, -1, -1):  # last to first: the earliest pass wins
            passed = self.bins_t[j] > g[j]
            second = np.where(passed, first, second)
            first = np.where(passed, j, first)
        return first, second

    def evaluate(self, g: np.ndarray) -> tuple[float, float]:
        """(correct count, total cost) of grid indices ``g``."""
        first, _ = self._first_two(g)
        return (float(self.correct_flat[first * self.n + self._rows].sum()),
                float(self.costs[first].sum()))

    def tables(self, g: np.ndarray, k: int,
               passes: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Correct count and total cost for every candidate at exit k, the rest fixed."""
        first, second = self._first_two(g) if passes is None else passes
        without = np.where(first == k, second, first)  # exit of each sample with k closed
        flat = without * self.n + self._rows
        corr_wo = self.correct_flat[flat]
        cost_wo = self.costs[without]
        reach = first >= k  # passes no earlier exit
        size = self.grids[k].size + 1
        d_acc = np.bincount(self.bins_t[k], weights=(self.correct_t[k] - corr_wo) * reach,
                            minlength=size)
        d_cost = np.bincount(self.bins_t[k], weights=(self.costs[k] - cost_wo) * reach,
                             minlength=size)
        # candidate index g admits the samples with bins > g: a suffix sum over bins
        gain_acc = d_acc.sum() - np.cumsum(d_acc)[:-1]
        gain_cost = d_cost.sum() - np.cumsum(d_cost)[:-1]
        return corr_wo.sum() + gain_acc, cost_wo.sum() + gain_cost

    def _order(self, sweep: int, rng: np.random.Generator) -> np.ndarray:
        """Exits to visit in a coordinate sweep: in order first, then shuffled."""
        order = np.arange(self.k_exits - 1)
        if sweep:
            rng.shuffle(order)
        return order

    def lagrangian(self, g: np.ndarray, lam: float, rng: np.random.Generator,
                   max_sweeps: int) -> np.ndarray:
        """Coordinate ascent on ``correct - lam * cost / c_{K-1}``; ties go to the cheaper."""
        g = g.copy()
        scale = float(self.costs[-1]) if self.costs[-1] > 0 else 1.0
        for sweep in range(max_sweeps):
            changed = False
            for k in self._order(sweep, rng):
                acc, cost = self.tables(g, k)
                obj = acc - lam * cost / scale
                ties = np.flatnonzero(obj >= obj.max() - 1e-9)
                pick = ties[np.argmin(cost[ties])]
                if obj[pick] > obj[g[k]] + 1e-9 or (obj[pick] >= obj[g[k]] - 1e-9
                                                     and cost[pick] < cost[g[k]] - 1e-9):
                    g[k] = pick
                    changed = True
            if not changed:
                break
        return g

    def constrained(self, g: np.ndarray, cap: float, rng: np.random.Generator,
                    max_sweeps: int) -> np.ndarray:
        """Coordinate ascent on accuracy with total cost <= cap (``g`` must fit).

        A move is taken when it raises the correct count, or keeps it and
        lowers the cost (freed budget lets later moves raise accuracy).
        """
        g = g.copy()
        acc_now, cost_now = self.evaluate(g)
        tiny = 1e-9 * float(self.costs[-1] if self.costs[-1] > 0 else 1.0)
        for sweep in range(max_sweeps):
            changed = False
            for k in self._order(sweep, rng):
                acc, cost = self.tables(g, k)
                ok = np.flatnonzero(cost <= cap)
                if not ok.size:
                    continue
                j = ok[np.lexsort((cost[ok], -acc[ok]))[0]]
                if acc[j] > acc_now + 0.5 or (acc[j] > acc_now - 0.5
                                              and cost[j] < cost_now - tiny):
                    g[k], acc_now, cost_now = j, acc[j], cost[j]
                    changed = True
            if not changed:
                break
        return g


class SearchFamily:
    """A staircase of validation-optimal thresholds, one step per reachable cost.

    Args:
        scores: [n_samples, n_exits] finite scores, higher = readier to exit.
        correct: [n_samples, n_exits] bool, whether each exit is right.
        costs: [n_exits] cumulative, non-decreasing exit costs.
        seed: seeds the order in which exits are visited after the first sweep.
        n_grid: candidate thresholds per exit (score quantiles).
        n_prices: prices on cost for the Lagrangian stage.
        n_ladder: costs at which MSDNet's geometric thresholds seed the repair.
        n_fill: caps on a fixed ladder under which the best step is repaired again.
        max_sweeps: coordinate sweeps per ascent.

    Attributes:
        step_cost: [n_steps] average cost of each step on the calibration data,
            increasing.
        step_accuracy: [n_steps] its accuracy, increasing.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.random((500, 3)); ok = rng.random((500, 3)) < s
        >>> fam = SearchFamily(s, ok, np.array([1.0, 2.0, 3.0]))
        >>> t = fam.at(2.0)
        >>> from eenet.rules.thresholds import apply_thresholds
        >>> float(np.array([1.0, 2.0, 3.0])[apply_thresholds(s, t)].mean()) <= 2.0
        True
    """

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, *,
                 seed: int = 0, n_grid: int = 64, n_prices: int = 24, n_ladder: int = 8,
                 n_fill: int = 32, max_sweeps: int = 8) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        n, k_exits = scores.shape
        self.costs = np.asarray(costs, dtype=np.float64)
        self.n_samples, self.k_exits = n, k_exits
        if k_exits == 1:
            self.step_cost = np.array([self.costs[0]])
            self.step_accuracy = np.array([float(np.mean(correct[:, 0]))])
            self._steps = [np.array([-np.inf])]
            return
        ladder = np.linspace(self.costs[0], self.costs[-1], n_ladder + 2)[1:-1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            geo = [fit_quota(scores, self.costs, float(b),
                             lambda x: geometric_fractions(self.costs, x))[0] for b in ladder]
        grid = _Grid(scores, correct, self.costs, n_grid, geo)
        rng = np.random.default_rng(seed)
        vertices = self._price_path(grid, rng, n_prices, max_sweeps)
        vertices += [grid.index_of(t) for t in geo]
        repaired = [grid.constrained(g, grid.evaluate(g)[1] * (1 + BUDGET_RTOL), rng,
                                     max_sweeps) for g in vertices]
        vertices += repaired
        self._build_staircase(grid, vertices)
        # fill the gaps between steps: repair the best step under each cap of a fixed ladder
        caps = np.linspace(self.costs[0], self.costs[-1], n_fill + 2)[1:-1] * n
        for cap in caps:
            g = grid.index_of(self.at(cap / n))
            vertices.append(grid.constrained(g, cap * (1 + BUDGET_RTOL), rng, max_sweeps))
        self._build_staircase(grid, vertices)

    @staticmethod
    def _price_path(grid: _Grid, rng: np.random.Generator, n_prices: int,
                    max_sweeps: int) -> list[np.ndarray]:
        """Lagrangian solutions from price 0 (most accurate) to a price where all leave first."""
        costs = grid.costs
        gaps = np.diff(costs)
        smallest = float(gaps[gaps > 0].min()) if np.any(gaps > 0) else 1.0
        top = 2.0 * float(costs[-1]) / smallest  # above it no sample is worth moving on
        prices = [0.0, *np.geomspace(1e-3, top, max(n_prices - 1, 1))]
        path, g = [], grid.closed
        for lam in prices:
            g = grid.lagrangian(g, lam, rng, max_sweeps)
            path.append(g)
        return path

    def _build_staircase(self, grid: _Grid, vertices: list[np.ndarray]) -> None:
        """Every vertex and its single-exit neighbours; keep the accuracy-cost staircase."""
        cost_parts, acc_parts, refs = [], [], []
        seen: set[bytes] = set()
        for v, g in enumerate(vertices):
            key = np.ascontiguousarray(g, dtype=np.int64).tobytes()
            if key in seen:
                continue
            seen.add(key)
            passes = grid._first_two(g)
            for k in range(grid.k_exits - 1):
                acc, cost = grid.tables(g, k, passes)
                cost_parts.append(cost)
                acc_parts.append(acc)
                refs.append(np.stack([np.full(acc.size, v), np.full(acc.size, k),
                                      np.arange(acc.size)], axis=1))
        cost, acc, ref = (np.concatenate(cost_parts), np.concatenate(acc_parts),
                          np.concatenate(refs))
        order = np.lexsort((-acc, cost))  # by cost, the most accurate first among equals
        best = np.maximum.accumulate(acc[order])
        keep = np.ones(order.size, dtype=bool)
        keep[1:] = best[1:] > best[:-1] + 0.5  # strictly more correct answers than any cheaper
        steps = order[keep]
        self.step_cost = cost[steps] / self.n_samples
        self.step_accuracy = acc[steps] / self.n_samples
        self._steps = []
        for v, k, j in ref[steps]:
            g = vertices[v].copy()
            g[k] = j
            self._steps.append(grid.thresholds(g))

    @property
    def n_steps(self) -> int:
        return len(self._steps)

    def step(self, index: int) -> np.ndarray:
        """Thresholds [n_exits] of step ``index`` (0 = the cheapest)."""
        return self._steps[index].copy()

    def index_at(self, target: float) -> int:
        """The most accurate step whose calibration cost fits ``target``."""
        fitting = np.flatnonzero(self.step_cost <= target * (1 + BUDGET_RTOL))
        return int(fitting.max()) if fitting.size else 0

    def at(self, target: float) -> np.ndarray:
        """Thresholds [n_exits] for an average cost of at most ``target`` on the
        calibration data, the most accurate such step."""
        return self.step(self.index_at(target))
