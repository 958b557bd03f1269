r"""ADMM weight update with a gradual mask (Boža 2024), for the ``reconstruct`` objective.

Splits ``min_V ‖(W₀ − V)X‖²  s.t. V ⊙ (1 − M) = 0`` into a dense ``W`` and a masked copy
``Z``, on the unit-diagonal problem (``G̃ = D⁻¹GD⁻¹``, ``W̃ = W·D``; the published details,
DESIGN.md §3):

- ridge ``δ = ridge·mean(diag G̃)`` (0.1), penalty ``ρ`` (1), one inverse
  ``A⁻¹ = (G̃ + (δ + ρ)I)⁻¹``; the target uses the *damped* Gram, ``B = W₀(G̃ + δI)``, so
  the ridge stabilises without shrinking the weights;
- iteration: ``Z = (W + U) ⊙ M``; ``U ← U + W − Z``; ``W = (B + ρ(Z − U))A⁻¹``;
- the mask is re-selected from ``|W + U|`` with the pattern's own rounding on a cubic
  schedule: pruned fraction ``s_t = s·(1 − (1 − (t+1)/T_m)³)`` for the first ``T_m`` (15) of
  ``T`` (20) iterations, then fixed. For ``nm`` (no intermediate N:M pattern exists) the
  final pattern is used from the first iteration.

The damping makes this a heuristic for the undamped objective: no lower bound. Its own
weights ``Z`` are returned; the solver contract then refits the mask exactly (DESIGN.md:
"an exact refit on the final support is cheap and helps") and records the ADMM weights'
error as ``info["own_weights_objective"]``.
"""
from __future__ import annotations

import time

import torch

from layerprune.problems import LayerProblem
from layerprune.problems.patterns import Columns, PerRow, Unstructured

from .base import Params, Proposal, Solver, SolverError, Status
from .magnitude import working

__all__ = ["ADMM", "schedule_fraction", "pattern_at", "admm_step"]


def schedule_fraction(t: int, final: float, mask_iters: int) -> float:
    """Cubic sparsity schedule ``s_t = s·(1 − (1 − (t+1)/T_m)³)``, equal to ``s`` from ``T_m − 1`` on."""
    x = min(1.0, (t + 1) / mask_iters)
    return final * (1.0 - (1.0 - x) ** 3)


def pattern_at(pattern, fraction: float, final: float):
    """The pattern of the same kind pruning ``fraction`` (itself once ``fraction ≥ final``, and for ``nm``)."""
    if fraction >= final:
        return pattern
    if isinstance(pattern, PerRow):
        return PerRow(fraction=fraction)
    if isinstance(pattern, Columns):
        return Columns(fraction=fraction)
    if isinstance(pattern, Unstructured):
        return Unstructured(fraction=fraction)
    return pattern


def pruned_fraction(problem: LayerProblem) -> float:
    """The final pruned fraction of the problem's pattern."""
    return 1.0 - problem.budget / float(problem.d_out * problem.d_in)


def admm_step(W, U, M, B, Ainv, rho):
    """One ADMM iteration for a fixed mask.

    Parameters
    ----------
    W, U : (d_out, d_in) dense iterate and scaled dual
    M : (d_out, d_in) bool mask
    B : (d_out, d_in) target ``W₀(G̃ + δI)``
    Ainv : (d_in, d_in) ``(G̃ + (δ+ρ)I)⁻¹``
    rho : penalty

    Returns
    -------
    W, U, Z : the updated iterates and the masked copy ``Z = (W + U) ⊙ M`` used
    """
    Z = (W + U) * M
    U = U + W - Z
    W = (B + rho * (Z - U)) @ Ainv
    return W, U, Z


class ADMM(Solver):
    """ADMM weight update with gradual mask selection (reconstruct objective).

    Options
    -------
    iterations : int (default 20); mask_iterations : int (default 15)
    rho : float (default 1.0); ridge : float (default 0.1, relative to mean diag of G̃)
    """

    name = "admm"
    description = "ADMM weight update with a gradual mask (Boža 2024), exact refit"
    objectives = frozenset({"reconstruct"})

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        deadline = params.deadline(time.perf_counter())
        iters = int(self.options.get("iterations", 20))
        mask_iters = int(self.options.get("mask_iterations", 15))
        rho = float(self.options.get("rho", 1.0))
        ridge = float(self.options.get("ridge", 0.1))
        capped = params.max_iter is not None and params.max_iter < iters
        if capped:
            iters = params.max_iter
        if iters < 1 or not 1 <= mask_iters or rho <= 0 or ridge < 0:
            raise SolverError("admm: need iterations ≥ 1, mask_iterations ≥ 1, rho > 0, ridge ≥ 0")
        device, dtype = working(problem, params)
        sp, dvec = problem.scaled()
        W0 = sp.W.to(device=device, dtype=dtype)
        G = sp.G.to(device=device, dtype=dtype)
        d_in = problem.d_in
        eye = torch.eye(d_in, dtype=dtype, device=device)
        delta = ridge * float(torch.diagonal(G).mean())
        Ainv = torch.linalg.inv(G + (delta + rho) * eye)
        B = W0 @ (G + delta * eye)
        final = pruned_fraction(problem)

        W, U = W0.clone(), torch.zeros_like(W0)
        M = problem.round(W0.abs()) if init is None else init.to(device)
        Z = W0 * M
        limit, history, t = ("iterations" if capped else None), [], 0
        for t in range(iters):
            if t < mask_iters and init is None:
                pat = pattern_at(problem.pattern, schedule_fraction(t, final, mask_iters), final)
                M = pat.round((W + U).abs())
            W, U, Z = admm_step(W, U, M, B, Ainv, rho)
            history.append({"iteration": t + 1, "primal_residual": float((W - Z).norm())})
            if callback is not None and callback(dict(history[-1])):
                limit = "interrupted"
                break
            if time.perf_counter() > deadline:
                limit = "time" if t + 1 < iters else None
                break
        if not problem.is_feasible(M):  # stopped before the schedule reached the final sparsity
            M = problem.round((W + U).abs())
            Z = (W + U) * M
        weights = (Z * M).to(torch.float64) / dvec.to(device)[None, :]
        return Proposal(mask=M, weights=weights, status=Status.FEASIBLE, limit=limit,
                        iterations=t + 1, history=history,
                        info={"ridge": delta, "rho": rho})
