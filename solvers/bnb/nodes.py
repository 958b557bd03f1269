r"""Node sets of the ``bnb`` search and the exact steps on them (both objectives).

A block has ``n = k·m`` pruned indicators ``p ∈ {0,1}ⁿ`` in ``k`` consecutive groups of ``m``
entries, each group pruning ``c`` of them. A node is the set

.. math:: S = \{lo ≤ p ≤ hi,\ Σ_{group} p = c\}

with binary ``lo``, ``hi`` (``lo = hi`` on fixed entries). Node batches are tensors of shape
``(B, n)``, viewed as ``(B, k, m)`` for the per-group steps.

* :func:`project_budgets`, :func:`project_warm`: Euclidean projection onto ``S`` (exact).
* :func:`linear_bound`: ``min_{s∈S} gᵀs`` and each free entry's reduced cost (``S``'s vertices
  are binary, so the minimiser takes the cheapest free entries of each group).
* :func:`checkpoint`: the convexity bound ``f(x) + min_{s∈S} ∇f(x)ᵀ(s − x)`` of a convex ``f``,
  valid at any ``x ∈ S``, and reduced-cost fixing against a threshold.
* :func:`branch`: both children of a node on one entry.
* :class:`Node`, :class:`Relaxed`, :class:`BatchOutcome`: the search's named state.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import NamedTuple, Optional

import torch

__all__ = ["project_budgets", "project_warm", "linear_bound", "checkpoint", "RowState", "branch", "prune_level",
           "NodeSets", "Branching", "Node", "Relaxed", "BatchOutcome", "NEWTON_STEPS"]

#: Newton steps of the warm-started projection before falling back to sorting
NEWTON_STEPS = 3


class Branching(NamedTuple):
    """How a node was made from its parent: the branched ``entry``, the direction ``up``
    (0: kept, 1: pruned) and the distance ``dist`` the entry moved from the parent's point."""

    entry: int
    up: int
    dist: float


class Node(NamedTuple):
    """An open node of the search, ordered on the heap by ``(bound, tie)``.

    bound : the parent's bound (a valid bound of the node); tie : unique insertion counter
    lo, hi : (n,) float64 binary bounds; x : (n,) the parent's relaxed point (warm start)
    branched : the branching that made the node, None at the root
    shift : the node's convexity shift ``δ`` (``mask``), shift_base : fixed entries when ``δ``
    was last computed
    """

    bound: float
    tie: int
    lo: torch.Tensor
    hi: torch.Tensor
    x: torch.Tensor
    branched: Optional[Branching]
    shift: float
    shift_base: int


class Relaxed(NamedTuple):
    """A relaxed batch: points x (B, n), best bounds lb (B,), node sets lo, hi (B, n) after
    reduced-cost fixing, and whether any entry was fixed (the points cut off that way are worth
    at least the threshold the batch ran against)."""

    x: torch.Tensor
    lb: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    fixed: bool


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


def prune_level(ub: float, gap_tol: float) -> float:
    """The bound at which a node is pruned: within half the gap tolerance of the incumbent ``ub``
    (so the block is proved at a relative gap below ``gap_tol``)."""
    return ub * (1.0 - 0.5 * gap_tol)


class RowState:
    """Base of a relaxation's iterate dataclass, every field one row per node still in the batch."""

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the rows where ``keep`` (B,) holds."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[keep])


class BatchOutcome:
    """A relaxation batch's results as nodes leave it: points, bounds and node sets of the whole
    batch, and whether reduced-cost fixing fixed anything (what a block's ``relax`` returns)."""

    def __init__(self, x: torch.Tensor, lb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        self.x, self.lb, self.lo, self.hi, self.fixed = x.clone(), lb.clone(), lo.clone(), hi.clone(), False

    def store(self, idx: torch.Tensor, x: torch.Tensor, lb: torch.Tensor, lo3: torch.Tensor, hi3: torch.Tensor,
              fixed: bool) -> None:
        """Record the nodes ``idx`` (rows of the batch) at a checkpoint."""
        self.x[idx], self.lb[idx] = x, lb
        self.lo[idx], self.hi[idx] = lo3.reshape(x.shape), hi3.reshape(x.shape)
        self.fixed |= fixed

    def result(self) -> Relaxed:
        return Relaxed(self.x, self.lb, self.lo, self.hi, self.fixed)


class NodeSets:
    """What both blocks share: ``k`` groups of ``m`` entries with ``c`` (a (k,) tensor) pruned
    per group; node points are (B, n) with ``n = k·m``.

    A block also provides ``relax(x, lo, hi, lb, thr, iters, deadline) -> Relaxed``,
    ``value(P) -> (B,)`` exact objectives of binary points and ``polish(p, group, deadline)``.
    """

    k: int
    m: int
    c: torch.Tensor
    #: whether the search starts with root strong branching (:func:`.search.root_pseudocosts`)
    strong_root: bool = False
    #: whether it takes per-node convexity shifts (``node_shift``; ``relax(..., shift=)``)
    node_shifts: bool = False
    #: the most nodes relaxed together in one batch of the search
    batch: int = 512

    def shape(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.k, self.m)

    def round(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Binary points of the node sets nearest each row of x (largest entries per group)."""
        _, s, _ = linear_bound(-self.shape(x), self.shape(lo), self.shape(hi), self.c)
        return s.reshape(x.shape)
