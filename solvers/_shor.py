r"""The facially reduced Shor SDP of ``min pᵀQp`` over budgeted binaries, and its safe bound.

Shared by the ``relax-sdp`` backend and the QCR rewrite (:mod:`._qcr`, whose multipliers are this
SDP's diagonal dual variables). For pruned indicators ``p ∈ {0,1}ⁿ``, a quadratic form ``Q``
(n, n) and group budgets ``1_gᵀp = c_g``, lift ``X = [[1, pᵀ], [p, P]] ⪰ 0`` with
``diag(P) = p`` and the squared budget constraints ``P 1_g = c_g p``:

.. math:: \min ⟨Q, P⟩ \quad\text{s.t.}\quad X ⪰ 0,\ X_{00} = 1,\ \mathrm{diag}(P) = p,\
          1_gᵀp = c_g,\ P1_g = c_g p.

The budget constraints say exactly ``X v_g = 0`` for ``v_g = (−c_g, 1_g)``, so no feasible ``X``
is strictly positive definite (no Slater point). :func:`shor_dual` therefore solves the
*facially reduced* form ``X = V Y Vᵀ``, ``V`` (n+1, m) an orthonormal basis of ``{v_g}^⊥``
(:func:`reduction_basis`), through its dual

.. math:: \max_{s, μ}\ s \quad\text{s.t.}\quad Vᵀ M(s, μ) V ⪰ 0, \qquad
          M(s, μ) = \begin{bmatrix} −s & μᵀ/2 \\ μ/2 & Q − \mathrm{diag}\,μ \end{bmatrix}.

Safe bound (:func:`shor_certificate`; weak duality, exact in float64 whatever the solver's
accuracy): every feasible ``X`` (in particular ``(1,p)(1,p)ᵀ`` for a feasible mask) satisfies
``⟨Q,P⟩ − s = ⟨M, X⟩ = ⟨VᵀMV, Y⟩ ≥ λ_min(VᵀMV)·tr X`` and ``tr X = 1 + Σ_g c_g``, so

.. math:: \mathrm{OPT} ≥ s + \min(0, λ_{\min}(VᵀMV))\,(1 + Σ_g c_g) − \text{float margin}.

No PSD clipping of ``G`` is needed: the bound holds for the indefinite ``Q`` as given.
"""
from __future__ import annotations

import numpy as np

from ._relax import FLOAT_MARGIN, Block, solve_cvx
from .base import Params

__all__ = ["reduction_basis", "shor_certificate", "shor_dual", "predicted_sdp_seconds"]

#: seconds the SDP (cvxpy canonicalisation + SCS) takes at n = 128 and the growth exponent, on
#: the reference 2-core machine, one thread: measured 1.8 / 6.7 / 20.8 / ~35 s at n = 64 / 128 /
#: 192 / 256 (at 256, 23 s of it canonicalisation, which no solver time limit interrupts)
SDP_SECONDS_128, SDP_GROWTH = 6.7, 2.6


def predicted_sdp_seconds(n: int) -> float:
    """What an SDP of ``n`` entries is expected to take (:data:`SDP_SECONDS_128`): callers with
    less time left skip it, since its canonicalisation cannot be cut short."""
    return SDP_SECONDS_128 * (n / 128.0) ** SDP_GROWTH


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
