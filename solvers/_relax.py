r"""Shared pieces of the convex relaxation backends (relax-qp, relax-sdp, relax-perspective).

Every relaxation is solved on the unit-diagonal scaled problem (``problem.scaled()``, computed in
float64) and split into independent *blocks*:

=============  ============================================  ==============================
pattern        block                                         groups (budget per group)
=============  ============================================  ==============================
per-row:K      one row                                       the row
nm:N:M         one row                                       each run of M inputs
columns:K      all rows, one shared vector over the columns  all columns
unstructured   all rows, one vector over every weight        every weight
=============  ============================================  ==============================

A block holds a flat vector ``x`` of length ``n`` (``n = d_in``, or ``d_out·d_in`` for
unstructured) and *terms*: term ``t`` belongs to row ``rows[t]`` and reads ``x[idx[t]]``
(``d_in`` entries; every term reads the same entries when the block is shared).

The bounds are made safe *outside* the conic solver: each backend turns the solver's
(approximate) point into a bound that weak duality or convexity makes valid for any point, and
evaluates it exactly in float64. The solver's accuracy then only affects how tight the bound is.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from layerprune.problems import LayerProblem

from .base import Params, Proposal, Status

__all__ = ["Block", "blocks_for", "run_blocks", "scaled_arrays", "lmo_min", "project_affine", "solve_cvx",
           "scores_to_matrix", "best_rounding", "make_proposal", "null_basis"]

#: relative float64 safety added to every certificate (rounding in the exact evaluations)
FLOAT_MARGIN = 1e-11


@dataclass
class Block:
    """Independent piece of a relaxation.

    rows : (T,) int array, the row of each term
    shared : every term reads the same ``d_in`` entries (columns)
    n : length of the block's flat vector
    group : (n,) int array, the group of each entry
    keep : (k,) int array, entries *kept* per group (pruned = size − keep)
    """

    rows: np.ndarray
    shared: bool
    n: int
    group: np.ndarray
    keep: np.ndarray

    @property
    def d(self) -> int:
        return self.n if self.shared else self.n // len(self.rows)

    def idx(self, t: int) -> np.ndarray:
        """Flat indices of term ``t``'s ``d_in`` entries."""
        d = self.d
        return np.arange(d) if self.shared else np.arange(t * d, (t + 1) * d)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.group, minlength=len(self.keep))

    @property
    def prune(self) -> np.ndarray:
        return self.sizes - self.keep

    def B(self) -> np.ndarray:
        """(n, k) 0/1 group incidence matrix."""
        out = np.zeros((self.n, len(self.keep)))
        out[np.arange(self.n), self.group] = 1.0
        return out


