r"""Pure helpers shared by the exact ``mask``/``reconstruct`` backends (scip, bnb, relaxations).

- :func:`psd_factor`: ``A ≈ FFᵀ`` from a clipped eigen-decomposition;
- diagonals ``δ`` with ``A − diag δ ⪰ 0`` (the convexifications ``pᵀQp = pᵀ(Q − Δ)p + δᵀp`` on
  binaries and the perspective split ``G = (G − Δ) + Δ``): :func:`max_diagonal` (``max Σδ`` by
  the mixing method, or ``λ_min·1``), :func:`logdet_diagonal` (``max Σ log δ``, barrier
  Newton), :func:`mask_diagonal` (the ``mask`` models' ``"auto"`` rule);
- :func:`one_swap`: best-improvement 1-swap local search on ``pᵀQp``;
- :func:`warm_start`: the best of Wanda and a given start, per row.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

from layerprune.problems import LayerProblem

__all__ = ["psd_factor", "max_diagonal", "logdet_diagonal", "mask_diagonal", "one_swap", "warm_start"]

#: eigenvalues below this fraction of the largest are dropped when factoring (a relaxation)
EIG_RTOL = 1e-12
#: ``diag="auto"`` (mask) uses the SDP diagonal when ``Σδ`` reaches this share of ``tr Q``.
#: Measured shares: synthetic ``make_instance`` rows (λ_min(G̃) ≈ 1e-7…6e-4) ≤ 1.3e-3; real
#: SmolLM2 rows cut to 16–128 inputs (λ_min(G̃) ≈ 0.15–0.46) 0.10–0.36.
AUTO_MIN_SHARE = 0.01


def psd_factor(A: np.ndarray, rtol: float = EIG_RTOL) -> tuple[np.ndarray, float]:
    """``A ≈ FFᵀ`` from a clipped eigen-decomposition.

    Parameters
    ----------
    A : (n, n) symmetric float64

    Returns
    -------
    F : (n, r) with ``FFᵀ ⪰ A − (eigenvalues ≤ rtol·λ_max)``; dropping small positive
        eigenvalues only lowers the model (valid for bounds)
    neg : ``max(0, −λ_min(A))``, by which ``FFᵀ`` may exceed ``A``
    """
    lam, U = np.linalg.eigh(0.5 * (A + A.T))
    top = max(float(lam[-1]), 0.0)
    keep = lam > rtol * max(top, 1e-300)
    return U[:, keep] * np.sqrt(lam[keep]), max(0.0, -float(lam[0]))


def _mixing_sdp(B: np.ndarray, rank: int, sweeps: int, seed: int, deadline: float = math.inf) -> np.ndarray:
    """Dual diagonal of ``min ⟨B, VVᵀ⟩ s.t. ‖v_j‖ ≥ 1`` (mixing method, Wang–Chang–Kolter).

    This is the dual of ``max Σδ s.t. B − diag(δ) ⪰ 0, δ ≥ 0``. Coordinate step: the best
    ``v_j`` given the others is ``−g_j / max(B_jj, ‖g_j‖)`` with ``g_j = Σ_{k≠j} B_jk v_k``; at a
    stationary point ``(BV)_j = δ_j v_j`` with ``δ_j = max(0, B_jj − ‖g_j‖/‖v_j‖)``.
    No sweep is started that the last one's duration says would end past ``deadline``.
    Returns δ (n,) — feasible only approximately: :func:`max_diagonal` repairs it.
    """
    n = B.shape[0]
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((n, rank))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    diag = np.diag(B).copy()
    BV = B @ V
    prev = math.inf
    took = 0.0
    for _ in range(sweeps):
        began = time.perf_counter()
        if began + took > deadline:
            break
        for j in range(n):
            g = BV[j] - diag[j] * V[j]
            ng = np.linalg.norm(g)
            if ng <= 0.0:
                continue
            new = -g / max(diag[j], ng)
            BV += np.outer(B[:, j], new - V[j])
            V[j] = new
        val = float(np.sum(BV * V))
        if prev - val <= 1e-8 * max(1.0, abs(val)):
            break
        prev = val
        took = time.perf_counter() - began
    g = BV - diag[:, None] * V
    return np.maximum(0.0, diag - np.linalg.norm(g, axis=1) / np.linalg.norm(V, axis=1))


def mask_diagonal(Q: np.ndarray, method: str, *, seed: int = 0, deadline: float = math.inf) -> np.ndarray:
    """``δ ≥ 0`` moved off the ``mask`` model's quadratic (``Q − diag(δ) ⪰ 0``).

    ``method="auto"``: the SDP diagonal if ``Σδ ≥ AUTO_MIN_SHARE · tr Q``, else zeros (an SDP
    that moves almost nothing only perturbs the model); other methods as :func:`max_diagonal`
    (``deadline`` bounds the mixing method there).
    """
    delta = max_diagonal(Q, "sdp" if method == "auto" else method, nonneg=True, seed=seed, deadline=deadline)
    if method == "auto" and delta.sum() < AUTO_MIN_SHARE * max(float(np.trace(Q)), 0.0):
        return np.zeros_like(delta)
    return delta


def max_diagonal(A: np.ndarray, method: str = "sdp", *, nonneg: bool = False, seed: int = 0,
                 deadline: float = math.inf) -> np.ndarray:
    """A diagonal ``δ`` with ``A − diag(δ) ⪰ 0`` (up to round-off) and ``Σδ`` large.

    Parameters
    ----------
    A : (n, n) symmetric PSD float64
    method : ``"sdp"`` (mixing-method SDP for max Σδ), ``"logdet"`` (:func:`logdet_diagonal`),
        ``"eig"`` (``λ_min(A)·1``) or ``"none"``
    nonneg : clamp δ ≥ 0 (the perspective formulation needs it)
    deadline : ``time.perf_counter()`` by which ``"logdet"`` stops its Newton steps and ``"sdp"``
        should return: the mixing sweeps stop
        early enough to leave the repair's eigenvalue problems (32 of them) their measured time
        (δ is then less good, never invalid), and none runs if not even that fits (δ = 0)

    Returns
    -------
    (n,) float64; ``A − diag(δ)`` has ``λ_min ≥ −1e-12·‖A‖`` after the final shift.
    """
    n = A.shape[0]
    if method == "none" or n == 0:
        return np.zeros(n)
    scale = max(float(np.abs(np.diag(A)).max()), 1e-300)
    began = time.perf_counter()
    lam_A = float(np.linalg.eigvalsh(A)[0])
    eig_seconds = time.perf_counter() - began
    if method == "eig":
        delta = np.full(n, lam_A)
    elif method == "logdet":
        delta = logdet_diagonal(A, deadline=deadline)
    elif method == "sdp" and time.perf_counter() + 34 * eig_seconds > deadline:
        delta = np.zeros(n)   # no time for a sweep and the repair: the valid diagonal 0
    elif method == "sdp":
        rank = max(2, min(n, int(math.ceil(math.sqrt(2 * n))) + 1))
        delta = _mixing_sdp(A, rank, sweeps=300, seed=seed, deadline=deadline - 32 * eig_seconds)
    else:
        raise ValueError(f"unknown diagonal method {method!r}")
    floor = min(lam_A, 0.0) - 1e-13 * scale  # A's own round-off
    if not nonneg:  # a uniform shift makes A − diag(δ) PSD to round-off
        lam = float(np.linalg.eigvalsh(A - np.diag(delta))[0])
        return delta - max(0.0, floor - lam + 1e-13 * scale) if lam < floor else delta
    delta = np.maximum(delta, 0.0)  # clamp, then shrink δ ← θδ (θ by bisection) back into the cone
    lo, hi = 0.0, 1.0
    if float(np.linalg.eigvalsh(A - np.diag(delta))[0]) >= floor:
        return delta
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if float(np.linalg.eigvalsh(A - mid * np.diag(delta))[0]) >= floor:
            lo = mid
        else:
            hi = mid
    return lo * delta


def logdet_diagonal(A: np.ndarray, tol: float = 1e-9, max_steps: int = 500, deadline: float = math.inf) -> np.ndarray:
    r"""``δ`` maximising ``Σ_i log δ_i`` subject to ``A − diag δ ⪰ 0`` (barrier method).

    The log spreads ``δ`` over every channel where ``max Σδ`` piles it on a few (for the
    perspective relaxation of ``reconstruct`` that is what gives it strength, see
    :mod:`.relax_perspective`). Central path: for ``t = 1, 0.1, …`` maximise the concave
    ``φ_t(δ) = Σ log δ_i + t·log det(A − diag δ)`` by damped Newton steps,

    .. math:: ∇φ_t = 1/δ − t·\operatorname{diag}(S^{-1}),\qquad
              −∇²φ_t = \operatorname{diag}(1/δ²) + t·S^{-1} ∘ S^{-1},\qquad S = A − \operatorname{diag} δ,

    with a backtracking line search that keeps ``S`` positive definite (Cholesky) and ``δ > 0``;
    stop when ``n·t < tol`` (the barrier's duality gap in ``Σ log δ``), or before a Newton step
    that the slowest one so far says would end past ``deadline`` (every iterate is feasible, so
    an early stop gives a valid, less spread δ).

    Parameters
    ----------
    A : (n, n) symmetric float64

    Returns
    -------
    (n,) float64, ``δ > 0`` with ``A − diag δ`` positive definite (every iterate is); zeros if
    ``A`` is not positive definite.
    """
    n = A.shape[0]
    A = 0.5 * (A + A.T)
    lam0 = float(np.linalg.eigvalsh(A)[0]) if n else 0.0
    if n == 0 or lam0 <= 1e-12 * max(float(np.abs(np.diag(A)).max()), 1e-300):
        return np.zeros(n)

    def phi(d: np.ndarray, t: float):
        if (d <= 0).any():
            return -math.inf, None
        try:
            L = np.linalg.cholesky(A - np.diag(d))
        except np.linalg.LinAlgError:
            return -math.inf, None
        return float(np.log(d).sum() + 2.0 * t * np.log(np.diag(L)).sum()), L

    delta, t, steps, took = np.full(n, 0.5 * lam0), 1.0, 0, 0.0
    val, L = phi(delta, t)
    while steps < max_steps:
        for _ in range(50):
            began = time.perf_counter()
            if began + took > deadline:
                return delta
            Li = np.linalg.inv(L)
            Sinv = Li.T @ Li
            g = 1.0 / delta - t * np.diag(Sinv)
            step = np.linalg.solve(np.diag(1.0 / delta ** 2) + t * Sinv * Sinv, g)
            dec = float(g @ step)                     # Newton decrement²
            steps += 1
            if dec < 1e-12:
                break
            a = 1.0
            while a > 1e-12:
                nv, nL = phi(delta + a * step, t)
                if nv >= val + 0.25 * a * dec:
                    delta, val, L = delta + a * step, nv, nL
                    break
                a *= 0.5
            else:
                break
            took = max(took, time.perf_counter() - began)
        if n * t < tol:
            break
        t *= 0.1
        val, L = phi(delta, t)
    return delta


def one_swap(Q: np.ndarray, kept: np.ndarray, group: np.ndarray, max_steps: int = 10_000,
             deadline: float = math.inf) -> np.ndarray:
    """Best-improvement 1-swap local search on ``pᵀQp`` (p = pruned = ~kept), swaps inside a group.

    Pruning kept ``i`` and keeping pruned ``j`` changes the value by
    ``Δ_ij = Q_ii + 2c_i + Q_jj − 2c_j − 2Q_ij`` with ``c = Qp``; the best ``Δ < 0`` is applied
    until none improves by more than round-off. Monotone, so never worse than ``kept``.

    Parameters
    ----------
    Q : (d, d) symmetric; kept : (d,) bool; group : (d,) int, the cardinality group of each entry
    max_steps, deadline : stop after this many swaps, or at ``time.perf_counter() ≥ deadline``

    Returns
    -------
    (d,) bool kept mask with the same count per group
    """
    kept = kept.copy()
    p = (~kept).astype(float)
    c = Q @ p
    dq = np.diag(Q)
    same = group[:, None] == group[None, :]
    for _ in range(max_steps):
        if time.perf_counter() >= deadline:
            break
        a = np.where(kept, dq + 2 * c, np.inf)        # cost of pruning i
        b = np.where(~kept, dq - 2 * c, np.inf)       # cost of keeping j
        D = a[:, None] + b[None, :] - 2 * Q
        D[~same] = np.inf
        i, j = np.unravel_index(int(np.argmin(D)), D.shape)
        if not D[i, j] < -1e-12 * max(float(p @ c), 1e-300):
            break
        kept[i], kept[j] = False, True
        p[i], p[j] = 1.0, 0.0
        c += Q[:, i] - Q[:, j]
    return kept


def warm_start(sp: LayerProblem, init: Optional[torch.Tensor]) -> np.ndarray:
    """Best of the Wanda rounding (|W̃| in the scaled problem) and ``init``, row by row where rows decouple.

    Returns (d_out, d_in) bool.
    """
    cands = [sp.round(sp.W.abs())]
    if init is not None:
        cands.append(init.to(torch.bool))
    if len(cands) == 1:
        return cands[0].numpy().copy()
    errs = torch.stack([sp.row_errors(c) for c in cands])  # (C, d_out)
    if sp.pattern.name in ("per-row", "nm"):
        best = errs.argmin(dim=0)
        out = torch.stack(cands)[best, torch.arange(sp.d_out)]
    else:
        out = cands[int(errs.sum(dim=1).argmin())]
    return out.numpy().copy()
