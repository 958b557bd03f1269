"""Magnitude pruning: keep the largest ``|W_ij|`` (the data-free baseline).

The score ``|W|`` is rounded with the pattern's exact top-k oracle: within each row for
``per-row`` / ``nm``, within the layer for ``unstructured``, summed per column for
``columns``. No weight update: for ``reconstruct`` the solver contract's ``finalize`` refits
the kept weights exactly.
"""
from __future__ import annotations


from layerprune.problems import LayerProblem

from ._baseline import score_proposal, working
from .base import Params, Proposal, Solver

__all__ = ["Magnitude"]


class Magnitude(Solver):
    """Keep the weights of largest magnitude ``|W_ij|``, rounded with the pattern."""

    name = "magnitude"
    description = "magnitude pruning: keep the largest |W| (data-free baseline)"
    targets = frozenset({"mask", "reconstruct"})  # the mask ignores the objective

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        device, dtype = working(problem, params)
        scores = problem.W.to(device=device, dtype=dtype).abs()
        return score_proposal(problem, scores)
