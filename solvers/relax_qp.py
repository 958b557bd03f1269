r"""``relax-qp``: convexified continuous relaxation of the ``mask`` objective (cvxpy).

With ``p = 1 − m`` the pruned indicator of a row and ``Q = diag(w) G diag(w)`` (scaled problem,
unit-diagonal ``G``), the row error is ``pᵀQp``. Because ``p_i² = p_i`` on ``{0,1}``,

.. math:: pᵀQp = pᵀ(Q − \mathrm{diag}\,μ)p + μᵀp \quad\text{for every binary } p,

for any ``μ``. The relaxation minimises the right-hand side over the pattern's hull
(``p ∈ [0,1]``, pruned count per group). It is convex when ``Q − diag μ ⪰ 0`` on the null space
``Z`` of the group constraints (rows and N:M blocks have equality constraints, so only
``Zᵀ(Q − diag μ)Z ⪰ 0`` is needed); the largest admissible shift gives the strongest bound.
Choices (option ``mu``):

``"scaled"`` (default)
    ``μ = λ·w²`` with ``λ = λ_min(ZᵀQZ, Zᵀ diag(w²) Z)`` (generalised eigenvalue): the shift
    follows the weights' magnitudes (``Q`` has diagonal ``w²``).
``"eig"``
    ``μ = λ_min(ZᵀQZ)·1`` (uniform shift; weak when some weights are tiny).
``"none"``
    ``μ = 0``: the plain continuous relaxation.

Columns share one ``p`` (``Q = Σ_r Q_r``); unstructured couples the rows only through one
global budget, so ``μ`` is chosen per row on the full space.

Bound (safe by convexity, independent of the conic solver's accuracy): for the solver's point
``p̂`` (projected onto the affine hull) and the exact LMO vertex ``s = argmin_{hull} ∇f(p̂)ᵀs``,

.. math:: \min_{\text{hull}} f ≥ f(p̂) + ∇f(p̂)ᵀ(s − p̂) − ε \max_{\text{hull}}‖x − p̂‖²,

where ``ε = max(0, −λ_min(Zᵀ(Q − diag μ)Z))`` is the computed convexity defect (it also covers a
Gram matrix with slightly negative eigenvalues), evaluated in float64, minus a relative float
margin of 1e-11. Rounding: the pattern's exact LMO on ``1 − p̂`` or Wanda, whichever scores better.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from layerprune.problems import LayerProblem

from ._relax import (FLOAT_MARGIN, Block, blocks_for, lmo_min, make_proposal, null_basis,
                     project_affine, run_blocks, scaled_arrays, scores_to_matrix, solve_cvx)
from .base import Option, Params, Proposal, Solver

__all__ = ["RelaxQP", "shift_mu", "qp_certificate"]

MAX_WORK = 1 << 23  # d_out · d_in² (dense quadratic forms handed to cvxpy)


def _terms(block: Block, W: np.ndarray, G: np.ndarray):
    """(Q_t, ω_t, idx_t) of a block: one per row, or one summed term when the block is shared."""
    if block.shared:
        Ws = W[block.rows]
        Q = sum(np.outer(w, w) * G for w in Ws)
        return [(Q, (Ws ** 2).sum(axis=0), block.idx(0))]
    return [(np.outer(W[r], W[r]) * G, W[r] ** 2, block.idx(t)) for t, r in enumerate(block.rows)]


def shift_mu(Q: np.ndarray, omega: np.ndarray, Z: np.ndarray, mode: str) -> np.ndarray:
    """Diagonal shift ``μ`` with ``Zᵀ(Q − diag μ)Z ⪰ 0`` (up to rounding). Shapes: (n,n),(n,),(n,m)."""
    import scipy.linalg as sl

    n = Q.shape[0]
    if mode == "none" or Z.shape[1] == 0:
        return np.zeros(n)
    om = np.ones(n) if mode == "eig" else omega + 1e-12 * max(float(omega.max()), 1e-300)
    a = Z.T @ Q @ Z
    b = Z.T @ (om[:, None] * Z)
    lam = float(sl.eigh(0.5 * (a + a.T), 0.5 * (b + b.T), eigvals_only=True, subset_by_index=[0, 0])[0])
    lam -= 1e-10 * abs(lam)
    return lam * om


def qp_certificate(terms, mus, p: np.ndarray, block: Block, Zs) -> float:
    """Safe lower bound of ``min_hull Σ_t f_t`` from the point ``p`` (see module docstring)."""
    prune = block.prune
    f, g, defect, scale = 0.0, np.zeros_like(p), 0.0, 0.0
    for (Q, _, idx), mu, Z in zip(terms, mus, Zs):
        A = Q - np.diag(mu)
        x = p[idx]
        Ax = A @ x
        f += float(x @ Ax + mu @ x)
        g[idx] += 2 * Ax + mu
        lam = float(np.linalg.eigvalsh(Z.T @ A @ Z)[0]) if Z.shape[1] else 0.0
        defect += max(0.0, -lam) * float(np.maximum(x ** 2, (1 - x) ** 2).sum())
        scale += float(np.abs(A).max()) * len(idx)
    s = lmo_min(g, block.group, prune)
    lin = float(g @ (s - p))
    margin = FLOAT_MARGIN * (abs(f) + float(np.abs(g * (s - p)).sum()) + scale)
    return f + lin - defect - margin


def _solve_block(block: Block, W, G, mode: str, params: Params, deadline: float):
    """Solve one block's QP. Returns (bound in original units, p̂ or None)."""
    import cvxpy as cp

    terms = _terms(block, W, G)
    sigma = max(float(np.diag(Q).max()) for Q, _, _ in terms)
    if sigma <= 0.0:
        return 0.0, None
    terms = [(Q / sigma, om / sigma, idx) for Q, om, idx in terms]
    prune = block.prune.astype(float)
    single = len(terms) == 1
    B = block.B()
    Zs = [null_basis(B)] if single else [np.eye(block.d) for _ in terms]
    mus = [shift_mu(Q, om, Z, mode) for (Q, om, _), Z in zip(terms, Zs)]

    def factor(M):
        lam, U = np.linalg.eigh(0.5 * (M + M.T))
        return U * np.sqrt(np.clip(lam, 0.0, None))

    if single:  # eliminate the equality constraints: p = p0 + Z y
        (Q, _, _), mu, Z = terms[0], mus[0], Zs[0]
        A = Q - np.diag(mu)
        p0 = B @ (prune / block.sizes)
        y = cp.Variable(Z.shape[1])
        pe = p0 + Z @ y
        F = factor(Z.T @ A @ Z)
        obj = cp.sum_squares(F.T @ y) + (Z.T @ (2 * A @ p0 + mu)) @ y
        prob = cp.Problem(cp.Minimize(obj), [pe >= 0, pe <= 1])
        ok = solve_cvx(prob, params, deadline)
        p = None if (ok is None or y.value is None) else p0 + Z @ y.value
    else:
        x = cp.Variable(block.n)
        obj = 0
        for (Q, _, idx), mu in zip(terms, mus):
            F = factor(Q - np.diag(mu))
            obj = obj + cp.sum_squares(F.T @ x[idx]) + mu @ x[idx]
        prob = cp.Problem(cp.Minimize(obj), [x >= 0, x <= 1, B.T @ x == prune])
        ok = solve_cvx(prob, params, deadline)
        p = None if (ok is None or x.value is None) else x.value
    if p is None:
        return 0.0, None
    p = project_affine(np.clip(p, 0.0, 1.0), block.group, prune)
    return sigma * qp_certificate(terms, mus, p, block, Zs), p


