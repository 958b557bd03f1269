r"""QCR: an exact convex rewrite of the ``mask`` row objective, chosen by the Shor SDP.

For pruned indicators ``p ∈ {0,1}ⁿ`` with group budgets ``Bᵀp = c`` (``B`` (n, k) the 0/1
group incidence, groups partitioning the entries), every ``μ ∈ ℝⁿ`` gives

.. math:: pᵀQp = pᵀ(Q − \mathrm{diag}\,μ)p + μᵀp \qquad (p_i^2 = p_i).

Write ``A = Q − diag μ``, ``Π = I − B(BᵀB)⁻¹Bᵀ`` (projector onto ``{x : Bᵀx = 0}``) and
``p₀ = B(BᵀB)⁻¹c``. Every ``p`` with ``Bᵀp = c`` — binary or not — is ``Πp + p₀``, so

.. math:: pᵀAp = pᵀ(ΠAΠ)p + 2(ΠAp₀)ᵀp + p₀ᵀAp₀ \quad\text{on the budget hyperplane.}

The right side is convex as soon as ``ΠAΠ ⪰ 0``: ``A`` only has to be PSD on the directions
that keep the budgets, not on all of ``ℝⁿ`` (Billionnet–Elloumi–Plateau's QCR with the
budget equalities; the multipliers of the budget *products* ``P1_g = c_g p`` drop out on the
hyperplane). A branch-and-bound whose every relaxation keeps ``Bᵀp = c`` (SCIP keeps linear
equalities in each LP) therefore sees an exact, visibly convex objective
``‖Fᵀp‖² + lᵀp + const`` with ``ΠAΠ = FFᵀ``, whatever ``μ``: the choice of ``μ`` only decides
the strength of the continuous relaxation. The best ``μ`` is the diagonal multiplier of the
facially reduced Shor SDP (:func:`._shor.shor_dual`): then the root relaxation is at least
the SDP bound (min over the box and the hyperplane of a function ``≥ s`` there). A solver's
inaccurate ``μ`` is repaired by the uniform shift ``μ ← μ − λ₋`` (``λ₋ = max(0, −λ_min(ΠAΠ))``
on the subspace), which keeps the rewrite exact and makes it convex.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._shor import predicted_sdp_seconds

#: conic solver tolerance for the multipliers (SCS ``eps`` = 100× this): they need not be
#: accurate, only good (the rewrite is exact for any μ). Measured on a real d=64 row: eps 1e-7
#: took 6.1 s, 1e-5 2.8 s with a root bound 0.02% lower, 1e-4 1.5 s and 0.13% lower. Whole
#: ``bnb`` solves of real q_proj rows (quiet machine): d=64 rows 0–3 in 4.8/2.9/3.2/11.0 s at
#: 3e-6 (SCS eps 3e-4) vs 7.6/4.5/5.3/17.7 s at 1e-7, with fewer nodes on three of the four;
#: d=128 row 0 gap 1.6% vs 2.2% after 60 s; SCIP d=48 rows 0–1 24.5/21.8 s vs 28.9/20.8 s.
SDP_TOL = 3e-6
#: Clarabel (accurate, O(n⁶) per iteration) first for the SDP up to this size, SCS first above
CLARABEL_MAX_N = 16

__all__ = ["QCRForm", "budget_projection", "build", "predicted_sdp_seconds", "qcr_form", "qcr_multipliers"]


@dataclass
class QCRForm:
    """``pᵀQp = ‖Fᵀp‖² + lᵀp + const`` on ``{Bᵀp = c}`` (up to ``neg·‖p‖²``, see ``neg``).

    F : (n, r); lin : (n,); const : float
    neg : ``FFᵀ`` may exceed ``ΠAΠ`` by this much (clipped round-off eigenvalues)
    sdp_bound : certified Shor bound ``s`` (weak duality) or None when no SDP was solved
    """

    F: np.ndarray
    lin: np.ndarray
    const: float
    neg: float
    sdp_bound: Optional[float]


def budget_projection(group: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Π, p₀)``: projector (n, n) onto ``{Bᵀx = 0}`` and the point ``p₀`` (n,) with
    ``Bᵀp₀ = c``, for groups ``group`` (n,) int and pruned counts ``count`` (k,)."""
    sizes = np.bincount(group, minlength=len(count)).astype(float)
    same = (group[:, None] == group[None, :]) / sizes[group][None, :]
    return np.eye(group.size) - same, (np.asarray(count, float) / sizes)[group]


