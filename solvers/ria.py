"""RIA, relative importance and activations (Zhang et al. 2024, "Plug-and-Play").

Score

.. math::
    S_{ij} = \\Big(\\frac{|W_{ij}|}{\\sum_{r} |W_{rj}|} + \\frac{|W_{ij}|}{\\sum_{c} |W_{ic}|}\\Big)
             \\cdot \\|X_j\\|_2^{a}, \\qquad a = 0.5 \\text{ (option ``a``)},

the first sum over the outputs feeding on input ``j`` (column sum), the second over the inputs
of row ``i`` (row sum); ``‖X_j‖₂ = sqrt(G_jj)``. A zero column or row sum (all its weights are
zero) contributes 0. Rounded with the pattern's exact top-k oracle. No weight update.
"""
from __future__ import annotations

import torch

from layerprune.problems import LayerProblem

from .base import Option, Params, Proposal, Solver
from ._baseline import accumulator, input_norms, score_proposal, working

__all__ = ["RIA", "ria_scores"]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (then ``num`` is 0 too)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def ria_scores(W: torch.Tensor, norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA scores.

    Parameters
    ----------
    W : (d_out, d_in) tensor
    norms : (d_in,) tensor, ``‖X_j‖₂``
    a : exponent of the activation norm

    Returns
    -------
    (d_out, d_in) tensor in ``W``'s dtype (sums accumulated in float32 or better).
    """
    A = W.abs()
    acc = accumulator(W.dtype)
    colsum = A.sum(dim=0, dtype=acc).to(W.dtype)  # (d_in,): over outputs, per input j
    rowsum = A.sum(dim=1, dtype=acc).to(W.dtype)  # (d_out,): over inputs, per row i
    rel = _safe_ratio(A, colsum[None, :]) + _safe_ratio(A, rowsum[:, None])
    return rel * norms[None, :].pow(a)


class RIA(Solver):
    """Keep the largest relative-importance scores times ``‖X_j‖^a`` (option ``a``, default 0.5)."""

    name = "ria"
    option_specs = (Option("a", float, 0.5, "exponent of the input-activation norm", low=0.0),)
    description = "RIA: (|W|/colsum + |W|/rowsum)·‖X_j‖^a (Zhang et al. 2024)"
    targets = frozenset({"mask", "reconstruct"})  # the mask ignores the objective

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        a = self.option("a")
        device, dtype = working(problem, params)
        W = problem.W.to(device=device, dtype=dtype)
        return score_proposal(problem, ria_scores(W, input_norms(problem, device, dtype), a), a=a)
