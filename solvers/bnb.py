r"""``bnb``: branch-and-bound on convex relaxations, batched in torch (both objectives).

``mask``: the QCR relaxation below. ``reconstruct``: the same search on the perspective
relaxation of the refit error (:mod:`._bnb_perspective`, which supplies the node relaxation,
exact scoring and polishing; steps 3, 4 and 6 are shared).

Rows decouple for ``per-row`` and ``nm``; ``columns`` is one block with
``Q = G̃ ⊙ W̃ᵀW̃``. Each block is ``min pᵀQp`` over pruned indicators ``p ∈ {0,1}ⁿ`` whose
groups — ``k`` consecutive runs of ``m`` entries, ``n = k·m`` (one group for per-row and
columns, ``d/M`` groups for N:M) — each prune ``c`` entries.

0. **Probing** (:func:`probe_kept`): with the plain exact form ``‖Fᵀp‖²`` (``FFᵀ = Q``), one
   batch relaxes every child ``{p_i = 1}``; entries whose child cannot beat the start are kept
   for good and leave ``Q``. Outlier channels (activations 10–100× the rest) are such entries:
   they set ``Q``'s scale — the SDP's accuracy and the gradient steps — while the optimum lives
   orders of magnitude below it; without them the rest is solved at its own scale.
1. **Convex rewrite** (:mod:`._qcr`) of the remaining principal block: ``f(p) = ‖Fᵀp‖² + lᵀp +
   const`` is convex on all of ``ℝⁿ`` and equals ``pᵀQp`` on every budget-feasible binary ``p``
   keeping the probed entries; the Shor SDP chooses it, so the root relaxation is at least the
   SDP bound (where the SDP cannot help, the plain diagonal form, see
   :func:`._qcr.convex_form`).
2. **Node** ``S = {lo ≤ p ≤ hi, Σ_group p = c}`` (``lo = hi`` on fixed entries). Its
   relaxation ``min_S f`` is solved by accelerated projected gradient (FISTA with adaptive
   restart; ``∇f = Hx + l`` is affine, so the momentum point's gradient is the same
   combination of known gradients: one matrix product per iteration), batched over many nodes
   at once. The projection onto ``S`` is a per-group threshold: Newton steps from the previous
   iteration's threshold (:func:`project_warm`), sorting where they do not land
   (:func:`project_budgets`).
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
   ``f + δ Σ_free (p − p²)`` with ``δ`` that ``λ_min`` (:func:`node_convexity`): still exact on
   binaries, convex on the node, and above f on ``[0, 1]ⁿ`` — a tighter bound for free. ``δ`` is
   recomputed (one batched eigenvalue problem) once :data:`SHIFT_EVERY` more entries are
   fixed, and inherited in between (a child's ``V`` is inside its parent's).
6. **Search**: best-first over batches of nodes; branching by pseudocosts (the average bound
   gain per unit of fractionality each entry gave so far, product rule), for ``mask`` started by
   strong branching at the root (:func:`root_pseudocosts`: both children of every free entry,
   one batch; for ``reconstruct`` the measured effect was mixed, and a batch of 2n Cholesky
   factorisations of wide rows outlasts any time limit);
   every relaxed point is rounded (largest entries per group) and scored exactly, and
   improvements are polished by 1-swap search (:func:`._quadratic.one_swap`), as is the start
   (best of Wanda and ``init``).

The block is proved when every open node's bound reaches ``(1 − gap_tol/2)`` times the
incumbent; the returned bound is the least bound of the open and pruned nodes, less a
round-off margin and the clipped-eigenvalue correction of the factorisation.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Optional

import numpy as np
import torch

from layerprune.problems import LayerProblem

from . import _qcr
from ._quadratic import logdet_diagonal, one_swap, warm_start
from .base import Option, Params, Proposal, Solver, Status

__all__ = ["BranchAndBound", "NodeSets", "probe_kept", "prune_level", "project_budgets", "project_warm",
           "linear_bound", "checkpoint", "BatchOutcome", "compact", "node_convexity", "branch", "root_pseudocosts"]

#: nodes relaxed together in one batch
BATCH = 512
#: FISTA iterations per node visit (then the node is branched unless pruned)
ITERS = 60
#: Newton steps of the warm-started projection before falling back to sorting
NEWTON_STEPS = 3
#: FISTA iterations of the probing batch at the root (:func:`probe_kept`)
PROBE_ITERS = 200
#: recompute a node's convexity shift (:meth:`_Block.node_shift`) once this many entries were
#: fixed since its last computation (0: never). Real d_in = 128 per-row row 0, 60 s, before
#: root strong branching and the 64-node chunks: every 1 / 4 / 16 / 36 entries left gaps of
#: 1.25 / 0.73 / 0.49 / 0.55% (never: 0.63%); with both, every 8 and every 12 proved 3 of rows 0–3.
SHIFT_EVERY = 10
#: at most this share of a block's time goes to root strong branching (2n children; at
#: n = 128 they take ~0.4 s, but a whole-layer ``columns`` block can be far wider)
ROOT_SHARE = 0.1


# ---------------------------------------------------------------------- pure steps
def project_budgets(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean projection of each row of ``y`` onto ``{lo ≤ x ≤ hi, Σ_group x = c}``, exact.

    Parameters
    ----------
    y : (B, k, m) — k groups of m entries per node
    lo, hi : (B, k, m) binary bounds (``lo = hi`` on fixed entries), ``Σ lo ≤ c ≤ Σ hi``
    c : (k,) pruned count per group

    Returns
    -------
    x (B, k, m) and τ (B, k, 1) with ``x = clip(y − τ, lo, hi)``: on the free entries
    ``φ(t) = Σ clip(y_i − t, 0, 1)`` is decreasing and linear between the breakpoints
    ``{y_i, y_i − 1}``; with the free ``y`` sorted and prefix-summed, ``φ`` at every breakpoint
    costs one ``searchsorted``, and ``τ`` interpolates the segment where ``φ`` crosses the
    free budget ``r = c − Σ lo``.
    """
    m = y.shape[-1]
    free = hi > lo
    r = c.view(1, -1, 1).to(y.dtype) - lo.sum(dim=-1, keepdim=True)           # (B, k, 1)
    span = float((y.abs().amax() if y.numel() else torch.zeros(())).item()) + 4.0
    yf, _ = torch.sort(torch.where(free, y, torch.full_like(y, -3.0 * span)), dim=-1)
    csum = torch.cat([torch.zeros_like(yf[..., :1]), torch.cumsum(yf, dim=-1)], dim=-1)

    def phi(t):  # Σ over free entries of clip(y − t, 0, 1), t (B, k, q); fixed entries sit far below
        below_gt = torch.searchsorted(yf.contiguous(), t.contiguous(), right=True)       # #(y ≤ t)
        below_top = torch.searchsorted(yf.contiguous(), (t + 1.0).contiguous(), right=False)  # #(y < t+1)
        inside = torch.gather(csum, -1, below_top) - torch.gather(csum, -1, below_gt)
        return (m - below_top) + inside - t * (below_top - below_gt), below_top - below_gt

    bp, _ = torch.sort(torch.cat([yf, yf - 1.0], dim=-1), dim=-1)
    bp = torch.where(bp < -2.0 * span, torch.full_like(bp, -2.0 * span), bp)  # fixed entries' points
    val, _ = phi(bp)                                                          # decreasing along bp
    j = (val > r).sum(dim=-1, keepdim=True).clamp(max=bp.shape[-1] - 1)       # first bp with φ ≤ r
    tj = torch.gather(bp, -1, j)
    vj = torch.gather(val, -1, j)
    prev = torch.gather(bp, -1, (j - 1).clamp(min=0))
    _, slope = phi(0.5 * (prev + tj))
    tau = torch.where((vj < r) & (slope > 0), tj - (r - vj) / slope.clamp(min=1).to(y.dtype), tj)
    x = torch.minimum(torch.maximum(y - tau, lo), hi)
    return x, tau


