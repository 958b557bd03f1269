r"""The ``reconstruct`` block of ``bnb``: branch-and-bound nodes on the perspective relaxation.

For rows ``W`` (R, n) sharing the (unit-diagonal) Gram ``G`` and pruned indicators ``p``
(kept ``z = 1 − p``), the exact objective is the best refit on the kept support,
``E(p) = Σ_r min_{v_r: v_r = 0 where p = 1} (w_r − v_r)ᵀG(w_r − v_r)``. With ``G = A + D``,
``D = diag(δ) ≻ 0`` (:func:`.._quadratic.logdet_diagonal`) and ``A ⪰ 0``,

.. math:: E(p) = \min_v Σ_r (w_r − v_r)ᵀA(w_r − v_r) + Σ_i δ_i (w_{ri}² − 2w_{ri}v_{ri} + v_{ri}²/z_i)

on binaries (``v²/0 = 0`` forces ``v = 0``), and on ``[0, 1]ⁿ`` the right side, ``h(z)``, is a
convex function of ``z`` (the perspective relaxation, DESIGN.md §2). In closed form, with
``S = diag(√z)``, ``K = SAS + D``, ``b_r = Gw_r``:

.. math:: h(z) = Σ_r w_rᵀGw_r − (Sb_r)ᵀK^{-1}(Sb_r), \qquad
          ∂h/∂z_i = −δ_i Σ_r u_{ri}², \quad u_r = (b_r − Av_r)/δ,\ v_r = SK^{-1}Sb_r,

(``K ⪰ D ≻ 0``: one batched Cholesky per evaluation). Where ``G`` is singular there is no
``δ > 0`` and the bound falls back to monotonicity (:meth:`PerspectiveBlock.relax`). Nodes are solved by FISTA with a
per-node backtracking step and adaptive restart; the node bound is the same convexity
certificate as for ``mask`` (:func:`.nodes.checkpoint`), here in ``p``: ``∇_p h = −∇_z h``.
Binary points are scored exactly by batched refits, and incumbents polished by 1-swap search
on the exact objective.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .nodes import BatchOutcome, NodeSets, Relaxed, RowState, checkpoint, project_budgets, project_warm

__all__ = ["PerspectiveBlock"]

#: relative round-off allowance on h, its linearisation and the constant (plus a term in the
#: condition of K, see :class:`PerspectiveBlock`)
FLOAT_MARGIN = 1e-11
#: swap-polish passes on an improved incumbent (each scores every in-group swap at once)
POLISH_STEPS = 25
#: swaps scored per batched refit up to n = 128 (bounds the memory: chunk × n² floats; the same
#: memory above)
POLISH_CHUNK = 256


def _solve_psd(K: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``K⁺b`` for a batch of symmetric PSD K (B, n, n), b (B, n, R): Cholesky, or where that
    fails (singular K) the eigen-decomposition with eigenvalues below 1e-12·λ_max dropped (the
    minimum-norm solution: exact refits on a singular G_SS, exact h where round-off broke
    Cholesky)."""
    L, info = torch.linalg.cholesky_ex(K)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, L)
    lam, U = torch.linalg.eigh(K)
    cut = 1e-12 * lam.abs().amax(dim=-1, keepdim=True).clamp(min=1e-300)
    inv = torch.where(lam > cut, 1.0 / torch.where(lam > cut, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return U @ (inv[:, :, None] * (U.transpose(-1, -2) @ b))


@dataclass
class _Iterate(RowState):
    """FISTA state of the nodes still in a batch (one row per node): idx (B,) their rows in
    the batch; x (B, n) the iterate, fx (B,) h there and gx (B, n) its gradient; z the momentum
    point with fz, gz; t (B, 1) the momentum counter; L (B, 1) the step's inverse; lb (B,) best
    bounds; tau (B, k, 1) projection thresholds; lo3, hi3 (B, k, m) node sets."""

    idx: torch.Tensor
    x: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor
    fx: torch.Tensor
    lb: torch.Tensor
    L: torch.Tensor
    gx: torch.Tensor
    gz: torch.Tensor
    fz: torch.Tensor
    tau: torch.Tensor
    lo3: torch.Tensor
    hi3: torch.Tensor


class PerspectiveBlock(NodeSets):
    """One block of the ``reconstruct`` search: rows ``W`` (R, n) sharing ``G`` (n, n),
    ``k`` groups of ``m`` entries with ``c`` pruned per group; ``delta`` (n,) > 0."""

    def __init__(self, W: np.ndarray, G: np.ndarray, delta: np.ndarray, k: int, m: int, c: int, device):
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)
        self.G, self.delta = t(G), t(delta)
        self.A = self.G - torch.diag(self.delta)
        self.B = t(G @ W.T)                                    # (n, R): b_r = G w_r
        self.const = float(np.einsum("ri,ij,rj->", W, G, W))
        self.k, self.m, self.c = k, m, torch.full((k,), float(c), dtype=torch.float64, device=device)
        self.L0 = 1e-3 * max(self.const, 1e-300)               # first step-size guess (adapted)
        # round-off of h through the Cholesky of K grows with K's condition (≤ (‖A‖ + max δ)/min δ)
        if bool((self.delta > 0).all()):
            cond = (float(torch.linalg.eigvalsh(self.A)[-1]) + float(self.delta.max())) / float(self.delta.min())
        else:
            cond = 1.0
        self.rel_margin = FLOAT_MARGIN + G.shape[0] * float(np.finfo(np.float64).eps) * cond
        n = G.shape[0]
        # one evaluation factors every node's (n, n) K: above n = 128 the batch shrinks with the
        # O(n³) work, so that a batch's iteration (deadline-checked) stays short
        self.batch = 512 if n <= 128 else max(1, int(512 * (128 / n) ** 3))
        self.chunk = POLISH_CHUNK if n <= 128 else max(1, int(POLISH_CHUNK * (128 / n) ** 2))
        #: the most seconds one scored swap took so far in :meth:`polish` (its time prediction)
        self.swap_seconds = 0.0

    @property
    def scale(self) -> float:
        """The all-pruned value."""
        return self.const

    def h_and_grad(self, p: torch.Tensor):
        """``h`` and ``∇_p h`` at pruned fractions p (B, n) in [0, 1]."""
        sq = (1.0 - p).clamp(0.0, 1.0).sqrt()                  # (B, n)
        K = sq[:, :, None] * self.A * sq[:, None, :] + torch.diag(self.delta)
        bt = sq[:, :, None] * self.B                            # (B, n, R)
        y = _solve_psd(K, bt)
        v = sq[:, :, None] * y
        h = self.const - (bt * y).sum(dim=(-2, -1))
        u = (self.B - self.A @ v) / self.delta[:, None]
        return h, self.delta * (u * u).sum(-1)

    def relax(self, x, lo, hi, lb, thr, iters, deadline=math.inf) -> Relaxed:
        """:meth:`relax_perspective`, or where ``G`` is singular (``δ = 0``, no perspective
        strength) the monotone bound: pruning more never lowers the error, so every point of
        the node is worth at least the refit with only its fixed-pruned entries pruned."""
        if not bool((self.delta > 0).any()):
            x = project_budgets(self.shape(x), self.shape(lo), self.shape(hi), self.c)[0].reshape(x.shape)
            bound = torch.as_tensor(self.value(lo.cpu().numpy() > 0.5), dtype=x.dtype, device=x.device)
            return Relaxed(x, torch.maximum(lb, bound - self.rel_margin * abs(self.const)), lo, hi, False)
        return self.relax_perspective(x, lo, hi, lb, thr, iters, deadline)

    def relax_perspective(self, x, lo, hi, lb, thr, iters, deadline=math.inf) -> Relaxed:
        """FISTA with backtracking (per node: a step ``1/L`` is taken when
        ``h(new) ≤ h(z) + ∇h(z)ᵀ(new − z) + L/2‖new − z‖²``, else L doubles) and adaptive
        restart, on a batch of nodes; returns and compacts as :meth:`.mask_relax.MaskBlock.relax`."""
        out = BatchOutcome(x, lb, lo, hi)
        lo3, hi3 = self.shape(lo), self.shape(hi)
        x, tau = project_budgets(self.shape(x), lo3, hi3, self.c)
        x = x.reshape(out.x.shape)
        fx, gx = self.h_and_grad(x)
        t = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        s = _Iterate(idx=torch.arange(x.shape[0], device=x.device), x=x, z=x, t=t, fx=fx, lb=lb,
                     L=torch.full_like(t, self.L0), gx=gx, gz=gx, fz=fx, tau=tau, lo3=lo3, hi3=hi3)
        for it in range(iters):
            new, tau_new = project_warm(self.shape(s.z - s.gz / s.L), s.lo3, s.hi3, self.c, s.tau)
            new = new.reshape(s.x.shape)
            fnew, gnew = self.h_and_grad(new)
            dz = new - s.z
            model = s.fz + (s.gz * dz).sum(-1) + 0.5 * s.L.squeeze(1) * (dz * dz).sum(-1)
            ok = (fnew <= model + 1e-12 * abs(self.const)).unsqueeze(1)
            s.L = torch.where(ok, 0.9 * s.L, 2.0 * s.L)
            s.tau = torch.where(ok.unsqueeze(-1), tau_new, s.tau)
            restart = ~ok | (fnew > s.fx).unsqueeze(1)
            t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * s.t * s.t))
            beta = torch.where(restart, torch.zeros_like(s.t), (s.t - 1.0) / t_next)
            xn = torch.where(ok, new, s.x)
            fxn = torch.where(ok.squeeze(1), fnew, s.fx)
            gxn = torch.where(ok, gnew, s.gx)
            s.z = xn + beta * (xn - s.x)
            s.t = torch.where(restart, torch.ones_like(s.t), t_next)
            s.x, s.fx, s.gx = xn, fxn, gxn
            momentum = (beta > 0).squeeze(1)
            s.fz, s.gz = s.fx.clone(), s.gx.clone()
            if bool(momentum.any()):  # the extrapolated point, kept inside h's domain [0, 1]ⁿ
                s.z = torch.where(momentum.unsqueeze(1), s.z.clamp(0.0, 1.0), s.z)
                s.fz[momentum], s.gz[momentum] = self.h_and_grad(s.z[momentum])
            if it % 10 == 9 or it == iters - 1 or time.perf_counter() > deadline:
                margin = self.rel_margin * (abs(self.const) + s.fx.abs() + (s.gx * s.x).abs().sum(-1)
                                            + s.gx.abs().sum(-1))
                s.lb, s.lo3, s.hi3, fx_any, keep = checkpoint(s.fx, s.gx, s.x, s.lo3, s.hi3, self.c, margin,
                                                              s.lb, thr)
                out.store(s.idx, s.x, s.lb, s.lo3, s.hi3, fx_any)
                if not bool(keep.any()) or time.perf_counter() > deadline:
                    break
                if not bool(keep.all()):
                    s.compact(keep)
        return out.result()

    def value(self, P: np.ndarray) -> np.ndarray:
        """Exact objective of binary pruned points P (B, n) bool: the refit
        ``Σ_r w_rᵀGw_r − b_{r,S}ᵀ G_SS⁻¹ b_{r,S}`` on each kept set S (batched Cholesky of
        ``G_SS ⊕ I``; ``G`` is positive definite here)."""
        keep = torch.as_tensor(~P, dtype=torch.float64, device=self.G.device)
        K = keep[:, :, None] * self.G * keep[:, None, :] + torch.diag_embed(1.0 - keep)
        bt = keep[:, :, None] * self.B
        return (self.const - (bt * _solve_psd(K, bt)).sum(dim=(-2, -1))).cpu().numpy()

    def polish(self, p: np.ndarray, group: np.ndarray, deadline: float = math.inf) -> np.ndarray:
        """Best-improvement 1-swap search on the exact objective from pruned indicators p (n,):
        each pass scores every swap of a pruned and a kept entry of the same group, in chunks of
        :data:`POLISH_CHUNK` (fewer above n = 128); stops with the best point so far before a
        chunk predicted (from the slowest swap so far) to end past ``deadline``."""
        p = p.copy()
        best = float(self.value(p[None])[0])
        for _ in range(POLISH_STEPS):
            i_idx, j_idx = np.nonzero(p[:, None] & ~p[None, :] & (group[:, None] == group[None, :]))
            top, arg = best, None
            for lo in range(0, i_idx.size, self.chunk):
                began = time.perf_counter()
                ii, jj = i_idx[lo:lo + self.chunk], j_idx[lo:lo + self.chunk]
                if began + self.swap_seconds * ii.size > deadline:
                    break
                cand = np.repeat(p[None], ii.size, axis=0)
                cand[np.arange(ii.size), ii] = False
                cand[np.arange(ii.size), jj] = True
                vals = self.value(cand)
                self.swap_seconds = max(self.swap_seconds, (time.perf_counter() - began) / ii.size)
                a = int(np.argmin(vals))
                if vals[a] < top:
                    top, arg = float(vals[a]), cand[a]
            if arg is None or not top < best * (1 - 1e-12):
                break
            p, best = arg, top
        return p