def qcr_multipliers(Q: np.ndarray, group: np.ndarray, count: np.ndarray, params, deadline: float,
                    order: tuple) -> Optional[tuple[np.ndarray, float]]:
    """Shor SDP multipliers ``(μ, certified bound)`` of ``min pᵀQp`` over the budgets, or None.

    Q is normalised to unit max-diagonal for the conic solver; μ and the bound are mapped back.
    """
    from ._shor import reduction_basis, shor_certificate, shor_dual
    from ._relax import Block

    sigma = float(np.abs(np.diag(Q)).max())
    if sigma <= 0.0:
        return None
    block = Block(np.array([0]), False, group.size, group, np.bincount(group) - count)
    V = reduction_basis(block)
    sol = shor_dual(Q / sigma, V, params, deadline, order=order, tol=SDP_TOL)
    if sol is None:
        return None
    s, mu, _ = sol
    return sigma * mu, sigma * shor_certificate(Q / sigma, V, s, mu, 1.0 + float(np.sum(count)))


def qcr_form(Q: np.ndarray, group: np.ndarray, count: np.ndarray, mu: np.ndarray,
             rtol: float = 1e-12) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """The exact convex rewrite for multipliers ``μ`` (repaired to convexity if needed).

    Parameters
    ----------
    Q : (n, n) symmetric; group : (n,) int; count : (k,) pruned per group; mu : (n,)

    Returns
    -------
    F (n, r), lin (n,), const, neg — see :class:`QCRForm`; and the multipliers μ' (n,) used
    (``μ`` after the repair shift): on the hyperplane the form equals
    ``pᵀQp + Σ μ'_i (p_i − p_i²)`` exactly (up to ``neg``)
    """
    from ._quadratic import psd_factor

    Pi, p0 = budget_projection(group, count)
    A = Q - np.diag(mu)
    C = Pi @ A @ Pi
    lam = float(np.linalg.eigvalsh(0.5 * (C + C.T))[0])
    if lam < 0.0:  # shift μ uniformly: ΠAΠ gains −lam on the subspace, the rewrite stays exact
        mu = mu + lam * (1.0 + 1e-9)
        A = Q - np.diag(mu)
        C = Pi @ A @ Pi
    F, neg = psd_factor(C, rtol)
    lin = 2.0 * (Pi @ (A @ p0)) + mu
    return F, lin, float(p0 @ A @ p0), neg, mu


def build(Q: np.ndarray, group: np.ndarray, count: np.ndarray, params, deadline: float) -> Optional[QCRForm]:
    """:func:`qcr_multipliers` (Clarabel first up to :data:`CLARABEL_MAX_N` entries, SCS first
    above) then :func:`qcr_form`; None if the SDP could not be solved, or is not expected to
    finish before ``deadline`` (:func:`predicted_sdp_seconds`: the canonicalisation cannot be
    cut short, so a wide SDP would overrun the caller's time limit)."""
    if predicted_sdp_seconds(group.size) > deadline - time.perf_counter():
        return None
    order = ("CLARABEL", "SCS") if group.size <= CLARABEL_MAX_N else ("SCS", "CLARABEL")
    got = qcr_multipliers(Q, group, count, params, deadline, order)
    if got is None:  # (a solve cut short by the deadline still gives usable multipliers)
        return None
    mu, bound = got
    F, lin, const, neg, _ = qcr_form(Q, group, count, mu)
    return QCRForm(F, lin, const, neg, bound)


def convex_form(Qn: np.ndarray, group: Optional[np.ndarray], count: Optional[np.ndarray], diag: str, params,
                sdp_deadline: float) -> QCRForm:
    """The exact convex rewrite of ``pᵀQ_n p`` a ``mask`` model uses, by option ``diag``.

    ``"qcr"``, or ``"auto"`` where the mixing-method diagonal carries weight
    (:func:`._quadratic.mask_diagonal`): :func:`build` (the SDP until ``sdp_deadline``), if the
    budgets ``group``/``count`` are given and the SDP succeeds. Otherwise the diagonal form
    ``‖Fᵀp‖² + δᵀp`` with ``FFᵀ = Q_n − diag δ ⪰ 0`` (δ by ``diag``: ``auto``/``qcr`` → the SDP
    diagonal or zeros, ``none``, ``sdp``, ``eig``, ``logdet``), exact on binaries as ``p² = p``.
    On the near-singular synthetic rows the SDP moves almost nothing and only costs time. The
    mixing-method diagonal also stops by ``sdp_deadline`` (at n = 576 its 300 sweeps take ~20 s).
    """
    from ._quadratic import mask_diagonal, psd_factor

    delta = mask_diagonal(Qn, "auto" if diag == "qcr" else diag, seed=params.seed, deadline=sdp_deadline)
    if group is not None and (diag == "qcr" or (diag == "auto" and delta.any())):
        form = build(Qn, group, count, params, sdp_deadline)
        if form is not None:
            return form
    F, neg = psd_factor(Qn - np.diag(delta))
    return QCRForm(F, delta.copy(), 0.0, neg, None)
