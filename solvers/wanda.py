"""Wanda (Sun et al. 2023): prune by weight times input-activation norm.

Score :math:`S_{ij} = |W_{ij}| \\cdot \\|X_j\\|_2 = |W_{ij}| \\sqrt{G_{jj}}`, rounded with the
pattern's exact top-k oracle: compared within each output row for ``per-row`` and ``nm`` (as
published), within the whole layer for ``unstructured``, summed per column for ``columns``.
It equals ``|W̃|`` of the unit-diagonal scaling (:meth:`LayerProblem.scaled`) and is the
optimum of the ``mask`` objective when ``G`` is diagonal. No weight update.
"""
from __future__ import annotations


from layerprune.problems import LayerProblem

from ._baseline import input_norms, score_proposal, wanda_scores, working
from .base import Params, Proposal, Solver

__all__ = ["Wanda"]


class Wanda(Solver):
    """Keep the largest ``|W_ij|·‖X_j‖₂`` per row (per layer for unstructured)."""

    name = "wanda"
    description = "Wanda: |W|·‖X_j‖₂ per output row (Sun et al. 2023)"
    targets = frozenset({"mask", "reconstruct"})  # the mask ignores the objective

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        device, dtype = working(problem, params)
        W = problem.W.to(device=device, dtype=dtype)
        return score_proposal(problem, wanda_scores(W, input_norms(problem, device, dtype)))
