r"""ALPS (Meng, Behdin, Wang, Mazumder; NeurIPS 2024): ADMM with a support-driven ρ schedule.

Follows the authors' code (mazumder-lab/ALPS, ``alps.py``, ``ALPS_prune.ALPS_admm`` and its
defaults as ``llama.py`` calls it). The problem, for the weights ``W`` (d_out × d_in) and the
Gram ``G`` (rows of ``W`` are outputs here, columns in ALPS's code)::

    min_Ŵ  Σ_r (ŵ_r − w_r)ᵀ (G + δI) (ŵ_r − w_r)   s.t.  Ŵ fits the pattern,

i.e. ``‖XŴᵀ − XWᵀ‖² + δ‖Ŵ − W‖²`` with the ridge ``δ = ridge·mean(diag G)`` (ridge 0.01).
It is solved on the unit-diagonal form of the *damped* Gram (damped first, then scaled, as
ALPS does): ``H = D⁻¹(G + δI)D⁻¹``, ``W̃ = W·D``, ``D = diag(G + δI)^{1/2}``.

Splitting ``Ŵ`` into a dense ``W`` and a pattern-feasible copy ``Z`` with the scaled dual
``U`` (ALPS's ``V = ρU``), one iteration is

1. W-step ``W = (W̃H + ρ(Z − U))(H + ρI)⁻¹`` (:func:`~layerprune.solvers.admm.weight_step`);
2. Z-step ``Z = Π(W + U)``, ``Π`` the projection on the pattern: keep the largest ``|·|`` of
   each row (``per-row``), of each block of ``M`` inputs (``nm``), of the layer
   (``unstructured``); then ``U ← U + W − Z``
   (:func:`~layerprune.solvers.admm.dual_step`).

The ρ schedule (every ``update_every`` = 3 iterations; :func:`rho_update`): with ``c`` the
number of mask entries that flipped since the last check and ``k`` the kept count,
``c/k > 0.1`` → ``ρ ← 1.3ρ``; ``c/k > 0.005`` → ``ρ ← 1.2ρ``; ``c > 0`` → ``ρ ← 1.1ρ`` once ρ
has been raised, else ``ρ ← ρ/5`` and the iterates restart from the initial ``Z`` (ρ started
too large to move the support); ``c = 0`` → stop once ρ has been raised, else ``ρ ← ρ/5``.
``ρ ≤ 10⁶``; from ρ₀ = 0.1 the increases are geometric, so ``Σ 1/ρ_t < ∞`` (the authors'
convergence condition). The run also stops at iteration ≥ 31 when ``c/k < 3·10⁻⁴``, or at
``iterations`` (300). Raising ρ scales the dual, ``U ← U·ρ_old/ρ_new``.

Start (as ALPS): ``Z`` the projection of ``W̃`` (Wanda's score ``|W_ij|·‖X_j‖`` computed on the
damped Gram), ``U = 0``; or, given ``init`` or option ``init_solver``, ``W̃ ⊙ init``. The
returned mask is the projection of the final ``W`` (ALPS projects ``B``, its ``W``) with
weights ``W ⊙ M / D``; the solver contract then refits them on that support (``Params.refit``:
exact on small layers, else the batched Jacobi PCG of :mod:`problems.refit` from these weights:
ALPS's final ``cg_batch``, which runs on the damped normal equations, here the undamped ones).

Cost. Set-up: ``G + δI`` and its scaling ``O(d_in²)``, ``W̃H`` one GEMM ``2·d_out·d_in²``,
the eigendecomposition ``H = QΛQᵀ`` once, ``O(d_in³)`` in **float64** (ALPS does it in float64
on the CPU; here on the working device), then ``Q``, ``Λ`` in the working dtype. Per
iteration: the W-step GEMM ``2·d_out·d_in²`` flop; the projection (a selection of each row's k-th
largest, :func:`~layerprune.problems.patterns.topk_mask`, ``O(d_out·d_in)``
memory); the dual update ``O(d_out·d_in)``. Per change of ρ (at most every third iteration):
``(H + ρI)⁻¹ = Q diag(1/(Λ + ρ)) Qᵀ``, ``2·d_in³`` flop
(:func:`~layerprune.solvers.admm.shifted_inverse`). Working precision ``Params.dtype``
(float32 by default, as ALPS); memory about eight (d_out × d_in) arrays of that dtype (``W̃``,
``W̃H``, ``W``, ``Z``, ``U``, the start's ``Z`` and ``U``, a temporary) plus the masks, and
``Q``, ``(H + ρI)⁻¹``; ``H`` and its eigenvectors in float64 during the set-up only.

The ridge makes this a heuristic for the problem's undamped objective: no lower bound, status
``feasible``. A time limit or callback stops it between iterations (the eigendecomposition is
not interruptible).
"""
from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import torch

