r"""The ``mask`` block of ``bnb``: ``min pᵀQp`` over the node sets, on an exact convex rewrite.

For one block with quadratic form ``Q`` (n, n) and pruned indicators ``p`` (groups and budgets
as in :mod:`.nodes`):

* **Convex rewrite** (:func:`mask_block`, :mod:`.._qcr`): ``f(p) = ‖Fᵀp‖² + lᵀp + const`` is
  convex on ``ℝⁿ`` and equals ``pᵀQp`` on every budget-feasible binary ``p``. Without probed
  entries it is the plain form ``FFᵀ = Q``; after probing, the Shor SDP chooses it on the
  principal block of the entries still in play (so the root relaxation is at least the SDP
  bound), padded with zeros on the kept ones.
* **Probing** (:func:`probe_kept`): one batch relaxes every child ``{p_i = 1}`` of the start's
  kept entries; entries whose child cannot beat the start are kept for good and leave ``Q``.
* **Node relaxation** (:meth:`MaskBlock.relax`): FISTA with adaptive restart on a batch of nodes.
  ``∇f = Hx + l`` is affine, so the momentum point's gradient is the same combination of known
  gradients: one matrix product per iteration. Bounds by :func:`.nodes.checkpoint`.
* **Node convexity shift** (:func:`node_convexity`): a node minimises
  ``f + δ Σ_free (p − p²)`` with ``δ = λ_min`` of the Hessian on the node's directions
  ``V = {d : d_fixed = 0, Σ_group d = 0}``: equal to ``f`` on binaries, convex on the node and
  above ``f`` on ``[0, 1]ⁿ``, so a tighter bound.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import _qcr
from ..base import share_of_time_left
from .._quadratic import one_swap
from .nodes import BatchOutcome, NodeSets, Relaxed, RowState, checkpoint, project_budgets, project_warm

__all__ = ["MaskBlock", "mask_block", "node_convexity", "probe_kept", "PROBE_ITERS"]

#: FISTA iterations of the probing batch at the root (:func:`probe_kept`)
PROBE_ITERS = 200


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


@dataclass
class _Iterate(RowState):
    """FISTA state of the nodes still in a batch (every field has one row per node).

    idx (B,) their rows in the batch; x (B, n) the iterate, fx (B,) ``f − const`` there, gx
    (B, n) its gradient; z, gz the momentum point and its gradient; t (B, 1) the momentum
    counter; lb (B,) best bounds; tau (B, k, 1) projection thresholds; lo3, hi3 (B, k, m) node
    sets; ds (B, n) the convexity shift on free entries; lin (B, n) the shifted linear term.
    """

    idx: torch.Tensor
    x: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor
    fx: torch.Tensor
    lb: torch.Tensor
    gx: torch.Tensor
    gz: torch.Tensor
    tau: torch.Tensor
    lo3: torch.Tensor
    hi3: torch.Tensor
    ds: torch.Tensor
    lin: torch.Tensor


class MaskBlock(NodeSets):
    """One block's data in torch: the convex rewrite, groups and the exact quadratic.

    Q : (n, n) the exact form; form : :class:`.._qcr.QCRForm` with ``F`` (n, r), ``lin`` (n,)
    """

    strong_root = True
    node_shifts = True
    #: the most seconds one node's :meth:`node_shift` took so far (its time prediction)
    shift_seconds = 0.0

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

    def node_shift(self, lo: torch.Tensor, hi: torch.Tensor, deadline: float = math.inf) -> torch.Tensor:
        """Per node (B,): the largest ``δ ≥ 0`` keeping ``f − δ Σ_free p²`` convex on the node
        (:func:`node_convexity` of ``H/2``); NaN for the nodes left out because the chunk that
        holds them was predicted (from the previous chunks' time per node) to end past
        ``deadline`` (one eigenvalue problem per node: ~0.15 s at n = 576)."""
        free, H2, s = hi > lo, 0.5 * self.H, 1.5 * self.lam_max
        n = free.shape[1]
        # in chunks of 64 nodes up to n = 128 (the (64, n, n) work arrays stay in cache), of the
        # same memory above
        chunk = 64 if n <= 128 else max(1, int(64 * (128 / n) ** 2))
        out = torch.full((free.shape[0],), math.nan, dtype=H2.dtype, device=H2.device)
        for a in range(0, free.shape[0], chunk):
            began = time.perf_counter()
            if math.isfinite(deadline) and began + self.shift_seconds * min(chunk, free.shape[0] - a) > deadline:
                break
            part = free[a:a + chunk]
            out[a:a + chunk] = node_convexity(H2, part, self.k, self.m, s)
            self.shift_seconds = max(self.shift_seconds, (time.perf_counter() - began) / part.shape[0])
        return out

    def relax(self, x, lo, hi, lb, thr, iters, deadline=math.inf, shift=None) -> Relaxed:
        """FISTA on a batch of nodes (x, lo, hi (B, n), lb (B,)); returns the points, the best
        bounds seen and the node sets after reduced-cost fixing (the binary points cut off that
        way are worth at least ``thr``). Every 10 iterations the nodes already pruned
        (bound ≥ ``thr``) or converged leave the batch; past ``deadline`` the batch stops there.
        ``shift`` (B,): per-node ``δ`` of :meth:`node_shift`: the node minimises
        ``f + δ Σ_free (p − p²)`` (equal to f on binaries, convex on the node, above f on [0, 1])."""
        out = BatchOutcome(x, lb, lo, hi)
        lo3, hi3 = self.shape(lo), self.shape(hi)
        x, tau = project_budgets(self.shape(x), lo3, hi3, self.c)
        x = x.reshape(out.x.shape)
        ds = torch.zeros_like(x) if shift is None else shift[:, None] * (hi > lo).to(x.dtype)
        lin = self.lin + ds                                                # (B, n) per-node linear term
        s = _Iterate(idx=torch.arange(x.shape[0], device=x.device), x=x, z=x, t=None, fx=None, lb=lb, gx=None,
                     gz=None, tau=tau, lo3=lo3, hi3=hi3, ds=ds, lin=lin)
        # ∇ of the shifted f, Hv − 2δv + l, fused into one matrix product (as cheap as Hv + l)
        grad = lambda v: torch.addmm(torch.addcmul(s.lin, s.ds, v, value=-2.0), v, self.H)
        s.gx = grad(s.x)
        s.fx = 0.5 * (s.x * (s.gx + s.lin)).sum(-1)     # f − const, from the gradient
        s.gz = s.gx
        s.t = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        for it in range(iters):
            new, s.tau = project_warm(self.shape(s.z - self.step * s.gz), s.lo3, s.hi3, self.c, s.tau)
            new = new.reshape(s.x.shape)
            gnew = grad(new)
            fnew = 0.5 * (new * (gnew + s.lin)).sum(-1)
            worse = (fnew > s.fx).unsqueeze(1)                        # adaptive restart
            t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * s.t * s.t))
            beta = torch.where(worse, torch.zeros_like(s.t), (s.t - 1.0) / t_next)
            s.z = new + beta * (new - s.x)                            # ∇f is affine: carry it along
            s.gz = gnew + beta * (gnew - s.gx)
            s.t = torch.where(worse, torch.ones_like(s.t), t_next)
            s.x, s.fx, s.gx = new, fnew, gnew
            if it % 10 == 9 or it == iters - 1 or time.perf_counter() > deadline:
                fe, ge = self.f_and_grad(s.x)                         # the bound from the exact form
                fe, ge = fe + (s.ds * (s.x - s.x * s.x)).sum(-1), ge + s.ds * (1.0 - 2.0 * s.x)
                s.lb, s.lo3, s.hi3, fx_any, keep = checkpoint(fe, ge, s.x, s.lo3, s.hi3, self.c, self.margin,
                                                              s.lb, thr)
                out.store(s.idx, s.x, s.lb, s.lo3, s.hi3, fx_any)
                if not bool(keep.any()) or time.perf_counter() > deadline:
                    break
                if not bool(keep.all()):
                    s.compact(keep)
        return out.result()

    def value(self, P: np.ndarray) -> np.ndarray:
        """Exact objective ``pᵀQp`` of binary points P (B, n) bool."""
        P = P.astype(np.float64)
        return ((P @ self.Q) * P).sum(axis=1)

    def polish(self, p: np.ndarray, group: np.ndarray, deadline: float = math.inf) -> np.ndarray:
        """1-swap local search from the pruned indicators p (n,) bool, until ``deadline``."""
        return ~one_swap(self.Q, ~p, group, deadline=deadline)


def mask_block(Q, k, m, c, group, params, deadline, device, kept) -> tuple[MaskBlock, bool]:
    """The ``mask`` block of ``pᵀQp`` and whether it uses QCR (else a diagonal form).

    ``kept`` None: the plain exact form ``‖Fᵀp‖²``, ``FFᵀ = Q`` (no SDP). Else (n,) bool,
    entries fixed kept: the form of :func:`.._qcr.convex_form` on the others' principal
    block ``Q_R``, padded with zeros — exact wherever the kept entries are 0, which every
    node keeps them at (the SDP sees only the entries still in play, at their own scale).
    The SDP gets half the time left before ``deadline``.
    """
    n = Q.shape[0]
    R = np.arange(n) if kept is None else np.flatnonzero(~kept)
    QR = Q[np.ix_(R, R)]
    sigma = float(np.abs(np.diag(QR)).max()) if R.size else 0.0
    if sigma <= 0.0:
        form = _qcr.QCRForm(np.zeros((R.size, 0)), np.zeros(R.size), 0.0, 0.0, None)
    else:
        sdp_deadline = share_of_time_left(deadline, 0.5)   # half the time left
        form = _qcr.convex_form(QR / sigma, None if kept is None else group[R], np.full(k, c),
                                "none" if kept is None else "auto", params, sdp_deadline)
    F = np.zeros((n, form.F.shape[1]))
    F[R] = form.F * math.sqrt(max(sigma, 0.0))
    lin = np.zeros(n)
    lin[R] = form.lin * sigma
    padded = _qcr.QCRForm(F, lin, form.const * sigma, form.neg * sigma, form.sdp_bound)
    return MaskBlock(Q, k, m, c, padded, device), form.sdp_bound is not None


def probe_kept(blk: MaskBlock, start: np.ndarray, thr: float, deadline: float = math.inf) -> tuple[np.ndarray, float]:
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
    lb = blk.relax(x, lo, hi, lb, thr, PROBE_ITERS, deadline).lb
    out = (lb >= thr).cpu().numpy()
    kept[cand[out]] = True
    return kept, float(lb[torch.as_tensor(out, device=dev)].min()) if out.any() else math.inf