def project_warm(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor, tau: torch.Tensor,
                 steps: int = NEWTON_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection of :func:`project_budgets`, from a threshold guess ``tau`` (B, k, 1).

    ``φ(t) = Σ_group clip(y − t, lo, hi)`` is piecewise linear and decreasing with slope
    ``−#{lo < y − t < hi}``; Newton steps ``t ← t + (φ(t) − c)/#{lo < y − t < hi}`` from the
    previous iteration's threshold land on the crossing in one or two steps when ``y`` moved
    little (exact once the segment is right). Nodes whose budget is still off by more than
    ``1e-9`` after ``steps`` steps are projected by the sort-based :func:`project_budgets`.
    """
    r = c.view(1, -1, 1).to(y.dtype)
    for step in range(steps + 1):
        v = y - tau
        x = torch.minimum(torch.maximum(v, lo), hi)
        off = x.sum(dim=-1, keepdim=True) - r
        if step == steps or not bool((off.abs() > 1e-9).any()):   # every budget met: done
            break
        slope = ((v > lo) & (v < hi)).sum(dim=-1, keepdim=True)
        tau = torch.where(slope > 0, tau + off / slope.clamp(min=1), tau)
    bad = (off.abs() > 1e-9).any(dim=-2).flatten()
    if bool(bad.any()):
        x, tau = x.clone(), tau.clone()
        x[bad], tau[bad] = project_budgets(y[bad], lo[bad], hi[bad], c)
    return x, tau


def linear_bound(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor):
    """``min_{s∈S} gᵀs`` and each free entry's reduced cost (raise of that minimum if forced
    the other way), for the node sets ``S = {lo ≤ s ≤ hi, Σ_group s = c}`` with binary lo, hi.

    Parameters
    ----------
    g, lo, hi : (B, k, m); c : (k,)

    Returns
    -------
    value (B,), s (B, k, m) the minimising vertex, reduced (B, k, m) (inf where the opposite
    value is infeasible, 0 on fixed entries)
    """
    free = hi > lo
    need = (c.view(1, -1, 1) - lo.sum(dim=-1, keepdim=True)).round().long()  # (B, k, 1) ones left
    gm = torch.where(free, g, torch.full_like(g, math.inf))
    order = torch.argsort(gm, dim=-1, stable=True)
    sorted_g = torch.gather(gm, -1, order)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(g.shape[-1], device=g.device).expand_as(order))
    chosen = free & (rank < need)
    s = lo + chosen.to(g.dtype)
    value = (g * s).sum(dim=(-2, -1))
    m = g.shape[-1]
    nxt = torch.gather(sorted_g, -1, need.clamp(max=m - 1))              # first free entry not chosen
    nxt = torch.where(need < free.sum(dim=-1, keepdim=True), nxt, torch.full_like(nxt, math.inf))
    last = torch.gather(sorted_g, -1, (need - 1).clamp(min=0))           # last chosen entry
    last = torch.where(need > 0, last, torch.full_like(last, -math.inf))
    reduced = torch.where(chosen, nxt - g, g - last)
    return value, s, torch.where(free, reduced, torch.zeros_like(reduced))


def checkpoint(f: torch.Tensor, g: torch.Tensor, x: torch.Tensor, lo3: torch.Tensor, hi3: torch.Tensor,
               c: torch.Tensor, margin: float, lb: torch.Tensor, thr: float):
    """The node bounds at points ``x`` (B, n) of convex ``f`` with gradients ``g`` (B, n), and
    reduced-cost fixing against the threshold ``thr``.

    ``bound = f(x) + min_{s∈S} ∇f(x)ᵀ(s − x) − margin`` (valid at any x by convexity); a free
    entry whose reduced cost lifts the bound to ``thr`` is fixed to its value in the minimising
    vertex (the points cut off that way are worth at least ``thr``).

    Returns (lb (B,) the best bound so far, lo3, hi3 (B, k, m) after fixing, whether any entry
    was fixed, keep (B,) bool: the nodes neither pruned (``lb ≥ thr``) nor converged).
    """
    val, s, red = linear_bound(g.view(lo3.shape), lo3, hi3, c)
    bound = f + val - (g * x).sum(-1) - margin
    lb = torch.maximum(lb, bound)
    keep = (lb < thr) & ((f - lb) > 1e-6 * abs(thr))
    fix = (bound.view(-1, 1, 1) + red >= thr) & (hi3 > lo3)
    if not bool(fix.any()):
        return lb, lo3, hi3, False, keep
    return lb, torch.where(fix, s, lo3), torch.where(fix, s, hi3), True, keep


def node_convexity(H2: torch.Tensor, free: torch.Tensor, k: int, m: int, s: float) -> torch.Tensor:
    """``λ_min`` of ``H2`` (n, n) on each node's directions ``V = {d : d_fixed = 0, Σ_group d = 0}``
    (``free`` (B, n) bool, ``k`` consecutive groups of ``m``), less a round-off margin, clipped
    at 0: (B,).

    On ``V`` the node minimises ``f + δ Σ_free (p − p²)`` (equal to f on binaries, above it on
    [0, 1]): convex while ``δ`` is at most this (interlacing: it grows as entries are fixed).
    With ``Π = D_free − S`` the orthogonal projector onto ``V`` (``S`` averages the free entries
    of each group) and ``s`` above ``λ_max(H2)``, ``M = ΠH2Π + s(I − Π)`` has
    ``λ_min(M) = min(s, λ_min on V)``; ``S`` acts by group sums, so ``M`` costs O(n²) per node.
    """
    B, n = free.shape
    f = free.to(H2.dtype)
    size = f.view(B, k, m).sum(-1, keepdim=True).clamp(min=1.0)                    # (B, k, 1)
    w = (f.view(B, k, m) / size).view(B, n)                                         # S = f wᵀ within groups

    def center(A):  # ΠA for A (B, n, n) with zero rows off the free entries
        means = (A.view(B, k, m, n) * w.view(B, k, m, 1)).sum(2, keepdim=True)     # (B, k, 1, n)
        return (A.view(B, k, m, n) - f.view(B, k, m, 1) * means).view(B, n, n)

    PHP = center(center(H2 * (f[:, :, None] * f[:, None, :])).mT)
    gid = torch.arange(n, device=H2.device) // m
    S = f[:, :, None] * w[:, None, :] * (gid[:, None] == gid[None, :]).to(H2.dtype) + torch.diag_embed(1.0 - f)
    lam = torch.linalg.eigvalsh(PHP + s * S)[:, 0]
    return (lam - 1e-9 * s).clamp(min=0.0)


class BatchOutcome:
    """A relaxation batch's results as nodes leave it: points, bounds and node sets of the whole
    batch, and whether reduced-cost fixing fixed anything (what :meth:`_Block.relax` returns)."""

    def __init__(self, x: torch.Tensor, lb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        self.x, self.lb, self.lo, self.hi, self.fixed = x.clone(), lb.clone(), lo.clone(), hi.clone(), False

    def store(self, idx: torch.Tensor, x: torch.Tensor, lb: torch.Tensor, lo3: torch.Tensor, hi3: torch.Tensor,
              fixed: bool) -> None:
        """Record the nodes ``idx`` (rows of the batch) at a checkpoint."""
        self.x[idx], self.lb[idx] = x, lb
        self.lo[idx], self.hi[idx] = lo3.reshape(x.shape), hi3.reshape(x.shape)
        self.fixed |= fixed

    def result(self) -> tuple:
        return self.x, self.lb, self.lo, self.hi, self.fixed


def compact(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple:
    """Each tensor's rows where ``keep`` (B,) holds: the nodes that stay in a relaxation batch."""
    return tuple(t[keep] for t in tensors)


