r"""The best-first search of ``bnb`` over one block (either objective's block, see :mod:`.nodes`).

Open nodes (:class:`.nodes.Node`) sit on a heap ordered by their parent's bound. Each round pops
up to :data:`BATCH` nodes below the prune level, relaxes them together (``blk.relax``: bounds,
reduced-cost fixing), rounds every relaxed point (largest entries per group) and scores it
exactly, polishes an improved incumbent, records the bound gains of the branchings that made
the nodes (:class:`Pseudocosts`), and branches every node neither pruned nor a leaf on the
free entry of largest pseudocost product. For ``mask`` blocks the pseudocosts are started by
strong branching at the root (:func:`root_pseudocosts`), and a node's convexity shift is
recomputed once :data:`SHIFT_EVERY` more entries are fixed (inherited in between: a child's
directions are a subspace of its parent's).

The block is proved when every open node's bound reaches ``(1 − gap_tol/2)`` times the
incumbent (:func:`.nodes.prune_level`); the returned bound is the least bound of the open and
pruned nodes.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from ..base import share_of_time_left
from .mask_relax import PROBE_ITERS
from .nodes import Branching, Node, Relaxed, branch, prune_level

__all__ = ["Pseudocosts", "root_pseudocosts", "solve_block", "BlockOutcome", "BATCH", "ITERS", "SHIFT_EVERY",
           "ROOT_SHARE"]

#: nodes relaxed together in one batch (at most; a block may ask for fewer, ``blk.batch``)
BATCH = 512
#: FISTA iterations per node visit (then the node is branched unless pruned)
ITERS = 60
#: recompute a node's convexity shift (:meth:`.mask_relax.MaskBlock.node_shift`) once this many
#: entries were fixed since its last computation (0: never); measurements in docs/DECISIONS.md
SHIFT_EVERY = 10
#: at most this share of a block's time goes to root strong branching (2n children; at
#: n = 128 they take ~0.4 s, but a whole-layer ``columns`` block can be far wider)
ROOT_SHARE = 0.1
#: seconds between two ``trace`` calls of a search that finds no better incumbent
TRACE_EVERY = 0.25


class Pseudocosts:
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


def root_pseudocosts(blk, pc: Pseudocosts, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, thr: float,
                     deadline: float, iters: int = PROBE_ITERS) -> tuple[Relaxed, int]:
    """Strong branching at the root, to start the pseudocosts from measured gains.

    The root (x, lo, hi (n,)) is relaxed, then in one batch both children of every free entry
    (:func:`.nodes.branch`); each child's bound gain over the root, per unit the entry moved, is
    recorded (gains capped at ``thr``, where the relaxation stops). Without it every entry
    starts from the average and the first branchings — those that shape the whole tree — are
    blind.

    Returns the relaxed root (a :class:`.nodes.Relaxed` batch of one) and the number of children
    relaxed.
    """
    lb = torch.full((1,), -math.inf, dtype=x.dtype, device=x.device)
    root = blk.relax(x[None], lo[None], hi[None], lb, thr, iters, deadline)
    xr, lbr, lor, hir = root.x, root.lb, root.lo, root.hi
    free = torch.nonzero(hir[0] > lor[0]).flatten()
    if free.numel() == 0 or not math.isfinite(float(lbr[0])) or float(lbr[0]) >= thr:
        return root, 0
    nf = free.numel()
    down, up, fits = branch(lor.expand(nf, -1), hir.expand(nf, -1), free, blk.k, blk.m, blk.c)
    ok = fits.flatten()
    clo, chi = torch.cat([down[0], up[0]])[ok], torch.cat([down[1], up[1]])[ok]
    lbc = blk.relax(xr.expand(clo.shape[0], -1), clo, chi, lbr.expand(clo.shape[0]).clone(),
                    thr, iters, deadline).lb
    xe = xr[0, free].cpu().numpy()
    entry, direction = np.tile(free.cpu().numpy(), 2), np.repeat([0, 1], nf)
    dist = np.concatenate([xe, 1.0 - xe])
    ok = ok.cpu().numpy()
    gain = np.minimum(lbc.cpu().numpy(), thr) - float(lbr[0])
    pc.record(entry[ok], direction[ok], gain, dist[ok])
    return root, int(ok.sum())


class BlockOutcome(NamedTuple):
    """One block's search: ``best`` (n,) bool pruned indicators, its certified ``bound``, whether
    it is ``proved`` and the ``nodes`` relaxed."""

    best: np.ndarray
    bound: float
    proved: bool
    nodes: int


def solve_block(blk, start: np.ndarray, ub: float, group: np.ndarray, deadline: float, gap_tol: float,
                device, max_nodes: Optional[int], kept: Optional[np.ndarray] = None,
                floor: float = math.inf, trace: Optional[Callable[[float, float], None]] = None) -> BlockOutcome:
    """Best-first branch-and-bound of one block. ``start``: (n,) bool pruned indicators, worth ``ub``;
    ``kept`` (n,) bool: entries fixed kept at the root, every point with one of them pruned
    being worth at least ``floor``. ``trace(incumbent, bound)``, if given, is called after a
    batch that improves the incumbent and at least every :data:`TRACE_EVERY` seconds, with the
    block's bound at that moment (the least of the open and pruned nodes' bounds, as returned)."""
    n = start.size
    best = start.copy()
    counter = itertools.count()
    pc = Pseudocosts(n)
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    ones = torch.ones(n, dtype=torch.float64, device=device)
    if kept is not None:
        ones[torch.as_tensor(kept, device=device)] = 0.0
    x0 = torch.as_tensor(best, dtype=torch.float64, device=device)
    pruned_min, nodes = floor, 0
    root = Node(-math.inf, next(counter), zeros, ones, x0, None, 0.0, 0)
    if blk.strong_root:
        root_deadline = share_of_time_left(deadline, ROOT_SHARE)
        level = prune_level(ub, gap_tol)
        relaxed, nodes = root_pseudocosts(blk, pc, x0, zeros, ones, level, root_deadline)
        if relaxed.fixed:
            pruned_min = min(pruned_min, level)
        nodes += 1
        root = root._replace(bound=float(relaxed.lb[0]), lo=relaxed.lo[0], hi=relaxed.hi[0], x=relaxed.x[0])
    heap: list[Node] = [root]
    shifts = blk.node_shifts and SHIFT_EVERY > 0
    next_trace = time.perf_counter() + TRACE_EVERY

    def thr():
        return prune_level(ub, gap_tol)

    def current_bound() -> float:
        return max(min(min((node.bound for node in heap), default=math.inf), pruned_min, ub), 0.0)

    while heap and time.perf_counter() < deadline and (max_nodes is None or nodes < max_nodes):
        batch: list[Node] = []
        while heap and len(batch) < min(BATCH, blk.batch):
            node = heapq.heappop(heap)
            if node.bound >= thr():
                pruned_min = min(pruned_min, node.bound)
                continue
            batch.append(node)
        if not batch:
            break
        nodes += len(batch)
        parent_lb = [b.bound for b in batch]
        lb = torch.tensor(parent_lb, dtype=torch.float64, device=device)
        lo = torch.stack([b.lo for b in batch])
        hi = torch.stack([b.hi for b in batch])
        x = torch.stack([b.x for b in batch])
        level = thr()
        shift = torch.tensor([b.shift for b in batch], dtype=torch.float64, device=device)
        base = torch.tensor([b.shift_base for b in batch], device=device)
        x, lb, lo, hi, fixed = blk.relax(x, lo, hi, lb, level, ITERS, deadline, **({"shift": shift} if shifts else {}))
        if fixed:  # points removed by reduced-cost fixing are worth at least ``level``
            pruned_min = min(pruned_min, level)
        cand = blk.round(x, lo, hi).cpu().numpy() > 0.5
        vals = blk.value(cand)
        i = int(np.argmin(vals))
        improved = vals[i] < ub * (1 - 1e-12)
        if improved:
            p = blk.polish(cand[i], group, time.perf_counter() + 0.1 * max(deadline - time.perf_counter(), 0.0))
            best, ub = p, float(blk.value(p[None])[0])
        lbs = lb.cpu().numpy()
        xs, free = x.cpu().numpy(), (hi > lo).cpu().numpy()
        child = [j for j, b in enumerate(batch) if b.branched is not None and math.isfinite(parent_lb[j])]
        if child:  # the bound gains of the branchings that made these nodes
            e, up, dist = (np.array(v) for v in zip(*(batch[j].branched for j in child)))
            pc.record(e.astype(int), up.astype(int), np.minimum(lbs[child], ub) - np.asarray(parent_lb)[child], dist)
        level = thr()
        pruned = lbs >= level
        if pruned.any():
            pruned_min = min(pruned_min, float(lbs[pruned].min()))
        for j in np.flatnonzero(~pruned & ~free.any(axis=1)):  # every entry fixed: a leaf, scored exactly
            p = lo[j].cpu().numpy() > 0.5
            v = float(blk.value(p[None])[0])
            if v < ub:
                best, ub, improved = p, v, True
            pruned_min = min(pruned_min, v)
        go = np.flatnonzero(~pruned & free.any(axis=1))
        if go.size:
            if shifts:  # the children's convexity shift, on the parent's (larger) free set
                G = torch.as_tensor(go, device=device)
                nfix = (hi[G] <= lo[G]).sum(1)
                redo = nfix + 1 - base[G] >= SHIFT_EVERY
                if bool(redo.any()):
                    R, nfix = G[redo], nfix[redo]
                    delta = blk.node_shift(lo[R], hi[R], deadline)
                    done = ~torch.isnan(delta)      # those left out past the deadline keep the parent's
                    R, nfix, delta = R[done], nfix[done], delta[done]
                    shift[R] = torch.maximum(shift[R], delta)
                    base[R] = nfix
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
                        heapq.heappush(heap, Node(float(lbs[j]), next(counter), clo[a], chi[a], x[j],
                                                  Branching(e, up, dist), shift_l[j], base_l[j]))
        if trace is not None and (improved or time.perf_counter() >= next_trace):
            trace(ub, current_bound())
            next_trace = time.perf_counter() + TRACE_EVERY
    open_min = min((node.bound for node in heap), default=math.inf)
    bound = min(open_min, pruned_min, ub)
    proved = not heap or open_min >= thr()
    return BlockOutcome(best, max(bound, 0.0), proved, nodes)
