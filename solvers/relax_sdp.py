r"""``relax-sdp``: Shor SDP relaxation of the ``mask`` objective (cvxpy, small blocks).

For a block with pruned vector ``p ∈ {0,1}ⁿ``, quadratic form ``Q`` (scaled problem) and group
budgets ``1_gᵀp = c_g`` (pruned per group), lift ``X = [[1, pᵀ], [p, P]] ⪰ 0`` with
``diag(P) = p`` and the squared budget constraints ``P 1_g = c_g p``:

.. math:: \min ⟨Q, P⟩ \quad\text{s.t.}\quad X ⪰ 0,\ X_{00} = 1,\ \mathrm{diag}(P) = p,\
          1_gᵀp = c_g,\ P1_g = c_g p.

The budget constraints say exactly ``X v_g = 0`` for ``v_g = (−c_g, 1_g)``, so no feasible ``X``
is strictly positive definite (no Slater point). We therefore solve the *facially reduced* form
``X = V Y Vᵀ``, ``V`` an orthonormal basis of ``{v_g}^⊥``, through its dual

.. math:: \max_{s, μ}\ s \quad\text{s.t.}\quad Vᵀ M(s, μ) V ⪰ 0, \qquad
          M(s, μ) = \begin{bmatrix} −s & μᵀ/2 \\ μ/2 & Q − \mathrm{diag}\,μ \end{bmatrix}.

Safe bound (weak duality, exact in float64 whatever the solver's accuracy): every feasible
``X`` (in particular ``(1,p)(1,p)ᵀ`` for a feasible mask) satisfies
``⟨Q,P⟩ − s = ⟨M, X⟩ = ⟨VᵀMV, Y⟩ ≥ λ_min(VᵀMV)·tr X`` and ``tr X = 1 + Σ_g c_g``, so

.. math:: \mathrm{OPT} ≥ s + \min(0, λ_{\min}(VᵀMV))\,(1 + Σ_g c_g) − \text{float margin}.

No PSD clipping of ``G`` is needed: the bound holds for the indefinite ``Q`` as given.

Blocks (see ``_relax``): per-row and N:M decouple row by row; columns is one block with
``Q = Σ_r Q_r``; unstructured is one joint block of size ``d_out·d_in`` (block-diagonal ``Q``).
Each block needs ``n ≤ max_n`` (option, default 128). Rounding: the primal ``p`` (the PSD
constraint's dual) rounded by the pattern's exact LMO, or Wanda, whichever scores better.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from layerprune.problems import LayerProblem

from ._relax import (FLOAT_MARGIN, Block, blocks_for, make_proposal, scaled_arrays,
                     run_blocks, scores_to_matrix, solve_cvx)
from .base import Option, Params, Proposal, Solver

__all__ = ["RelaxSDP", "block_Q", "shor_dual", "shor_certificate", "reduction_basis"]

MAX_N = 128
CLARABEL_MAX_N = 40


def block_Q(block: Block, W: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Dense (n, n) quadratic form of a block: ``Q_r``, ``Σ_r Q_r`` (shared) or block-diagonal."""
    Qs = [np.outer(W[r], W[r]) * G for r in block.rows]
    if block.shared:
        return sum(Qs)
    if len(Qs) == 1:
        return Qs[0]
    import scipy.linalg as sl

    return sl.block_diag(*Qs)


def reduction_basis(block: Block) -> np.ndarray:
    """Orthonormal basis (n+1, m) of ``{v_g}^⊥``, ``v_g = (−c_g, 1_g)``, c_g = pruned count."""
    B = block.B()
    Vg = np.vstack([-block.prune[None, :].astype(float), B])  # (n+1, k)
    n1 = block.n + 1
    q, _ = np.linalg.qr(np.hstack([Vg, np.eye(n1)]))
    r = np.linalg.matrix_rank(Vg)
    return q[:, r:n1]


def _M(Q: np.ndarray, s: float, mu: np.ndarray) -> np.ndarray:
    n = Q.shape[0]
    M = np.empty((n + 1, n + 1))
    M[0, 0] = -s
    M[0, 1:] = M[1:, 0] = 0.5 * mu
    M[1:, 1:] = Q - np.diag(mu)
    return M


def shor_certificate(Q: np.ndarray, V: np.ndarray, s: float, mu: np.ndarray, trace: float) -> float:
    """Valid lower bound from any dual point ``(s, μ)`` (see module docstring)."""
    E = V.T @ _M(Q, s, mu) @ V
    lam = float(np.linalg.eigvalsh(0.5 * (E + E.T))[0])
    margin = FLOAT_MARGIN * (abs(s) + trace * (float(np.abs(Q).max()) + float(np.abs(mu).max(initial=0))))
    return s + min(0.0, lam) * trace - margin


