"""Exhaustive enumeration: the reference optimum for tiny layers.

Every row's error is evaluated for every admissible support in one batch (the problem's own
objective, so ``reconstruct`` uses the exact refit), then combined exactly:

- ``per-row:K`` / ``nm:N:M``: the best admissible support of each row;
- ``unstructured``: ``best_r(k)`` = best support of size k in row r, then a dynamic program
  over rows chooses the sizes ``k_r`` with ``Σ k_r = budget``;
- ``columns:K``: the support (shared by all rows) minimising the summed row errors.

The lower bound equals the optimum (source "enumeration").
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from layerprune.problems import LayerProblem, PerRow

from .base import Option, Params, Proposal, Solver, Status

__all__ = ["BruteForce"]

MAX_SUPPORTS = 1 << 16


def _supports(d_in: int, sizes) -> torch.Tensor:
    """All supports (bool, (C, d_in)) whose size is in ``sizes``."""
    rows = []
    for k in sizes:
        for comb in itertools.combinations(range(d_in), k):
            m = [False] * d_in
            for j in comb:
                m[j] = True
            rows.append(m)
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, d_in)


def _nm_supports(d_in: int, n: int, m: int) -> torch.Tensor:
    blocks = [c for c in itertools.combinations(range(m), n)]
    rows = []
    for choice in itertools.product(blocks, repeat=d_in // m):
        mask = [False] * d_in
        for b, comb in enumerate(choice):
            for j in comb:
                mask[b * m + j] = True
        rows.append(mask)
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, d_in)


def _count_supports(problem: LayerProblem) -> int:
    p, d = problem.pattern, problem.d_in
    if p.name == "per-row":
        return math.comb(d, p.keep)
    if p.name == "nm":
        return math.comb(p.m, p.n) ** (d // p.m)
    if p.name == "columns":
        return math.comb(d, p.keep)
    return 2 ** d


def _row_table(problem: LayerProblem, supports: torch.Tensor) -> torch.Tensor:
    """errors[r, c] of row r on support c, by the problem's own objective (dense targets
    included). Returns (d_out, C)."""
    C = supports.shape[0]
    out = torch.empty(problem.d_out, C, dtype=torch.float64)
    for r in range(problem.d_out):
        # one problem whose rows are copies of row r: every support row is per-row feasible
        # when grouped by size, so evaluate size by size
        sizes = supports.sum(dim=1)
        for k in sizes.unique().tolist():
            sel = (sizes == k).nonzero().flatten()
            Wr = problem.W[r:r + 1].expand(len(sel), -1)
            sub = LayerProblem(Wr, problem.G, PerRow(keep=int(k)), problem.objective_kind, problem.C, problem.G0)
            out[r, sel] = sub.row_errors(supports[sel].to(problem.device)).cpu()
    return out


class BruteForce(Solver):
    """Enumerate every admissible support (tiny layers only: ≤ 65,536 supports per row)."""

    name = "brute"
    option_specs = (Option("max_supports", int, MAX_SUPPORTS, "largest number of supports per row it enumerates", low=1),)
    description = "exhaustive enumeration (reference optimum, tiny layers)"
    targets = frozenset({"mask", "reconstruct"})  # enumerates the problem's own objective
    certifies = True
    exact = True

    def _size_limit(self, problem: LayerProblem) -> Optional[str]:
        limit = self.option("max_supports")
        n = _count_supports(problem)
        if n > limit:
            return f"brute force would enumerate {n} supports per row (limit {limit}); use scip or ortools"
        return None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        p, d = problem.pattern, problem.d_in
        if p.name == "nm":
            supports = _nm_supports(d, p.n, p.m)
        elif p.name in ("per-row", "columns"):
            supports = _supports(d, [p.keep])
        else:
            supports = _supports(d, range(d + 1))
        table = _row_table(problem, supports)
        if p.name in ("per-row", "nm"):
            best = table.argmin(dim=1)
            mask = supports[best]
            value = float(table.gather(1, best[:, None]).sum())
        elif p.name == "columns":
            c = int(table.sum(dim=0).argmin())
            mask = supports[c].expand(problem.d_out, d).clone()
            value = float(table[:, c].sum())
        else:
            mask, value = _unstructured(table, supports, problem.budget)
        return Proposal(mask=mask.to(problem.device), lower_bound=value, bound_source="enumeration",
                        status=Status.OPTIMAL, iterations=int(supports.shape[0]))


def _unstructured(table: torch.Tensor, supports: torch.Tensor, budget: int):
    """Exact DP over rows: choose sizes k_r (Σ k_r = budget) and the best support of each size."""
    d_out = table.shape[0]
    d_in = supports.shape[1]
    sizes = supports.sum(dim=1)
    best_val = torch.full((d_out, d_in + 1), math.inf, dtype=torch.float64)
    best_idx = torch.zeros((d_out, d_in + 1), dtype=torch.long)
    for k in range(d_in + 1):
        sel = (sizes == k).nonzero().flatten()
        v, i = table[:, sel].min(dim=1)
        best_val[:, k], best_idx[:, k] = v, sel[i]
    # dp[r][t] = best error of rows < r keeping t weights
    dp = [[math.inf] * (budget + 1) for _ in range(d_out + 1)]
    arg = [[-1] * (budget + 1) for _ in range(d_out + 1)]
    dp[0][0] = 0.0
    for r in range(d_out):
        for t in range(budget + 1):
            if dp[r][t] == math.inf:
                continue
            for k in range(d_in + 1):
                if t + k > budget:
                    break
                v = dp[r][t] + float(best_val[r, k])
                if v < dp[r + 1][t + k]:
                    dp[r + 1][t + k], arg[r + 1][t + k] = v, k
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    t = budget
    for r in range(d_out, 0, -1):
        k = arg[r][t]
        mask[r - 1] = supports[best_idx[r - 1, k]]
        t -= k
    return mask, dp[d_out][budget]