class RelaxQP(Solver):
    """Convexified continuous QP relaxation of the ``mask`` objective (certified bound)."""

    name = "relax-qp"
    option_specs = (
        Option("mu", str, "scaled", "convexifying diagonal: on the scaled problem, λ_min·1, or none",
               choices=("scaled", "eig", "none")),
        Option("max_work", int, MAX_WORK, "largest d_out·d_in² it builds a dense cvxpy model for", low=1),
    )
    description = "continuous QP relaxation of the mask objective, diagonal convexification (cvxpy)"
    requires = ("cvxpy",)
    objectives = frozenset({"mask"})
    certifies = True
    exact = False

    def _size_limit(self, problem: LayerProblem) -> Optional[str]:
        work = problem.d_out * problem.d_in ** 2
        if work > self.option("max_work"):
            return f"relax-qp: d_out·d_in² = {work} too large for dense cvxpy models (limit {MAX_WORK})"
        return None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        mode = self.option("mu")
        start = time.perf_counter()
        deadline = params.deadline(start)
        W, G = scaled_arrays(problem)
        blocks = blocks_for(problem)
        bound, ps, limit = run_blocks(blocks, lambda b: _solve_block(b, W, G, mode, params, deadline),
                                      deadline, callback)
        keep = 1.0 - scores_to_matrix(blocks, ps, problem.shape, fill=0.5)
        return make_proposal(problem, params, keep, bound, f"QP relaxation (mu={mode}), convexity certificate",
                             limit=limit, iterations=len(blocks), info={"mu": mode})