def shor_dual(Q: np.ndarray, V: np.ndarray, params: Params, deadline: float,
              order: tuple = ("CLARABEL", "SCS"), tol: float = 1e-9):
    """Solve the reduced dual SDP (conic solver tolerance ``tol``, see :func:`solve_cvx`).
    Returns (s, μ, p) or None; p is the primal point (n,)."""
    import cvxpy as cp

    n = Q.shape[0]
    v0, V1 = V[0], V[1:]
    s = cp.Variable()
    mu = cp.Variable(n)
    m = V.shape[1]
    # VᵀMV = VᵀC V − s v0v0ᵀ + Σ_i μ_i A_i, A_i = sym(v0 V1[i]ᵀ) − V1[i]V1[i]ᵀ, as one linear map
    # (writing V1ᵀ diag(μ) V1 in cvxpy makes canonicalisation ~50x slower at n = 64)
    A = 0.5 * (v0[:, None, None] * V1.T[None, :, :] + V1.T[:, None, :] * v0[None, :, None]) \
        - V1.T[:, None, :] * V1.T[None, :, :]  # (m, m, n)
    E0 = V1.T @ Q @ V1
    E = cp.reshape(E0.reshape(-1) - s * np.outer(v0, v0).reshape(-1) + A.reshape(m * m, n) @ mu,
                   (m, m), order="C")
    con = 0.5 * (E + E.T) >> 0
    prob = cp.Problem(cp.Maximize(s), [con])
    if solve_cvx(prob, params, deadline, order=order, tol=tol) is None or s.value is None:
        return None
    p = None
    Y = con.dual_value
    if Y is not None:
        X = V @ np.asarray(Y) @ V.T
        if X[0, 0] > 1e-12:
            p = X[0, 1:] / X[0, 0]
    return float(s.value), np.asarray(mu.value, dtype=float), p


def _solve_block(b, W, G, params, deadline, order_for) -> tuple[float, Optional[np.ndarray]]:
    """Certified Shor bound and relaxed point (pruned indicators) of one block."""
    Q = block_Q(b, W, G)
    sigma = float(np.diag(Q).max())
    if sigma <= 0.0:
        return 0.0, None
    Q = Q / sigma
    V = reduction_basis(b)
    # CLARABEL's dense PSD scaling costs O(n⁶) per iteration (48 s at n = 64, measured):
    # SCS first above CLARABEL_MAX_N; the certificate absorbs SCS's lower accuracy
    sol = shor_dual(Q, V, params, deadline, order=order_for(Q.shape[0]))
    if sol is None:
        return 0.0, None
    s, mu, p = sol
    trace = 1.0 + float(b.prune.sum())
    return sigma * shor_certificate(Q, V, s, mu, trace), (None if p is None else np.clip(p, 0.0, 1.0))


class RelaxSDP(Solver):
    """Shor SDP relaxation of the ``mask`` objective (facially reduced, certified dual bound)."""

    name = "relax-sdp"
    option_specs = (
        Option("max_n", int, MAX_N, "largest lifted dimension n it builds an SDP for", low=1),
        Option("clarabel_max_n", int, CLARABEL_MAX_N, "largest block solved by Clarabel first (SCS above)", low=0),
    )
    description = "Shor SDP relaxation of the mask objective with squared budget constraints (cvxpy)"
    requires = ("cvxpy",)
    objectives = frozenset({"mask"})
    certifies = True
    exact = False

    def _size_limit(self, problem: LayerProblem) -> Optional[str]:
        limit = self.option("max_n")
        n = problem.d_out * problem.d_in if problem.pattern.name == "unstructured" else problem.d_in
        if n > limit:
            return f"relax-sdp: lifted matrix of size {n + 1} exceeds the limit (max_n={limit})"
        return None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        start = time.perf_counter()
        deadline = params.deadline(start)
        W, G = scaled_arrays(problem)
        blocks = blocks_for(problem)
        order_for = lambda n: ("SCS", "CLARABEL") if n > self.option("clarabel_max_n") \
            else ("CLARABEL", "SCS")
        bound, ps, limit = run_blocks(blocks, lambda b: _solve_block(b, W, G, params, deadline, order_for),
                                      deadline, callback)
        keep = 1.0 - scores_to_matrix(blocks, ps, problem.shape, fill=0.5)
        return make_proposal(problem, params, keep, bound, "Shor SDP dual (facially reduced), weak duality",
                             limit=limit, iterations=len(blocks))
