r"""``relax-sdp``: Shor SDP relaxation of the ``mask`` objective (cvxpy, small blocks).

For each block (pruned vector ``p ∈ {0,1}ⁿ``, quadratic form ``Q`` of the scaled problem, group
budgets ``1_gᵀp = c_g``) the facially reduced Shor SDP with squared budget constraints is solved
through its dual, and the bound is made safe by weak duality in float64 (:mod:`._shor`: the
lifting, the reduction and the certificate).

Blocks (see ``_relax``): per-row and N:M decouple row by row; columns is one block with
``Q = Σ_r Q_r``; unstructured is one joint block of size ``d_out·d_in`` (block-diagonal ``Q``).
Each block needs ``n ≤ max_n`` (option, default 128). Rounding: the primal ``p`` (the PSD
constraint's dual) rounded by the pattern's exact LMO, or Wanda, whichever scores better.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from layerprune.problems import LayerProblem

from ._relax import Block, blocks_for, make_proposal, run_blocks, scaled_arrays, scores_to_matrix
from ._shor import predicted_sdp_seconds, reduction_basis, shor_certificate, shor_dual
from .base import Option, Params, Proposal, Solver

__all__ = ["RelaxSDP", "block_Q"]

MAX_N = 128
CLARABEL_MAX_N = 40


def block_Q(block: Block, W: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Dense (n, n) quadratic form of a block: ``Q_r``, ``Σ_r Q_r`` (shared) or block-diagonal."""
    Qs = [np.outer(W[r], W[r]) * G for r in block.rows]
    if block.shared:
        return sum(Qs)
    if len(Qs) == 1:
        return Qs[0]
    import scipy.linalg as sl

    return sl.block_diag(*Qs)


def _solve_block(b, W, G, params, deadline, order_for) -> tuple[float, Optional[np.ndarray]]:
    """Certified Shor bound and relaxed point (pruned indicators) of one block."""
    Q = block_Q(b, W, G)
    sigma = float(np.diag(Q).max())
    if sigma <= 0.0:
        return 0.0, None
    Q = Q / sigma
    V = reduction_basis(b)
    # CLARABEL's dense PSD scaling costs O(n⁶) per iteration (48 s at n = 64, measured):
    # SCS first above CLARABEL_MAX_N; the certificate absorbs SCS's lower accuracy
    sol = shor_dual(Q, V, params, deadline, order=order_for(Q.shape[0]))
    if sol is None:
        return 0.0, None
    s, mu, p = sol
    trace = 1.0 + float(b.prune.sum())
    return sigma * shor_certificate(Q, V, s, mu, trace), (None if p is None else np.clip(p, 0.0, 1.0))


class RelaxSDP(Solver):
    """Shor SDP relaxation of the ``mask`` objective (facially reduced, certified dual bound)."""

    name = "relax-sdp"
    option_specs = (
        Option("max_n", int, MAX_N, "largest lifted dimension n it builds an SDP for", low=1),
        Option("clarabel_max_n", int, CLARABEL_MAX_N, "largest block solved by Clarabel first (SCS above)", low=0),
    )
    description = "Shor SDP relaxation of the mask objective with squared budget constraints (cvxpy)"
    requires = ("cvxpy",)
    objectives = frozenset({"mask"})
    certifies = True
    exact = False

    def _size_limit(self, problem: LayerProblem) -> Optional[str]:
        limit = self.option("max_n")
        n = problem.d_out * problem.d_in if problem.pattern.name == "unstructured" else problem.d_in
        if n > limit:
            return f"relax-sdp: lifted matrix of size {n + 1} exceeds the limit (max_n={limit})"
        return None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        start = time.perf_counter()
        deadline = params.deadline(start)
        W, G = scaled_arrays(problem)
        blocks = blocks_for(problem)
        order_for = lambda n: ("SCS", "CLARABEL") if n > self.option("clarabel_max_n") \
            else ("CLARABEL", "SCS")
        skipped = []

        def solve(b):  # an SDP predicted to outlast the time left is not started (bound 0)
            if predicted_sdp_seconds(b.n) > deadline - time.perf_counter():
                skipped.append(b)
                return 0.0, None
            return _solve_block(b, W, G, params, deadline, order_for)

        bound, ps, limit = run_blocks(blocks, solve, deadline, callback)
        limit = limit or ("time" if skipped else None)
        keep = 1.0 - scores_to_matrix(blocks, ps, problem.shape, fill=0.5)
        return make_proposal(problem, params, keep, bound, "Shor SDP dual (facially reduced), weak duality",
                             limit=limit, iterations=len(blocks))