class NodeSets:
    """What both blocks share: ``k`` groups of ``m`` entries with ``c`` (a (k,) tensor) pruned
    per group; node points are (B, n) with ``n = k·m``."""

    k: int
    m: int
    c: torch.Tensor
    #: whether the search starts with root strong branching (:func:`root_pseudocosts`)
    strong_root: bool = False

    def shape(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.k, self.m)

    def round(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Binary points of the node sets nearest each row of x (largest entries per group)."""
        _, s, _ = linear_bound(-self.shape(x), self.shape(lo), self.shape(hi), self.c)
        return s.reshape(x.shape)


class _Block(NodeSets):
    """One block's data in torch: the convex rewrite, groups and the exact quadratic."""

    strong_root = True

    def __init__(self, Q: np.ndarray, k: int, m: int, c: int, form, device):
        t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)
        self.Q, self.F, self.lin, self.const = Q, t(form.F), t(form.lin), float(form.const)
        self.k, self.m, self.c = k, m, torch.full((k,), float(c), dtype=torch.float64, device=device)
        self.H = 2.0 * (self.F @ self.F.T)                 # the Hessian of f, for the iterations
        self.scale = max(float(Q.sum()), 0.0)              # the all-pruned value
        lam_max = float(torch.linalg.eigvalsh(self.F.T @ self.F)[-1]) if self.F.shape[1] else 0.0
        self.step, self.lam_max = 1.0 / max(2.0 * lam_max, 1e-300), lam_max
        # round-off of the rewrite and of f, plus what clipping eigenvalues may have added
        self.margin = 1e-11 * (abs(self.const) + float(self.lin.abs().sum()) + lam_max * k * c) \
            + form.neg * k * c

    def f_and_grad(self, x: torch.Tensor):
        """f and ∇f of (B, n) points, f as ``‖Fᵀx‖² + lᵀx + const`` (convex to the last bit)."""
        y = x @ self.F
        return (y * y).sum(-1) + x @ self.lin + self.const, 2.0 * y @ self.F.T + self.lin

    def node_shift(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Per node (B,): the largest ``δ ≥ 0`` keeping ``f − δ Σ_free p²`` convex on the node
        (:func:`node_convexity` of ``H/2``)."""
        free, H2, s = hi > lo, 0.5 * self.H, 1.5 * self.lam_max
        # in chunks of 64 nodes: the (64, n, n) work arrays stay in cache (measured 2.5 → 0.8 ms
        # per node at n = 128, of which the eigenvalues take 0.6)
        return torch.cat([node_convexity(H2, part, self.k, self.m, s) for part in free.split(64)])

    def relax(self, x, lo, hi, lb, thr, iters, deadline=math.inf, shift=None):
        """FISTA on a batch of nodes; returns (x, lb, lo, hi, fixed) with lb the best bound seen
        and entries fixed by reduced costs (the binary points cut off that way are worth at least
        ``thr``; ``fixed`` says whether any were). Every 10 iterations the nodes already pruned
        (bound ≥ ``thr``) or converged leave the batch; past ``deadline`` the batch stops there.
        ``shift`` (B,): per-node ``δ`` of :meth:`node_shift`: the node minimises
        ``f + δ Σ_free (p − p²)`` (equal to f on binaries, convex on the node, above f on [0, 1])."""
        out = BatchOutcome(x, lb, lo, hi)
        idx = torch.arange(x.shape[0], device=x.device)
        lo3, hi3 = self.shape(lo), self.shape(hi)
        x, tau = project_budgets(self.shape(x), lo3, hi3, self.c)
        x = x.reshape(out.x.shape)
        ds = torch.zeros_like(x) if shift is None else shift[:, None] * (hi > lo).to(x.dtype)
        lin = self.lin + ds                                                # (B, n) per-node linear term
        # ∇ of the shifted f, Hv − 2δv + l, fused into one matrix product (as cheap as Hv + l)
        grad = lambda v: torch.addmm(torch.addcmul(lin, ds, v, value=-2.0), v, self.H)
        gx = grad(x)
        fx = 0.5 * (x * (gx + lin)).sum(-1)             # f − const, from the gradient
        z, gz = x, gx
        t = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        for it in range(iters):
            new, tau = project_warm(self.shape(z - self.step * gz), lo3, hi3, self.c, tau)
            new = new.reshape(x.shape)
            gnew = grad(new)
            fnew = 0.5 * (new * (gnew + lin)).sum(-1)
            worse = (fnew > fx).unsqueeze(1)                          # adaptive restart
            t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
            beta = torch.where(worse, torch.zeros_like(t), (t - 1.0) / t_next)
            z = new + beta * (new - x)                                # ∇f is affine: carry it along
            gz = gnew + beta * (gnew - gx)
            t = torch.where(worse, torch.ones_like(t), t_next)
            x, fx, gx = new, fnew, gnew
            if it % 10 == 9 or it == iters - 1 or time.perf_counter() > deadline:
                fe, ge = self.f_and_grad(x)                           # the bound from the exact form
                fe, ge = fe + (ds * (x - x * x)).sum(-1), ge + ds * (1.0 - 2.0 * x)
                lb, lo3, hi3, fx_any, keep = checkpoint(fe, ge, x, lo3, hi3, self.c, self.margin, lb, thr)
                out.store(idx, x, lb, lo3, hi3, fx_any)
                if not bool(keep.any()) or time.perf_counter() > deadline:
                    break
                if not bool(keep.all()):
                    idx, x, z, t, fx, lb, gx, gz, tau, lo3, hi3, ds, lin = compact(
                        keep, idx, x, z, t, fx, lb, gx, gz, tau, lo3, hi3, ds, lin)
        return out.result()

    def value(self, P: np.ndarray) -> np.ndarray:
        """Exact objective ``pᵀQp`` of binary points P (B, n) bool."""
        P = P.astype(np.float64)
        return ((P @ self.Q) * P).sum(axis=1)

    def polish(self, p: np.ndarray, group: np.ndarray, deadline: float = math.inf) -> np.ndarray:
        """1-swap local search from the pruned indicators p (n,) bool (fast: no deadline needed)."""
        return ~one_swap(self.Q, ~p, group)


class _Pseudocosts:
    """Average bound gain per unit of fractionality, per entry and direction (branching scores)."""

    def __init__(self, n: int):
        self.sum = np.zeros((2, n))
        self.cnt = np.zeros((2, n))

    def record(self, entry: np.ndarray, up: np.ndarray, gain: np.ndarray, dist: np.ndarray) -> None:
        """Record branchings (arrays of one length): entry, direction (0 down, 1 up), the bound
        gain over the parent and the distance the branched entry moved."""
        ok = (dist > 1e-9) & np.isfinite(gain)
        np.add.at(self.sum, (up[ok], entry[ok]), np.maximum(gain[ok], 0.0) / dist[ok])
        np.add.at(self.cnt, (up[ok], entry[ok]), 1.0)

    def choose(self, x: np.ndarray, free: np.ndarray) -> np.ndarray:
        """Per node (rows of x, free (B, n)): the free entry maximising
        ``max(ψ⁻·x, ε)·max(ψ⁺·(1 − x), ε)`` (product rule), entries never branched on taking the
        average pseudocost; where nothing is fractional, the first free entry. Returns (B,) int."""
        seen = self.cnt > 0
        avg = np.array([self.sum[u][seen[u]].sum() / max(seen[u].sum(), 1) for u in (0, 1)])
        psi = np.where(seen, self.sum / np.maximum(self.cnt, 1), np.where(avg > 0, avg, 1.0)[:, None])
        eps = 1e-6 * max(float(avg.max()), 1e-300)
        score = np.maximum(psi[0] * x, eps) * np.maximum(psi[1] * (1.0 - x), eps)
        frac = free & (x > 1e-9) & (x < 1 - 1e-9)
        entry = np.where(frac, score, -1.0).argmax(axis=1)
        none = ~frac.any(axis=1)
        entry[none] = free[none].argmax(axis=1)
        return entry


def prune_level(ub: float, gap_tol: float) -> float:
    """The bound at which a node is pruned: within half the gap tolerance of the incumbent ``ub``
    (so the block is proved at a relative gap below ``gap_tol``)."""
    return ub * (1.0 - 0.5 * gap_tol)


def probe_kept(blk: "_Block", start: np.ndarray, thr: float, deadline: float = math.inf) -> tuple[np.ndarray, float]:
    """Entries that every point worth less than ``thr`` keeps (probing, one batch).

    For each entry ``i`` the start (n,) bool keeps, the child node ``{p_i = 1}`` (pruned) is
    relaxed; where its bound reaches ``thr``, pruning ``i`` cannot beat ``thr`` and ``i`` is
    kept for good: it leaves the quadratic (``p_i = 0`` zeroes its row and column of ``Q``).
    The entries the start prunes are never probed, so the start stays feasible.

    Returns (kept (n,) bool, floor): floor is the least bound of the probed-out children
    (inf if none), a bound on every point removed.
    """
    n = start.size
    cand = np.flatnonzero(~start)
    kept = np.zeros(n, dtype=bool)
    if cand.size == 0 or not math.isfinite(thr):
        return kept, math.inf
    dev = blk.c.device
    lo = torch.zeros(cand.size, n, dtype=torch.float64, device=dev)
    lo[torch.arange(cand.size), torch.as_tensor(cand, device=dev)] = 1.0
    hi = torch.ones_like(lo)
    x = torch.as_tensor(start, dtype=torch.float64, device=dev).expand(cand.size, n).clone()
    lb = torch.full((cand.size,), -math.inf, dtype=torch.float64, device=dev)
    _, lb, _, _, _ = blk.relax(x, lo, hi, lb, thr, PROBE_ITERS, deadline)
    out = (lb >= thr).cpu().numpy()
    kept[cand[out]] = True
    return kept, float(lb[torch.as_tensor(out, device=dev)].min()) if out.any() else math.inf


def branch(lo: torch.Tensor, hi: torch.Tensor, entry: torch.Tensor, k: int, m: int, c: torch.Tensor):
    """Both children of nodes (lo, hi) (B, n) branching on ``entry`` (B,): down keeps it
    (``hi = 0``), up prunes it (``lo = 1``). Returns ((lo, hi) down, (lo, hi) up, fits (2, B)
    bool: whether each child can still meet its group budgets)."""
    rows = torch.arange(lo.shape[0], device=lo.device)
    keep_hi = hi.clone()
    keep_hi[rows, entry] = 0.0
    prune_lo = lo.clone()
    prune_lo[rows, entry] = 1.0
    gsum = lambda v: v.view(v.shape[0], k, m).sum(-1)
    fits = torch.stack([(gsum(keep_hi) >= c - 0.5).all(-1), (gsum(prune_lo) <= c + 0.5).all(-1)])
    return (lo, keep_hi), (prune_lo, hi), fits


def root_pseudocosts(blk, pc: "_Pseudocosts", x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, thr: float,
                     deadline: float, iters: int = PROBE_ITERS):
    """Strong branching at the root, to start the pseudocosts from measured gains.

    The root (x, lo, hi (n,)) is relaxed, then in one batch both children of every free entry
    (:func:`branch`); each child's bound gain over the root, per unit the entry moved, is
    recorded (gains capped at ``thr``, where the relaxation stops). Without it every entry
    starts from the average and the first branchings — those that shape the whole tree — are
    blind: on real d_in = 128 rows the gap left after 60 s fell from 0.63–1.35% to 0.20–0.91%.

    Returns the relaxed root (x, lb, lo, hi, fixed) as :meth:`_Block.relax` does, and the
    number of children relaxed.
    """
    lb = torch.full((1,), -math.inf, dtype=x.dtype, device=x.device)
    root = blk.relax(x[None], lo[None], hi[None], lb, thr, iters, deadline)
    xr, lbr, lor, hir, _ = root
    free = torch.nonzero(hir[0] > lor[0]).flatten()
    if free.numel() == 0 or not math.isfinite(float(lbr[0])) or float(lbr[0]) >= thr:
        return root, 0
    nf = free.numel()
    down, up, fits = branch(lor.expand(nf, -1), hir.expand(nf, -1), free, blk.k, blk.m, blk.c)
    ok = fits.flatten()
    clo, chi = torch.cat([down[0], up[0]])[ok], torch.cat([down[1], up[1]])[ok]
    _, lbc, _, _, _ = blk.relax(xr.expand(clo.shape[0], -1), clo, chi, lbr.expand(clo.shape[0]).clone(),
                                thr, iters, deadline)
    xe = xr[0, free].cpu().numpy()
    entry, direction = np.tile(free.cpu().numpy(), 2), np.repeat([0, 1], nf)
    dist = np.concatenate([xe, 1.0 - xe])
    ok = ok.cpu().numpy()
    gain = np.minimum(lbc.cpu().numpy(), thr) - float(lbr[0])
    pc.record(entry[ok], direction[ok], gain, dist[ok])
    return root, int(ok.sum())


def _solve_block(blk: _Block, start: np.ndarray, ub: float, group: np.ndarray, deadline: float, gap_tol: float,
                 device, max_nodes: Optional[int], kept: Optional[np.ndarray] = None, floor: float = math.inf):
    """Best-first branch-and-bound of one block. ``start``: (n,) bool pruned indicators, worth ``ub``;
    ``kept`` (n,) bool: entries fixed kept at the root, every point with one of them pruned
    being worth at least ``floor``.

    Returns (pruned (n,) bool, bound, proved, nodes)."""
    n = start.size
    best = start.copy()
    counter = itertools.count()
    pc = _Pseudocosts(n)
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    ones = torch.ones(n, dtype=torch.float64, device=device)
    if kept is not None:
        ones[torch.as_tensor(kept, device=device)] = 0.0
    x0 = torch.as_tensor(best, dtype=torch.float64, device=device)
    pruned_min, nodes, root = floor, 0, (-math.inf, zeros, ones, x0)
    if blk.strong_root:
        root_deadline = time.perf_counter() + ROOT_SHARE * (deadline - time.perf_counter())
        (x0, lb0, lo0, hi0, fixed), nodes = root_pseudocosts(blk, pc, x0, zeros, ones, prune_level(ub, gap_tol),
                                                             root_deadline)
        if fixed:
            pruned_min = min(pruned_min, prune_level(ub, gap_tol))
        nodes += 1
        root = (float(lb0[0]), lo0[0], hi0[0], x0[0])
    # heap items: (bound, tie, lo, hi, x, (branched entry, direction, distance) or None,
    #              convexity shift δ, fixed entries when δ was computed)
    heap = [(root[0], next(counter), *root[1:], None, 0.0, 0)]
    shifts = hasattr(blk, "node_shift") and SHIFT_EVERY > 0

    def thr():
        return prune_level(ub, gap_tol)

    while heap and time.perf_counter() < deadline and (max_nodes is None or nodes < max_nodes):
        batch = []
        while heap and len(batch) < BATCH:
            item = heapq.heappop(heap)
            if item[0] >= thr():
                pruned_min = min(pruned_min, item[0])
                continue
            batch.append(item)
        if not batch:
            break
        nodes += len(batch)
        parent_lb = [b[0] for b in batch]
        lb = torch.tensor(parent_lb, dtype=torch.float64, device=device)
        lo = torch.stack([b[2] for b in batch])
        hi = torch.stack([b[3] for b in batch])
        x = torch.stack([b[4] for b in batch])
        level = thr()
        shift = torch.tensor([b[6] for b in batch], dtype=torch.float64, device=device)
        base = torch.tensor([b[7] for b in batch], device=device)
        x, lb, lo, hi, fixed = blk.relax(x, lo, hi, lb, level, ITERS, deadline, **({"shift": shift} if shifts else {}))
        if fixed:  # points removed by reduced-cost fixing are worth at least ``level``
            pruned_min = min(pruned_min, level)
        cand = blk.round(x, lo, hi).cpu().numpy() > 0.5
        vals = blk.value(cand)
        i = int(np.argmin(vals))
        if vals[i] < ub * (1 - 1e-12):
            p = blk.polish(cand[i], group, time.perf_counter() + 0.1 * max(deadline - time.perf_counter(), 0.0))
            best, ub = p, float(blk.value(p[None])[0])
        lbs = lb.cpu().numpy()
        xs, free = x.cpu().numpy(), (hi > lo).cpu().numpy()
        child = [j for j, b in enumerate(batch) if b[5] is not None and math.isfinite(parent_lb[j])]
        if child:  # the bound gains of the branchings that made these nodes
            e, up, dist = (np.array(v) for v in zip(*(batch[j][5] for j in child)))
            pc.record(e.astype(int), up.astype(int), np.minimum(lbs[child], ub) - np.asarray(parent_lb)[child], dist)
        level = thr()
        pruned = lbs >= level
        if pruned.any():
            pruned_min = min(pruned_min, float(lbs[pruned].min()))
        for j in np.flatnonzero(~pruned & ~free.any(axis=1)):  # every entry fixed: a leaf, scored exactly
            p = lo[j].cpu().numpy() > 0.5
            v = float(blk.value(p[None])[0])
            if v < ub:
                best, ub = p, v
            pruned_min = min(pruned_min, v)
        go = np.flatnonzero(~pruned & free.any(axis=1))
        if go.size:
            if shifts:  # the children's convexity shift, on the parent's (larger) free set
                G = torch.as_tensor(go, device=device)
                nfix = (hi[G] <= lo[G]).sum(1)
                redo = nfix + 1 - base[G] >= SHIFT_EVERY
                if bool(redo.any()):
                    R = G[redo]
                    shift[R] = torch.maximum(shift[R], blk.node_shift(lo[R], hi[R]))
                    base[R] = nfix[redo]
            shift_l, base_l = shift.tolist(), base.tolist()
            entry = pc.choose(xs[go], free[go])
            *children, fits = branch(lo[go], hi[go], torch.as_tensor(entry, device=device), blk.k, blk.m, blk.c)
            fits = fits.cpu().numpy()
            for a, j in enumerate(go):
                e = int(entry[a])
                for up in (0, 1):
                    if fits[up][a]:
                        dist = (1.0 - xs[j][e]) if up else xs[j][e]
                        clo, chi = children[up]
                        heapq.heappush(heap, (float(lbs[j]), next(counter), clo[a], chi[a], x[j], (e, up, dist),
                                              shift_l[j], base_l[j]))
    open_min = min((item[0] for item in heap), default=math.inf)
    bound = min(open_min, pruned_min, ub)
    proved = not heap or open_min >= thr()
    return best, max(bound, 0.0), proved, nodes


class BranchAndBound(Solver):
    """Batched best-first branch-and-bound on the QCR (``mask``) or perspective
    (``reconstruct``) relaxation (see the module docstring).

    Options
    -------
    max_nodes : int, node limit per block (default: none; the time limit governs)
    polish : bool, default True: 1-swap local search on the start (on the exact objective)
    """

    name = "bnb"
    description = ("branch-and-bound in torch on the SDP-chosen (QCR) relaxation (mask) or the perspective "
                   "relaxation (reconstruct); certified")
    requires = ("cvxpy",)
    patterns = frozenset({"per-row", "nm", "columns"})
    objectives = frozenset({"mask", "reconstruct"})
    option_specs = (
        Option("max_nodes", int, None, "node limit per block (default: none; the time limit governs)", low=1),
        Option("polish", bool, True, "1-swap local search on the start (on the exact objective)"),
    )
    certifies = True
    exact = True
    uses_init = True

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        # the tensors are small (BATCH × n, n ≤ 128): on a CPU one thread is ~8× faster than two
        # (measured 0.1 vs 0.8 ms per gradient of a 64 × 32 batch on 2 cores under load)
        threads = torch.get_num_threads()
        device = torch.device(params.device) if params.device else problem.device
        if device.type == "cpu":
            torch.set_num_threads(int(params.threads or 1))
        try:
            return self._solve_blocks(problem, params, init, callback, device)
        finally:
            torch.set_num_threads(threads)

    def _solve_blocks(self, problem, params, init, callback, device) -> Proposal:
        start_time = time.perf_counter()
        deadline = params.deadline(start_time)
        sp, _ = problem.to("cpu", torch.float64).scaled()
        W, G = sp.W.numpy(), sp.G.numpy()
        kept = warm_start(sp, None if init is None else init.cpu())
        recon = sp.objective_kind == "reconstruct"
        pat = sp.pattern
        d = sp.d_in
        delta = logdet_diagonal(G) if recon else None     # zeros if G̃ is singular (monotone bound)
        if pat.name == "columns":
            blocks = [(None, W if recon else G * (W.T @ W), 1, d, d - pat.bind(sp.d_out, d).keep, kept[0])]
        else:
            k, m = (d // pat.m, pat.m) if pat.name == "nm" else (1, d)
            c = m - (pat.n if pat.name == "nm" else pat.keep)
            blocks = [(r, W[r:r + 1] if recon else W[r][:, None] * G * W[r][None, :], k, m, c, kept[r])
                      for r in range(sp.d_out)]
        mask = kept.copy()
        bounds, proved, nodes, limit, qcr_blocks, probed = [], [], 0, None, 0, 0
        for i, (r, data, k, m, c, kr) in enumerate(blocks):
            left = deadline - time.perf_counter()
            if left <= 0.01:
                limit = "time"
                bounds.append(0.0)
                proved.append(False)
                continue
            block_deadline = time.perf_counter() + (left / (len(blocks) - i) if math.isfinite(left) else math.inf)
            group = np.arange(k * m) // m
            if recon:
                from ._bnb_perspective import PerspectiveBlock

                blk, qcr = PerspectiveBlock(data, G, delta, k, m, c, device), False
            else:  # the exact form of Q itself first: enough to polish and probe
                blk, qcr = self._mask_block(data, k, m, c, group, params, block_deadline, device, None)
            p = ~kr
            if self.option("polish"):  # at most a fifth of the block's time
                p = blk.polish(p, group, time.perf_counter() + 0.2 * (block_deadline - time.perf_counter()))
            value = float(blk.value(p[None])[0])
            if value <= 1e-13 * blk.scale:
                bounds.append(value)                                  # nothing to gain: optimal
                proved.append(True)
                mask[r if r is not None else slice(None)] = ~p
                continue
            fixed_kept, floor = None, math.inf
            if not recon:  # probing: entries too costly to prune leave Q, then the SDP-chosen form
                fixed_kept, floor = probe_kept(blk, p, prune_level(value, params.gap_tol), block_deadline)
                blk, qcr = self._mask_block(data, k, m, c, group, params, block_deadline, device, fixed_kept)
                probed += int(fixed_kept.sum())
            qcr_blocks += qcr
            best, bound, ok, cnt = _solve_block(blk, p, value, group, block_deadline, params.gap_tol, device,
                                                self.option("max_nodes"), fixed_kept, floor)
            nodes += cnt
            mask[r if r is not None else slice(None)] = ~best
            bounds.append(bound)
            proved.append(ok)
            if not ok and limit is None:
                limit = "time" if time.perf_counter() >= block_deadline else "node"
            if callback is not None and callback({"iteration": i, "row": r, "bound": float(sum(bounds))}):
                limit = "interrupted"
                break
        done = len(bounds) == len(blocks) and all(proved)
        source = "QCR branch-and-bound (Frank–Wolfe bounds, exact rewrite)"
        if recon:
            source = ("perspective branch-and-bound (logdet diagonal, Frank–Wolfe bounds)" if delta.any()
                      else "monotone branch-and-bound (G singular: no perspective split)")
        return Proposal(mask=torch.from_numpy(np.ascontiguousarray(mask)).to(problem.device),
                        lower_bound=float(sum(bounds)), bound_source=source,
                        status=Status.OPTIMAL if done else Status.FEASIBLE, limit=None if done else (limit or "time"),
                        iterations=nodes, info={"nodes": nodes, "blocks_proved": int(sum(proved)),
                                                "qcr_blocks": qcr_blocks, "probed_kept": probed})

    @staticmethod
    def _mask_block(Q, k, m, c, group, params, deadline, device, kept):
        """The ``mask`` block of ``pᵀQp`` and whether it uses QCR (else a diagonal form).

        ``kept`` None: the plain exact form ``‖Fᵀp‖²``, ``FFᵀ = Q`` (no SDP). Else (n,) bool,
        entries fixed kept: the form of :func:`._qcr.convex_form` on the others' principal
        block ``Q_R``, padded with zeros — exact wherever the kept entries are 0, which every
        node keeps them at (the SDP sees only the entries still in play, at their own scale).
        """
        n = Q.shape[0]
        R = np.arange(n) if kept is None else np.flatnonzero(~kept)
        QR = Q[np.ix_(R, R)]
        sigma = float(np.abs(np.diag(QR)).max()) if R.size else 0.0
        if sigma <= 0.0:
            form = _qcr.QCRForm(np.zeros((R.size, 0)), np.zeros(R.size), 0.0, 0.0, None)
        else:
            sdp_deadline = time.perf_counter() + 0.5 * (deadline - time.perf_counter())   # half the time left
            form = _qcr.convex_form(QR / sigma, None if kept is None else group[R], np.full(k, c),
                                    "none" if kept is None else "auto", params, sdp_deadline)
        F = np.zeros((n, form.F.shape[1]))
        F[R] = form.F * math.sqrt(max(sigma, 0.0))
        lin = np.zeros(n)
        lin[R] = form.lin * sigma
        padded = _qcr.QCRForm(F, lin, form.const * sigma, form.neg * sigma, form.sdp_bound)
        return _Block(Q, k, m, c, padded, device), form.sdp_bound is not None
