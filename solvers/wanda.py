"""Wanda (Sun et al. 2023): prune by weight times input-activation norm.

Score :math:`S_{ij} = |W_{ij}| \\cdot \\|X_j\\|_2 = |W_{ij}| \\sqrt{G_{jj}}`, rounded with the
pattern's exact top-k oracle: compared within each output row for ``per-row`` and ``nm`` (as
published), within the whole layer for ``unstructured``, summed per column for ``columns``.
It equals ``|W̃|`` of the unit-diagonal scaling (:meth:`LayerProblem.scaled`) and is the
optimum of the ``mask`` objective when ``G`` is diagonal. No weight update.
"""
from __future__ import annotations

import torch

from layerprune.problems import LayerProblem

from .base import Params, Proposal, Solver
from .magnitude import input_norms, score_proposal, working

__all__ = ["Wanda", "wanda_scores"]


def wanda_scores(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij|·‖X_j‖``. W: (d_out, d_in), norms: (d_in,). Returns (d_out, d_in)."""
    return W.abs() * norms[None, :]


class Wanda(Solver):
    """Keep the largest ``|W_ij|·‖X_j‖₂`` per row (per layer for unstructured)."""

    name = "wanda"
    description = "Wanda: |W|·‖X_j‖₂ per output row (Sun et al. 2023)"

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        device, dtype = working(problem, params)
        W = problem.W.to(device=device, dtype=dtype)
        return score_proposal(problem, wanda_scores(W, input_norms(problem, device, dtype)))
