r"""``bnb``: branch-and-bound on convex relaxations, batched in torch (both objectives).

``mask``: the QCR relaxation below (:mod:`.mask_relax`). ``reconstruct``: the same search on
the perspective relaxation of the refit error (:mod:`.perspective`, which supplies the node
relaxation, exact scoring and polishing; steps 2–4 and 6 are shared: :mod:`.nodes`,
:mod:`.search`). The backend class, which splits a layer into blocks, is in :mod:`.solver`.

Rows decouple for ``per-row`` and ``nm``; ``columns`` is one block with
``Q = G̃ ⊙ W̃ᵀW̃``. Each block is ``min pᵀQp`` over pruned indicators ``p ∈ {0,1}ⁿ`` whose
groups — ``k`` consecutive runs of ``m`` entries, ``n = k·m`` (one group for per-row and
columns, ``d/M`` groups for N:M) — each prune ``c`` entries.

0. **Probing** (:func:`.mask_relax.probe_kept`): with the plain exact form ``‖Fᵀp‖²`` (``FFᵀ = Q``), one
   batch relaxes every child ``{p_i = 1}``; entries whose child cannot beat the start are kept
   for good and leave ``Q``. Outlier channels (activations 10–100× the rest) are such entries:
   they set ``Q``'s scale — the SDP's accuracy and the gradient steps — while the optimum lives
   orders of magnitude below it; without them the rest is solved at its own scale.
1. **Convex rewrite** (:mod:`.._qcr`) of the remaining principal block: ``f(p) = ‖Fᵀp‖² + lᵀp +
   const`` is convex on all of ``ℝⁿ`` and equals ``pᵀQp`` on every budget-feasible binary ``p``
   keeping the probed entries; the Shor SDP chooses it, so the root relaxation is at least the
   SDP bound (where the SDP cannot help, the plain diagonal form, see
   :func:`.._qcr.convex_form`).
2. **Node** ``S = {lo ≤ p ≤ hi, Σ_group p = c}`` (``lo = hi`` on fixed entries). Its
   relaxation ``min_S f`` is solved by accelerated projected gradient (FISTA with adaptive
   restart; ``∇f = Hx + l`` is affine, so the momentum point's gradient is the same
   combination of known gradients: one matrix product per iteration), batched over many nodes
   at once. The projection onto ``S`` is a per-group threshold: Newton steps from the previous
   iteration's threshold (:func:`.nodes.project_warm`), sorting where they do not land
   (:func:`.nodes.project_budgets`).
3. **Bound** (convexity): for any ``x ∈ S``,
   ``min_S f ≥ f(x) + min_{s∈S} ∇f(x)ᵀ(s − x)``, and ``S``'s vertices are binary (a box cut by
   disjoint cardinality constraints), so the minimising ``s`` picks, per group, the cheapest
   free entries. Valid at *any* iterate, however inaccurate: accuracy only tightens it.
4. **Reduced-cost fixing**: forcing a free entry against that ``s`` raises the linear bound by
   the gradient difference to the next entry of its group; where the raised bound reaches the
   incumbent, the entry is fixed.
5. **Node convexity shift** (``mask``): the rewrite only has to be convex on the directions a
   node can still move, ``V = {d : d_fixed = 0, Σ_group d = 0}``; fixing entries raises
   ``λ_min`` of the Hessian on ``V`` (interlacing). A node then minimises
   ``f + δ Σ_free (p − p²)`` with ``δ`` that ``λ_min`` (:func:`.mask_relax.node_convexity`): still exact on
   binaries, convex on the node, and above f on ``[0, 1]ⁿ`` — a tighter bound for free. ``δ`` is
   recomputed (one batched eigenvalue problem) once :data:`.search.SHIFT_EVERY` more entries are
   fixed, and inherited in between (a child's ``V`` is inside its parent's).
6. **Search**: best-first over batches of nodes; branching by pseudocosts (the average bound
   gain per unit of fractionality each entry gave so far, product rule), for ``mask`` started by
   strong branching at the root (:func:`.search.root_pseudocosts`: both children of every free
   entry, one batch; not for ``reconstruct``, see docs/DECISIONS.md);
   every relaxed point is rounded (largest entries per group) and scored exactly, and
   improvements are polished by 1-swap search (:func:`.._quadratic.one_swap`), as is the start
   (best of Wanda and ``init``).

The block is proved when every open node's bound reaches ``(1 − gap_tol/2)`` times the
incumbent; the returned bound is the least bound of the open and pruned nodes, less a
round-off margin and the clipped-eigenvalue correction of the factorisation.
"""
from .mask_relax import MaskBlock, mask_block, node_convexity, probe_kept
from .nodes import (BatchOutcome, Branching, Node, NodeSets, Relaxed, branch, checkpoint, linear_bound,
                    project_budgets, project_warm, prune_level)
from .perspective import PerspectiveBlock
from .search import Pseudocosts, root_pseudocosts, solve_block
from .solver import BranchAndBound

__all__ = ["BranchAndBound", "MaskBlock", "PerspectiveBlock", "NodeSets", "Node", "Branching", "Relaxed",
           "BatchOutcome", "Pseudocosts", "probe_kept", "mask_block", "prune_level", "project_budgets",
           "project_warm", "linear_bound", "checkpoint", "node_convexity", "branch", "root_pseudocosts",
           "solve_block"]
