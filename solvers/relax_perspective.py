r"""``relax-perspective``: perspective relaxation of the ``reconstruct`` objective (cvxpy).

Per row (scaled problem, unit-diagonal ``G``), with kept indicator ``z`` and weights ``v``
(``v_i = 0`` where ``z_i = 0``), split ``G = A + D``, ``D = diag(δ) ⪰ 0``, ``A = G − D ⪰ 0``:

.. math:: (w−v)ᵀG(w−v) = (w−v)ᵀA(w−v) + Σ_i δ_i (w_i² − 2w_iv_i + v_i²),

and ``v_i² = v_i²/z_i`` on binary ``z`` (``0/0 = 0`` forces ``v_i = 0``). Replacing ``v_i²`` by
the perspective ``v_i²/z_i`` (rotated cone ``v_i² ≤ σ_i z_i``) and ``z`` by the pattern's hull
gives a convex relaxation; ``h(z) = min_v`` of it is convex in ``z``.

Choice of ``δ`` (option ``delta``): ``"sdp"`` (default) solves the small log-det-type SDP
``max Σ_i log δ_i s.t. G − diag δ ⪰ 0`` (one per layer, ``d_in × d_in``, by a barrier Newton
method: :func:`._quadratic.logdet_diagonal`), which spreads ``δ``
over all channels; ``"sdp-sum"`` maximises ``Σ δ_i`` instead (vertex solutions that pile ``δ`` on
a few channels: much weaker, measured); ``"eig"`` takes ``δ = λ_min(G)·1`` (weak for
ill-conditioned ``G``). Measured bound/optimum on make_instance(4, 16), 50% and 2:4, 3 seeds:
eig 0.10, sdp-sum 0.05, sdp 0.26 (mean). ``δ`` is then shrunk until
``λ_min(G − diag δ) ≥ 0`` holds in float64 (entries below 1e-9 are dropped: no perspective).

Safe bound (convexity, exact in float64): from the solver's ``ẑ`` (clipped to [0,1]) compute
``h(ẑ)`` and its gradient exactly,

.. math:: h(z) = wᵀGw − b̃ᵀK^{+}b̃,\quad K = SAS + D,\ b̃ = S\,Gw,\ S = \mathrm{diag}(\sqrt{z}),
          \qquad ∂h/∂z_i = −δ_i u_i², \ u = (Gw − Av)/δ,\ v = S K^{+} b̃,

then ``min_hull h ≥ h(ẑ) + ∇h(ẑ)ᵀ(s − ẑ)`` with ``s`` the exact LMO vertex, minus a relative
float margin of 1e-11. If ``G`` is not numerically PSD (``λ_min < 0`` in float64) no split with
``A ⪰ 0`` exists and the bound is 0 (trivially valid). Rounding: the pattern's exact LMO on ``ẑ``,
or Wanda, whichever refits better.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from layerprune.problems import LayerProblem

from ._relax import (FLOAT_MARGIN, blocks_for, lmo_min, make_proposal, run_blocks, scaled_arrays,
                     scores_to_matrix, solve_cvx)
from ._quadratic import logdet_diagonal
from .base import Option, Params, Proposal, Solver, share_of_time_left

__all__ = ["RelaxPerspective", "choose_delta", "safe_delta", "h_and_grad"]

MAX_WORK = 1 << 22  # d_out · d_in²
DELTA_FLOOR = 1e-9


def choose_delta(G: np.ndarray, mode: str, params: Params, deadline: float) -> np.ndarray:
    """Diagonal ``δ ≥ 0`` with ``G − diag δ ⪰ 0`` (approximately; see :func:`safe_delta`).

    ``"sdp"``: ``max Σ log δ`` by :func:`._quadratic.logdet_diagonal` (a barrier Newton
    method: 0.07 s at d=64 where cvxpy's exponential-cone model took 11.7 s, same optimum to
    1e-6 in ``Σ log δ`` at d ≤ 32); ``"sdp-sum"``: ``max Σ δ`` (cvxpy); ``"eig"``: ``λ_min·1``.
    """
    n = G.shape[0]
    lam = float(np.linalg.eigvalsh(G)[0])
    if mode == "eig" or lam < 0:
        return np.full(n, max(lam, 0.0))
    if mode == "sdp":  # Newton steps for at most half the time left (an early stop is valid)
        return logdet_diagonal(G, deadline=share_of_time_left(deadline, 0.5))
    import cvxpy as cp

    delta = cp.Variable(n)
    # Σ log δ spreads δ over every channel; Σ δ (or Σ ω δ) piles it on a few (measured: the
    # log form gives 2.7x the bound of Σ δ on make_instance(4, 16), Σ ω δ gives ~0)
    prob = cp.Problem(cp.Maximize(cp.sum(delta)), [G - cp.diag(delta) >> 0, delta >= 0])
    if solve_cvx(prob, params, deadline) is None or delta.value is None:
        return np.full(n, max(lam, 0.0))
    return np.maximum(np.asarray(delta.value, dtype=float), 0.0)


def safe_delta(G: np.ndarray, delta: np.ndarray) -> Optional[np.ndarray]:
    """Shrink ``δ`` until ``λ_min(G − diag δ) ≥ 0`` in float64; None if even ``δ = 0`` fails."""
    d = delta.copy()
    for k in range(60):
        lam = float(np.linalg.eigvalsh(G - np.diag(d))[0])
        if lam >= 0.0:
            d[d < DELTA_FLOOR] = 0.0
            return d
        if not d.any():
            return None
        d = np.maximum(d - (2.0 ** k) * (-lam) - 1e-15, 0.0)
    return None


def h_and_grad(w: np.ndarray, G: np.ndarray, delta: np.ndarray, z: np.ndarray):
    """Exact ``h(z)`` and ``∇h(z)`` of one row (shapes (d,)); see module docstring."""
    A = G - np.diag(delta)
    b = G @ w
    on = delta > 0
    sq = np.where(on, np.sqrt(np.clip(z, 0.0, None)), 1.0)
    K = sq[:, None] * A * sq[None, :] + np.diag(delta)
    lam, U = np.linalg.eigh(0.5 * (K + K.T))
    cut = 1e-13 * max(float(np.abs(lam).max()), 1e-300)
    inv = np.where(lam > cut, 1.0 / np.where(lam > cut, lam, 1.0), 0.0)
    bt = sq * b
    y = U @ (inv * (U.T @ bt))
    v = sq * y
    h = float(w @ b - bt @ y)
    u = np.where(on, (b - A @ v) / np.where(on, delta, 1.0), 0.0)
    return h, -delta * u ** 2, float(w @ b)


def _solve_block(blk, W, G, FA, delta, params, deadline) -> tuple[float, Optional[np.ndarray]]:
    """Certified perspective bound and relaxed kept indicators ``z`` of one block.

    ``FA`` factors ``G − diag(δ)`` (``FA FAᵀ``); the bound is the convexity certificate
    ``h(ẑ) + ⟨∇h(ẑ), s − ẑ⟩`` at the solver's point with ``s`` the LMO vertex, evaluated in
    float64 with :data:`FLOAT_MARGIN`.
    """
    import cvxpy as cp

    Ws = W[blk.rows]
    sigma = max(float(np.einsum("ti,ij,tj->", Ws, G, Ws)) / len(blk.rows), 1e-300)
    Ws = Ws / np.sqrt(sigma)
    z = cp.Variable(blk.n)
    obj, cons = 0, [z >= 0, z <= 1, blk.B().T @ z == blk.keep]
    for t, w in enumerate(Ws):
        v, s = cp.Variable(blk.d), cp.Variable(blk.d)
        zt = z[blk.idx(t)]
        obj = obj + cp.sum_squares(FA.T @ (w - v)) + delta @ (w ** 2) - 2 * (delta * w) @ v + delta @ s
        cons.append(cp.SOC(s + zt, cp.vstack([2 * v, s - zt]), axis=0))
    prob = cp.Problem(cp.Minimize(obj), cons)
    if solve_cvx(prob, params, deadline) is None or z.value is None:
        return 0.0, None
    zh = np.clip(np.asarray(z.value, dtype=float), 0.0, 1.0)
    hval, grad, scale = 0.0, np.zeros(blk.n), 0.0
    for t, w in enumerate(Ws):
        idx = blk.idx(t)
        h, g, wgw = h_and_grad(w, G, delta, zh[idx])
        hval += h
        grad[idx] += g
        scale += wgw
    sv = lmo_min(grad, blk.group, blk.keep)
    lin = float(grad @ (sv - zh))
    margin = FLOAT_MARGIN * (abs(hval) + float(np.abs(grad * (sv - zh)).sum()) + scale)
    return sigma * (hval + lin - margin), zh


class RelaxPerspective(Solver):
    """Perspective relaxation of the ``reconstruct`` objective (certified convexity bound)."""

    name = "relax-perspective"
    option_specs = (
        Option("delta", str, "sdp", "perspective diagonal: max Σ log δ (sdp), max Σ δ (sdp-sum) or λ_min·1 (eig)",
               choices=("sdp", "sdp-sum", "eig")),
        Option("max_work", int, MAX_WORK, "largest d_out·d_in² it builds a dense cvxpy model for", low=1),
    )
    description = "perspective relaxation of the reconstruct objective, SDP-chosen diagonal (cvxpy)"
    requires = ("cvxpy",)
    objectives = frozenset({"reconstruct"})
    certifies = True
    exact = False

    def _size_limit(self, problem: LayerProblem) -> Optional[str]:
        work = problem.d_out * problem.d_in ** 2
        if work > self.option("max_work"):
            return f"relax-perspective: d_out·d_in² = {work} too large for dense cvxpy models (limit {MAX_WORK})"
        return None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        mode = self.option("delta")
        start = time.perf_counter()
        deadline = params.deadline(start)
        W, G = scaled_arrays(problem)
        delta = safe_delta(G, choose_delta(G, mode, params, deadline))
        blocks = blocks_for(problem)
        if delta is None or not delta.any():
            # no perspective strength: the relaxation is z-independent with value 0
            return make_proposal(problem, params, None, 0.0, "perspective relaxation (G − D ⪰ 0 only for D = 0)",
                                 info={"delta_sum": 0.0})
        A = G - np.diag(delta)
        lamA, UA = np.linalg.eigh(A)
        FA = UA * np.sqrt(np.clip(lamA, 0.0, None))
        bound, zs, limit = run_blocks(blocks, lambda blk: _solve_block(blk, W, G, FA, delta, params, deadline),
                                      deadline, callback)
        keep = scores_to_matrix(blocks, zs, problem.shape, fill=0.5)
        return make_proposal(problem, params, keep, bound,
                             f"perspective relaxation (delta={mode}), convexity certificate",
                             limit=limit, iterations=len(blocks), info={"delta_sum": float(delta.sum())})