def blocks_for(problem: LayerProblem) -> list[Block]:
    """The independent blocks of a problem's pattern (see the module table)."""
    p, d_out, d_in = problem.pattern, problem.d_out, problem.d_in
    if p.name == "per-row":
        return [Block(np.array([r]), False, d_in, np.zeros(d_in, int), np.array([p.keep]))
                for r in range(d_out)]
    if p.name == "nm":
        g = np.arange(d_in) // p.m
        return [Block(np.array([r]), False, d_in, g, np.full(d_in // p.m, p.n)) for r in range(d_out)]
    if p.name == "columns":
        return [Block(np.arange(d_out), True, d_in, np.zeros(d_in, int), np.array([p.keep]))]
    n = d_out * d_in
    return [Block(np.arange(d_out), False, n, np.zeros(n, int), np.array([problem.budget]))]


def scaled_arrays(problem: LayerProblem) -> tuple[np.ndarray, np.ndarray]:
    """(W̃, G̃) float64 numpy arrays of the unit-diagonal scaling, computed in float64."""
    ps, _ = problem.to(dtype=torch.float64).scaled()
    G = ps.G.cpu().numpy()
    return ps.W.cpu().numpy(), 0.5 * (G + G.T)


def lmo_min(g: np.ndarray, group: np.ndarray, count: np.ndarray) -> np.ndarray:
    """argmin ``gᵀs`` over ``{s ∈ [0,1]ⁿ : Σ_{i∈group j} s_i = count_j}``: a 0/1 vector.

    The ``count_j`` smallest entries of ``g`` in each group are set to one.
    """
    s = np.zeros_like(g)
    for j, c in enumerate(count):
        ids = np.flatnonzero(group == j)
        if c > 0:
            s[ids[np.argsort(g[ids], kind="stable")[:c]]] = 1.0
    return s


def project_affine(x: np.ndarray, group: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Euclidean projection onto ``{x : Σ_{group j} x = count_j}`` (groups partition x)."""
    sizes = np.bincount(group, minlength=len(count)).astype(float)
    excess = (np.bincount(group, weights=x, minlength=len(count)) - count) / np.maximum(sizes, 1)
    return x - excess[group]


def null_basis(B: np.ndarray) -> np.ndarray:
    """Orthonormal basis (n, n − rank) of ``{x : Bᵀx = 0}``."""
    n = B.shape[0]
    q, _ = np.linalg.qr(np.hstack([B, np.eye(n)]))
    return q[:, np.linalg.matrix_rank(B):n]


def solve_cvx(prob, params: Params, deadline: float, *, tol: float = 1e-9,
              order: tuple = ("CLARABEL", "SCS")) -> Optional[str]:
    """Solve a cvxpy problem: CLARABEL first, SCS as fallback. Returns the solver used or None.

    Accuracy only affects tightness (every certificate is re-evaluated exactly), so
    ``optimal_inaccurate`` is accepted.
    """
    import cvxpy as cp

    installed = cp.installed_solvers()
    for name in order:
        if name not in installed:
            continue
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        opts: dict = {}
        if name == "CLARABEL":
            opts = dict(tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol, max_iter=500)
            if math.isfinite(left):
                opts["time_limit"] = float(left)
        else:
            # indirect (CG) linear solves: the Shor duals' few dense columns make SCS's direct
            # KKT factorisation the slow part (QCR SDP at n = 128: 4.7/3.6 s vs 6.5/6.3 s, same bounds)
            opts = dict(eps_abs=max(tol * 100, 1e-7), eps_rel=max(tol * 100, 1e-7), max_iters=20000, use_indirect=True)
            if math.isfinite(left):
                opts["time_limit_secs"] = float(left)
        try:
            with warnings.catch_warnings():  # accuracy warnings: the certificates absorb them
                warnings.simplefilter("ignore")
                prob.solve(solver=name, verbose=params.verbose, **opts)
        except (cp.error.SolverError, ArithmeticError, ValueError):
            continue
        if prob.status in ("optimal", "optimal_inaccurate"):
            return name
    return None


def scores_to_matrix(blocks: list[Block], xs: list[np.ndarray], shape: tuple[int, int],
                     fill: float = 0.0) -> np.ndarray:
    """Scatter each block's flat vector back into a (d_out, d_in) matrix."""
    out = np.full(shape, fill, dtype=float)
    for b, x in zip(blocks, xs):
        if x is None:
            continue
        for t, r in enumerate(b.rows):
            out[r] = x[b.idx(t)]
    return out


def best_rounding(problem: LayerProblem, keep_scores: Optional[np.ndarray]):
    """Round the relaxation's keep-scores and the Wanda scores; return (mask, objective, which)."""
    ps, _ = problem.to(dtype=torch.float64).scaled()
    cands = [("wanda", ps.W.abs())]
    if keep_scores is not None and np.all(np.isfinite(keep_scores)):
        # ties in the relaxed values are broken by the Wanda score
        wanda = ps.W.abs().cpu().numpy()
        tieb = 1e-9 * wanda / max(float(wanda.max()), 1e-300)
        cands.insert(0, ("relaxation", torch.as_tensor(keep_scores + tieb)))
    best = None
    for name, s in cands:
        mask = problem.round(s.to(problem.device))
        obj = problem.objective(mask)
        if best is None or obj < best[1]:
            best = (mask, obj, name)
    return best


def make_proposal(problem: LayerProblem, params: Params, keep_scores, bound: float, source: str,
                  *, limit: Optional[str] = None, info: Optional[dict] = None,
                  iterations: int = 0) -> Proposal:
    """Round, re-score, and claim OPTIMAL only if the bound meets the rounded mask's objective."""
    mask, obj, which = best_rounding(problem, keep_scores)
    status = Status.FEASIBLE
    if limit is None and obj - bound <= max(params.gap_tol, 1e-9) * max(obj, 0.0):
        status = Status.OPTIMAL
    info = dict(info or {})
    info["rounding"] = which
    return Proposal(mask=mask, lower_bound=bound, bound_source=source, status=status,
                    limit=limit, iterations=iterations, info=info)


def run_blocks(blocks: list, solve_block, deadline: float, callback=None
               ) -> tuple[float, list, Optional[str]]:
    """Solve the blocks in order under one wall-clock deadline and sum their bounds.

    Parameters
    ----------
    blocks : list of :class:`Block`
    solve_block : ``block -> (bound, point)``; ``bound`` is valid for that block's exact error
        (negative values are raised to 0, the error being ≥ 0), ``point`` its relaxed solution
        of shape (n,) or None when the solver gave none
    deadline : ``time.perf_counter()`` value after which no block is started
    callback : ``event -> stop?`` called after every block with ``{"block", "lower_bound"}``

    Returns
    -------
    bound : sum of the block bounds (blocks never reached count 0)
    points : one entry per block (None where unsolved)
    limit : ``"time"``, ``"interrupted"`` or None
    """
    bound, points, limit = 0.0, [], None
    for block in blocks:
        if time.perf_counter() >= deadline:
            limit = "time"
            break
        lb, point = solve_block(block)
        if point is None and time.perf_counter() >= deadline:
            limit = "time"
        bound += max(float(lb), 0.0)
        points.append(point)
        if callback is not None and callback({"block": len(points), "lower_bound": bound}):
            limit = limit or "interrupted"
            break
    return bound, points + [None] * (len(blocks) - len(points)), limit
