r"""The ``reconstruct`` refit: exact batched Cholesky or batched preconditioned CG.

For weights ``W`` (d_out × d_in), Gram ``G`` (d_in × d_in, PSD) and a mask ``M`` the refit
solves, for every row ``r`` with support ``S`` (``K = |S|``),

.. math:: \min_{v:\,\mathrm{supp}\,v ⊆ S} (w_r - v)^T G (w_r - v)
          \iff G_{SS} v_S = (G w_r)_S .

``exact`` (:meth:`LayerProblem.refit`)
    one Cholesky of each row's ``G_SS``: ``O(d_out·K³)`` float64 work, e.g. ~230 TFLOP on a
    LLaMA-7B ``down_proj`` (4096 × 11008, K = 5504). Where every row has the same support
    (``columns``) it is one Cholesky shared by all rows: ``K³/3 + 2·d_out·K²``, and ``auto``
    always takes it (one CG iteration already costs ``2·d_out·d_in²``).

``cg`` (:func:`pcg_refit`)
    conjugate gradients on every row at once, iterating on ``V`` (d_out × d_in, zero off M)::

        R = M ⊙ ((W − V) G)          residual of the normal equations (−½ gradient) on S
        Z = R ⊙ g⁺                    Jacobi preconditioner, g = diag G (g⁺_j = 0 if g_j = 0)
        ρ = Σ_j R·Z  (per row),  P = Z
        repeat:  Q = M ⊙ (P G)        the one dense GEMM per iteration, O(n·d_in²)
                 α = ρ / Σ_j P·Q;  V += α P;  R −= α Q
                 ρ' = Σ_j R·(R ⊙ g⁺);  P = R ⊙ g⁺ + (ρ'/ρ) P

    ``α`` is each row's exact line minimiser along ``P``, so in exact arithmetic every
    iteration lowers every row's error. ``ρ = ‖g^{-½} ⊙ R‖²`` is the Jacobi-scaled residual;
    a row stops when its *relative residual* ``‖g^{-½} ⊙ R‖ / ‖g^{-½} ⊙ M ⊙ (W G)‖`` (the
    scaled residual relative to that of ``v = 0``) is at most ``tol``, confirmed on a freshly
    computed residual (the recursive one drifts in float32); or at ``max_iter``; or at the
    deadline; or when the working precision is reached (the fresh residual fails ``tol`` twice
    after the recursive one met it). Cost: ``2·d_out·d_in²`` flop per iteration plus three
    GEMMs of the same size (``M ⊙ (W G)``, the start's residual, the confirmations); memory
    about seven (rows × d_in) arrays of the working dtype per chunk of rows, plus ``G``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["RefitResult", "pcg_refit", "refit_weights", "exact_refit_flops", "shared_support", "REFIT_METHODS",
           "DEFAULT_TOL", "DEFAULT_MAX_ITER", "EXACT_MAX_FLOPS"]

REFIT_METHODS = ("auto", "exact", "cg")
#: default relative residual at which a row's CG stops
DEFAULT_TOL = 1e-4
#: default CG iteration cap per row
DEFAULT_MAX_ITER = 200
#: ``auto`` solves exactly while ``Σ_r K_r³/3`` (the Cholesky flops) stays at or below this
#: (the measured crossover, docs/DECISIONS.md: 128 × 128 at 50% exact, 256 × 256 CG)
EXACT_MAX_FLOPS = 5e7
#: bytes of working arrays one CG chunk of rows may use
_CHUNK_BYTES = 1 << 28
#: working (rows × d_in) arrays held per chunk: W, V, R, P, Q, Z and the mask
_ARRAYS = 7


@dataclass(frozen=True)
class RefitResult:
    """Refitted weights and how they were obtained.

    weights : (d_out, d_in) float64, zero off the mask
    method : ``"exact"`` or ``"cg"``
    iterations : most CG iterations of any row (0 for ``exact``)
    max_relative_residual : largest final relative residual of any row (None for ``exact``)
    tolerance : the relative residual asked for (None for ``exact``)
    converged : every row met ``tolerance`` (always True for ``exact``)
    """

    weights: torch.Tensor
    method: str
    iterations: int = 0
    max_relative_residual: Optional[float] = None
    tolerance: Optional[float] = None
    converged: bool = True

    @property
    def exact(self) -> bool:
        return self.method == "exact"

    def describe(self) -> dict:
        """A JSON-able summary for ``Result.info``."""
        return {"method": self.method, "iterations": self.iterations,
                "max_relative_residual": self.max_relative_residual, "tolerance": self.tolerance,
                "converged": self.converged}


def exact_refit_flops(mask: torch.Tensor) -> float:
    """The Cholesky and solve flops of the exact refit of ``mask`` (d_out, d_in): ``Σ_r K_r³/3``,
    or ``K³/3 + 2·d_out·K²`` where every row has the same support (one shared factor)."""
    if shared_support(mask):
        k = float(mask[0].sum()) if mask.shape[0] else 0.0
        return k ** 3 / 3.0 + 2.0 * mask.shape[0] * k ** 2
    return float((mask.sum(dim=1).to(torch.float64) ** 3).sum()) / 3.0


def shared_support(mask: torch.Tensor) -> bool:
    """Every row of the (d_out, d_in) ``mask`` keeps the same inputs (e.g. ``columns``)."""
    return mask.dim() == 2 and mask.shape[0] > 1 and bool((mask == mask[:1]).all())


def refit_weights(problem, mask: torch.Tensor, start: Optional[torch.Tensor] = None, *,
                  method: str = "auto", tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                  dtype: torch.dtype = torch.float32, deadline: float = math.inf) -> RefitResult:
    """Refit ``problem``'s kept weights on ``mask``: ``exact``, ``cg``, or ``auto`` (exact while
    :func:`exact_refit_flops` ≤ :data:`EXACT_MAX_FLOPS`, else CG). ``start`` warm-starts CG
    (default ``W ⊙ M``); ``deadline`` is a ``time.perf_counter()`` value. With dense targets CG
    fits the targets ``T`` (:meth:`LayerProblem.standard_view`), whose minimiser is the same."""
    if method not in REFIT_METHODS:
        raise ValueError(f"refit method must be one of {REFIT_METHODS}, got {method!r}")
    mask = problem.check_mask(mask)
    if method == "exact" or (method == "auto" and (shared_support(mask) or exact_refit_flops(mask) <= EXACT_MAX_FLOPS)):
        return RefitResult(problem.refit(mask), "exact")
    return pcg_refit(problem.standard_view().W, problem.G, mask, start, tol=tol, max_iter=max_iter, dtype=dtype,
                     deadline=deadline)


def pcg_refit(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, start: Optional[torch.Tensor] = None, *,
              tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, dtype: torch.dtype = torch.float32,
              deadline: float = math.inf, chunk_bytes: int = _CHUNK_BYTES) -> RefitResult:
    """Batched Jacobi-preconditioned CG refit (module docstring), rows in chunks.

    Parameters
    ----------
    W : (d_out, d_in) dense weights; G : (d_in, d_in) PSD Gram; mask : (d_out, d_in) bool
    start : (d_out, d_in) warm start (only its values on the mask count), default ``W ⊙ M``
    tol : relative residual at which a row stops; max_iter : iterations per row
    dtype : working precision (float32 or float64)
    deadline : ``time.perf_counter()`` value after which no iteration starts
    chunk_bytes : bound on the working arrays of one chunk of rows
    """
    d_out, d_in = W.shape
    Gw = G.to(dtype)
    diag = torch.diagonal(Gw)
    ginv = torch.where(diag > 0, 1.0 / diag, torch.zeros((), dtype=dtype, device=G.device))
    start = W * mask if start is None else start
    out = torch.zeros(d_out, d_in, dtype=torch.float64, device=W.device)
    chunk = max(1, chunk_bytes // (_ARRAYS * d_in * Gw.element_size()))
    iters, worst, converged = 0, 0.0, True
    for lo in range(0, d_out, chunk):
        hi = min(lo + chunk, d_out)
        state = _Chunk(W[lo:hi].to(dtype), Gw, ginv, mask[lo:hi], start[lo:hi].to(dtype), tol)
        state.run(max_iter, deadline)
        out[lo:hi] = state.V_out.to(torch.float64)
        iters = max(iters, state.iterations)
        worst = max(worst, float(state.residual_out.max()) if state.residual_out.numel() else 0.0)
        converged &= bool((state.residual_out <= tol).all())
    return RefitResult(out * mask, "cg", iters, worst, tol, converged)


class _Chunk:
    """CG state of one chunk of rows; finished rows leave the active arrays."""

    def __init__(self, W, G, ginv, mask, V0, tol):
        self.G, self.ginv, self.tol = G, ginv, tol
        n = W.shape[0]
        self.M = mask.to(W.dtype)
        self.W = W
        self.V = V0 * self.M
        self.bnorm = (((W @ G) * self.M).square() * ginv).sum(dim=1).sqrt()
        self.R = ((W - self.V) @ G) * self.M
        self.rows = torch.arange(n, device=W.device)
        self.V_out = torch.zeros_like(W)
        self.residual_out = torch.zeros(n, dtype=torch.float64, device=W.device)
        self.failed = torch.zeros(n, dtype=torch.int64, device=W.device)
        self.iterations = 0
        zero_target = self.bnorm == 0  # M ⊙ (W G) = 0: v = 0 solves G_SS v_S = 0 exactly
        self.V[zero_target] = 0.0
        self.R[zero_target] = 0.0
        self.Z = self.R * ginv
        self.rho = (self.R * self.Z).sum(dim=1)
        self.P = self.Z.clone()
        self._finish(self._relative(self.rho) <= tol)

    def _relative(self, rho: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """Relative residual of the active rows ``rows`` with scaled residual² ``rho``."""
        bnorm = self.bnorm[rows]
        rel = rho.clamp_min(0).sqrt() / bnorm
        return torch.where(bnorm > 0, rel, torch.zeros_like(rel))

    def _finish(self, done: torch.Tensor) -> None:
        """Store the rows flagged ``done`` (with their current ``rho``) and drop them."""
        if not bool(done.any()):
            return
        idx = self.rows[done]
        self.V_out[idx] = self.V[done]
        self.residual_out[idx] = self._relative(self.rho[done], done).to(torch.float64)
        keep = ~done
        for name in ("rows", "W", "V", "R", "P", "Z", "M", "bnorm", "rho", "failed"):
            setattr(self, name, getattr(self, name)[keep])

    def _fresh_residual(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = ((self.W[rows] - self.V[rows]) @ self.G) * self.M[rows]
        return R, (R.square() * self.ginv).sum(dim=1)

    def run(self, max_iter: int, deadline: float) -> None:
        while self.rows.numel() and self.iterations < max_iter and time.perf_counter() < deadline:
            Q = (self.P @ self.G) * self.M
            pq = (self.P * Q).sum(dim=1)
            stalled = ~(pq > 0) | ~torch.isfinite(pq)  # P in G_SS's null space, or rounding
            alpha = torch.where(stalled, torch.zeros_like(pq), self.rho / pq.where(~stalled, torch.ones_like(pq)))
            self.V += alpha[:, None] * self.P
            self.R -= alpha[:, None] * Q
            self.iterations += 1
            self.Z = self.R * self.ginv
            rho = (self.R * self.Z).sum(dim=1)
            restart = torch.zeros_like(stalled)
            claimed = (self._relative(rho) <= self.tol) | stalled
            if bool(claimed.any()):
                R, fresh = self._fresh_residual(claimed)
                rho[claimed] = fresh
                self.R[claimed] = R
                self.Z[claimed] = R * self.ginv
                self.failed[claimed] += (self._relative(fresh, claimed) > self.tol).to(self.failed.dtype)
                restart[claimed] = True  # the recurrence's R was replaced: restart P there
            beta = torch.where(restart | (self.rho <= 0), torch.zeros_like(rho), rho / self.rho)
            self.P = self.Z + beta[:, None] * self.P
            self.rho = rho
            done = claimed & ((self._relative(rho) <= self.tol) | (self.failed >= 2) | stalled)
            self._finish(done)
        if self.rows.numel():  # stopped on max_iter or the deadline: report fresh residuals
            every = torch.ones_like(self.rows, dtype=torch.bool)
            _, self.rho = self._fresh_residual(every)
            self._finish(every)
