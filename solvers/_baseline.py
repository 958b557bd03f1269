"""Helpers shared by the torch baselines: working precision, input norms, score rounding.

``magnitude``, ``wanda``, ``ria``, ``sparsegpt``, ``sparseswaps``, ``sparsefw`` and ``admm``
use them; no backend imports another backend for them.
"""
from __future__ import annotations

import torch

from layerprune.problems import LayerProblem

from .base import Params, Proposal, Status

__all__ = ["working", "accumulator", "input_norms", "score_proposal", "wanda_scores"]


def working(problem: LayerProblem, params: Params) -> tuple[torch.device, torch.dtype]:
    """Device and working dtype of a torch baseline.

    The device is ``params.device`` or the problem's; the dtype is ``params.dtype`` when it is
    a floating type of at least float32, else float32 (half types would lose the ranking).
    """
    device = torch.device(params.device) if params.device is not None else problem.device
    dtype = params.dtype if params.dtype in (torch.float32, torch.float64) else torch.float32
    return device, dtype


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for sums: float64 if working in float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def input_norms(problem: LayerProblem, device, dtype) -> torch.Tensor:
    """``‖X_j‖₂ = sqrt(G_jj)`` for every input ``j``. Returns (d_in,) tensor (0 for dead inputs)."""
    diag = torch.diagonal(problem.G).to(device=device, dtype=accumulator(dtype))
    return diag.clamp_min(0.0).sqrt().to(dtype)


def score_proposal(problem: LayerProblem, scores: torch.Tensor, **info) -> Proposal:
    """Round ``scores`` (d_out, d_in; higher = keep) with the pattern: one feasible mask.

    No lower bound (a heuristic), status FEASIBLE, one iteration.
    """
    mask = problem.pattern.round(scores)  # exact top-k per group, ties to the lower index
    return Proposal(mask=mask, status=Status.FEASIBLE, limit=None, iterations=1, info=dict(info))


def wanda_scores(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij|·‖X_j‖``. W: (d_out, d_in), norms: (d_in,). Returns (d_out, d_in)."""
    return W.abs() * norms[None, :]