from layerprune.problems import LayerProblem

from .admm import dual_step, shifted_inverse, weight_step
from .base import Option, Params, Proposal, Solver, Status, stop_reason
from ._baseline import working

__all__ = ["ALPS", "RhoUpdate", "rho_update", "damped_scaling", "set_up", "settled_reason"]

#: relative support change above which ρ grows ×1.3, and ×1.2 (ALPS's thresholds)
FAST_CHANGE, SLOW_CHANGE = 0.1, 0.005
#: ρ growth factors for a large, a moderate and a small support change
GROWTH = (1.3, 1.2, 1.1)
#: ρ is divided by this when it started too large (the support did not move before any increase)
SHRINK = 5.0
#: ρ never exceeds this
RHO_MAX = 1e6
#: from this iteration on, a relative support change below SETTLED_CHANGE ends the run
SETTLE_AFTER, SETTLED_CHANGE = 30, 3e-4


class RhoUpdate(NamedTuple):
    """What one check of the support does: the new ρ, whether ρ has been raised so far, and
    ``"continue"``, ``"restart"`` (iterates back to the start) or ``"stop"``."""

    rho: float
    raised: bool
    action: str


def rho_update(rho: float, flips: int, kept: int, raised: bool) -> RhoUpdate:
    """ALPS's ρ rule for ``flips`` mask entries changed since the last check (``kept`` = k).

    ``flips/k > 0.1``: ×1.3; ``> 0.005``: ×1.2; ``flips > 0``: ×1.1 once raised, else ÷5 and
    restart; ``flips = 0``: stop once raised, else ÷5. ρ is capped at :data:`RHO_MAX`.
    """
    share = flips / max(kept, 1)
    if share > FAST_CHANGE:
        new, raised, action = rho * GROWTH[0], True, "continue"
    elif share > SLOW_CHANGE:
        new, raised, action = rho * GROWTH[1], True, "continue"
    elif flips > 0:
        new, action = (rho * GROWTH[2], "continue") if raised else (rho / SHRINK, "restart")
    else:
        new, action = (rho, "stop") if raised else (rho / SHRINK, "continue")
    return RhoUpdate(min(new, RHO_MAX), raised, action)


def damped_scaling(problem: LayerProblem, ridge: float) -> tuple[LayerProblem, torch.Tensor, float]:
    """ALPS's set-up: ``G + δI`` with ``δ = ridge·mean(diag G)``, then its unit-diagonal scaling.

    Returns
    -------
    (problem, d, δ): the problem with ``W̃ = W·D`` and ``H = D⁻¹(G + δI)D⁻¹`` (d_in × d_in),
    ``d = diag(D)`` (d_in,) float64, and ``δ``.
    """
    G = problem.G.to(torch.float64)
    delta = ridge * float(torch.diagonal(G).mean())
    damped = G + delta * torch.eye(problem.d_in, dtype=torch.float64, device=G.device)
    scaled, d = dataclasses.replace(problem, G=damped.to(problem.dtype)).scaled()
    return scaled, d, delta


class _Setup(NamedTuple):
    """The fixed data of a solve: the damped, scaled problem (for its projection), ``d``, ``δ``,
    ``W̃`` and ``W̃H`` (d_out, d_in), and ``H``'s eigenvalues (d_in,) and eigenvectors (d_in, d_in),
    all but ``d`` in the working dtype on the working device."""

    scaled: LayerProblem
    d: torch.Tensor
    delta: float
    W0: torch.Tensor
    B: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor


def set_up(problem: LayerProblem, ridge: float, device, dtype) -> _Setup:
    """:func:`damped_scaling`, ``W̃H`` and the one eigendecomposition of ``H`` (float64, as ALPS:
    its inverses span ρ from 10⁻¹ to 10⁶), then cast to ``dtype``."""
    scaled, d, delta = damped_scaling(problem, ridge)
    H64 = scaled.G.to(device=device, dtype=torch.float64)
    lam, Q = torch.linalg.eigh(H64)
    W0 = scaled.W.to(device=device, dtype=dtype)
    return _Setup(scaled, d.to(device), delta, W0, W0 @ H64.to(dtype), lam.to(dtype), Q.to(dtype))


def settled_reason(step: RhoUpdate, t: int, flips: int, kept: int):
    """Why the run ends after the check at iteration ``t`` (0-based), or None: ALPS's two stops."""
    if step.action == "stop":
        return "the support stopped changing"
    if t >= SETTLE_AFTER and flips / max(kept, 1) < SETTLED_CHANGE:
        return f"support change below {SETTLED_CHANGE:g} of the kept weights"
    return None


class _Iterates(NamedTuple):
    """Z (pattern-feasible copy), U (scaled dual), M (Z's mask): the ADMM state between W-steps."""

    Z: torch.Tensor
    U: torch.Tensor
    M: torch.Tensor


class ALPS(Solver):
    """ALPS: ADMM with a ρ schedule driven by the support change (reconstruct objective).

    Options
    -------
    iterations : int (default 300); update_every : int (default 3) — iterations between checks
    rho : float (default 0.1) — initial ρ; ridge : float (default 0.01, relative to mean diag G)
    init_solver : str (default ``"none"``: ALPS's own start, the projection of ``W·D``)
    """

    name = "alps"
    option_specs = (
        Option("iterations", int, 300, "ADMM iterations at most (Params.max_iter caps them)", low=1),
        Option("update_every", int, 3, "iterations between support checks (ρ updates)", low=1),
        Option("rho", float, 0.1, "initial ADMM penalty ρ", low=0.0, low_open=True),
        Option("ridge", float, 0.01, "ridge δ added to G, relative to its mean diagonal", low=0.0),
    )
    description = "ALPS: ADMM, ρ raised with the support change, refit on the final support"
    patterns = frozenset({"per-row", "nm", "unstructured"})
    objectives = frozenset({"reconstruct"})
    uses_init = True
    default_init = None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        deadline = params.deadline(time.perf_counter())
        iters = self.option("iterations")
        capped = params.max_iter is not None and params.max_iter < iters
        iters = params.max_iter if capped else iters
        every, rho = self.option("update_every"), self.option("rho")
        if init is None:
            init = self.start_mask(problem, params)
        device, dtype = working(problem, params)
        su = set_up(problem, self.option("ridge"), device, dtype)
        Ainv = shifted_inverse(su.eigvals, su.eigvecs, rho)
        M = su.scaled.round(su.W0.abs()) if init is None else init.to(device)
        start = _Iterates(su.W0 * M, torch.zeros_like(su.W0), M)
        state, checked = start, M
        raised, limit, settled, history = False, "iterations", None, []
        W, t = su.W0, 0
        for t in range(iters):
            W = weight_step(state.Z, state.U, su.B, Ainv, rho)
            V = W + state.U
            M = su.scaled.round(V.abs()).to(device)
            state = _Iterates(*dual_step(V, M), M)
            event = {"iteration": t + 1, "rho": rho, "primal_residual": float((W - state.Z).norm())}
            if (t + 1) % every == 0:
                flips = int((M ^ checked).sum())
                event["support_change"] = flips
                step = rho_update(rho, flips, problem.budget, raised)
                raised, checked = step.raised, M
                settled = settled_reason(step, t, flips, problem.budget)
                if step.action == "restart":
                    state = start
                elif step.rho != rho:
                    state = state._replace(U=state.U * (rho / step.rho))
                if step.rho != rho:
                    rho, Ainv = step.rho, shifted_inverse(su.eigvals, su.eigvecs, step.rho)
            history.append(event)
            if settled is not None:
                limit = None
                break
            stop = stop_reason(event, callback, deadline)
            if stop is not None:
                limit = stop
                break
        M = su.scaled.round(W.abs())
        weights = (W * M).to(torch.float64) / su.d[None, :]
        return Proposal(mask=M, weights=weights, status=Status.FEASIBLE, limit=limit,
                        iterations=t + 1, history=history,
                        info={"ridge": su.delta, "rho": rho, "rho_raised": raised,
                              "stopped": settled or limit})
