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

``cg`` with a dual start (``dual_iter > 0``, the default)
    before the CG above, the same CG on the *dual* of each row's problem (the OBS form of the
    optimal reconstruction): with ``H = G⁻¹`` and ``P`` the row's pruned inputs,

    .. math:: v^* = w - H_{:,P}\, y, \qquad H_{PP}\, y = w_P ,

    so that ``v*_P = 0`` and ``(G(w − v*))_S = (e_P y)_S = 0``: the minimiser. ``y`` is the
    constraint's multiplier, warm-started as ``y₀ = (G(w − v₀))_P`` from the start ``v₀`` (exact
    at the optimum); Jacobi on ``diag H``; the same stop rules, at most ``dual_iter`` iterations.
    On real layers' Grams the dual system is far better conditioned than ``G_SS`` (measurements:
    docs/DECISIONS.md, "The dual start"), and each iteration costs the same one GEMM. ``H`` is
    one Cholesky inverse of ``G + δI`` in the working dtype (``δ`` = 1e-6 of the mean diagonal,
    raised ×100 until the factorisation succeeds), ``d_in³`` flop once per layer, a few CG
    iterations' worth. ``v = M ⊙ (W − Y H)`` replaces the start in every row where its exact
    error is lower (one more GEMM), and the primal CG then finishes from it to ``tol``: the
    stated residual is the primal one either way, and damping or float32 rounding in ``H``
    only makes the start worse, never the result wrong. Memory: ``H`` (d_in² of the working
    dtype) beside ``G``, and about ten (rows × d_in) arrays per chunk while the dual runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["RefitResult", "pcg_refit", "refit_weights", "exact_refit_flops", "shared_support", "REFIT_METHODS",
           "DEFAULT_TOL", "DEFAULT_MAX_ITER", "DEFAULT_DUAL_ITER", "EXACT_MAX_FLOPS"]

REFIT_METHODS = ("auto", "exact", "cg")
#: default relative residual at which a row's CG stops
DEFAULT_TOL = 1e-4
#: default CG iteration cap per row
DEFAULT_MAX_ITER = 200
#: default cap on the dual start's CG iterations per row (0: no dual start)
DEFAULT_DUAL_ITER = 24
#: the dual start's damping of ``G`` before the inverse, relative to its mean diagonal, and
#: the largest it is raised to (×100 per failed factorisation)
_DUAL_DAMP, _DUAL_DAMP_MAX = 1e-6, 1e-2
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
    iterations : most primal CG iterations of any row (0 for ``exact``)
    max_relative_residual : largest final relative residual of any row (None for ``exact``)
    tolerance : the relative residual asked for (None for ``exact``)
    converged : every row met ``tolerance`` (always True for ``exact``)
    dual_iterations : most dual-start CG iterations of any row (0: none ran)
    """

    weights: torch.Tensor
    method: str
    iterations: int = 0
    max_relative_residual: Optional[float] = None
    tolerance: Optional[float] = None
    converged: bool = True
    dual_iterations: int = 0

    @property
    def exact(self) -> bool:
        return self.method == "exact"

    def describe(self) -> dict:
        """A JSON-able summary for ``Result.info``."""
        return {"method": self.method, "iterations": self.iterations,
                "max_relative_residual": self.max_relative_residual, "tolerance": self.tolerance,
                "converged": self.converged, "dual_iterations": self.dual_iterations}


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
                  dual_iter: int = DEFAULT_DUAL_ITER, dtype: torch.dtype = torch.float32,
                  deadline: float = math.inf) -> RefitResult:
    """Refit ``problem``'s kept weights on ``mask``: ``exact``, ``cg``, or ``auto`` (exact while
    :func:`exact_refit_flops` ≤ :data:`EXACT_MAX_FLOPS`, else CG). ``start`` warm-starts CG
    (default ``W ⊙ M``); ``dual_iter`` caps the dual start (0: none); ``deadline`` is a
    ``time.perf_counter()`` value. With dense targets CG fits the targets ``T``
    (:meth:`LayerProblem.standard_view`), whose minimiser is the same."""
    if method not in REFIT_METHODS:
        raise ValueError(f"refit method must be one of {REFIT_METHODS}, got {method!r}")
    mask = problem.check_mask(mask)
    if method == "exact" or (method == "auto" and (shared_support(mask) or exact_refit_flops(mask) <= EXACT_MAX_FLOPS)):
        return RefitResult(problem.refit(mask), "exact")
    return pcg_refit(problem.standard_view().W, problem.G, mask, start, tol=tol, max_iter=max_iter,
                     dual_iter=dual_iter, dtype=dtype, deadline=deadline)


def pcg_refit(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, start: Optional[torch.Tensor] = None, *,
              tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, dual_iter: int = DEFAULT_DUAL_ITER,
              dtype: torch.dtype = torch.float32, deadline: float = math.inf,
              chunk_bytes: int = _CHUNK_BYTES) -> RefitResult:
    """Batched Jacobi-preconditioned CG refit (module docstring), rows in chunks.

    Parameters
    ----------
    W : (d_out, d_in) dense weights; G : (d_in, d_in) PSD Gram; mask : (d_out, d_in) bool
    start : (d_out, d_in) warm start (only its values on the mask count), default ``W ⊙ M``
    tol : relative residual at which a row stops; max_iter : primal iterations per row
    dual_iter : dual-start iterations per row (0: start the primal CG from ``start``)
    dtype : working precision (float32 or float64)
    deadline : ``time.perf_counter()`` value after which no iteration starts
    chunk_bytes : bound on the working arrays of one chunk of rows
    """
    d_out, d_in = W.shape
    Gw = G.to(dtype)
    ginv = _inverse_diagonal(Gw)
    start = W * mask if start is None else start
    dual = dual_iter > 0 and not bool(mask.all()) and time.perf_counter() < deadline
    H = _damped_inverse(Gw) if dual else None
    hinv = None if H is None else _inverse_diagonal(H)
    out = torch.zeros(d_out, d_in, dtype=torch.float64, device=W.device)
    chunk = max(1, chunk_bytes // (_ARRAYS * d_in * Gw.element_size()))
    iters, dual_iters, worst, converged = 0, 0, 0.0, True
    for lo in range(0, d_out, chunk):
        hi = min(lo + chunk, d_out)
        Wc, Mc, V0 = W[lo:hi].to(dtype), mask[lo:hi], start[lo:hi].to(dtype) * mask[lo:hi]
        if H is not None and time.perf_counter() < deadline:
            V0, used = _dual_start(Wc, Gw, H, hinv, Mc, V0, tol, dual_iter, deadline)
            dual_iters = max(dual_iters, used)
        state = _Chunk((Wc @ Gw) * Mc, Gw, ginv, Mc, V0, tol)
        state.run(max_iter, deadline)
        out[lo:hi] = state.X_out.to(torch.float64)
        iters = max(iters, state.iterations)
        worst = max(worst, float(state.residual_out.max()) if state.residual_out.numel() else 0.0)
        converged &= bool((state.residual_out <= tol).all())
    return RefitResult(out * mask, "cg", iters, worst, tol, converged, dual_iters)


def _inverse_diagonal(A: torch.Tensor) -> torch.Tensor:
    """Jacobi's ``1 / diag A`` (0 where the diagonal is not positive)."""
    diag = torch.diagonal(A)
    return torch.where(diag > 0, 1.0 / diag, torch.zeros((), dtype=A.dtype, device=A.device))


def _damped_inverse(G: torch.Tensor) -> Optional[torch.Tensor]:
    """``(G + δI)⁻¹`` by one Cholesky in ``G``'s dtype, ``δ`` from :data:`_DUAL_DAMP` of the mean
    diagonal raised ×100 per failure up to :data:`_DUAL_DAMP_MAX`; None if it never factorises."""
    scale = float(torch.diagonal(G).mean()) if G.numel() else 0.0
    if not scale > 0 or not math.isfinite(scale):
        return None
    damp = _DUAL_DAMP
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    while damp <= _DUAL_DAMP_MAX:
        L, info = torch.linalg.cholesky_ex(G + damp * scale * eye)
        if int(info) == 0:
            H = torch.cholesky_inverse(L)
            if bool(torch.isfinite(H).all()):
                return H
        damp *= 100.0
    return None


def _row_errors(W: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Each row's ``(w − v)ᵀ G (w − v)`` in the working dtype (one GEMM)."""
    D = W - V
    return ((D @ G) * D).sum(dim=1)


def _dual_start(W, G, H, hinv, mask, V0, tol, max_iter, deadline) -> tuple[torch.Tensor, int]:
    """The dual start of one chunk (module docstring): CG on ``H_PP y = w_P`` from
    ``y₀ = (G(w − v₀))_P``, then ``v = M ⊙ (W − Y H)`` in the rows where its error is below
    ``v₀``'s. Returns the start for the primal CG and the dual iterations run."""
    pruned = ~mask
    D0 = W - V0
    GD0 = D0 @ G
    start_errors = (GD0 * D0).sum(dim=1)
    Y0 = GD0 * pruned
    del D0, GD0
    state = _Chunk(W * pruned, H, hinv, pruned, Y0, tol)
    del Y0
    state.run(max_iter, deadline)
    V = (W - state.X_out @ H) * mask
    better = _row_errors(W, V, G) < start_errors
    better &= torch.isfinite(V).all(dim=1)
    return torch.where(better[:, None], V, V0), state.iterations


class _Chunk:
    """CG on ``A`` restricted to each row's support ``M``, for one chunk of rows: every row ``x``
    solves ``(A x)_M = b_M`` (``B``'s row ``b``, zero off ``M``) from ``X0``, Jacobi-scaled by
    ``ainv``; finished rows leave the active arrays. The primal refit is ``A = G``,
    ``B = M ⊙ (W G)``; the dual start ``A = H``, ``B = W ⊙ ¬M``, support ``¬M``."""

    def __init__(self, B, A, ainv, mask, X0, tol):
        self.A, self.ainv, self.tol = A, ainv, tol
        n = B.shape[0]
        self.M = mask.to(B.dtype)
        self.B = B
        self.X = X0 * self.M
        self.bnorm = (B.square() * ainv).sum(dim=1).sqrt()
        self.R = B - (self.X @ A) * self.M
        self.rows = torch.arange(n, device=B.device)
        self.X_out = torch.zeros_like(B)
        self.residual_out = torch.zeros(n, dtype=torch.float64, device=B.device)
        self.failed = torch.zeros(n, dtype=torch.int64, device=B.device)
        self.iterations = 0
        zero_target = self.bnorm == 0  # b = 0: x = 0 solves A_MM x = 0 exactly
        self.X[zero_target] = 0.0
        self.R[zero_target] = 0.0
        self.Z = self.R * ainv
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
        self.X_out[idx] = self.X[done]
        self.residual_out[idx] = self._relative(self.rho[done], done).to(torch.float64)
        keep = ~done
        for name in ("rows", "B", "X", "R", "P", "Z", "M", "bnorm", "rho", "failed"):
            setattr(self, name, getattr(self, name)[keep])

    def _fresh_residual(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = self.B[rows] - (self.X[rows] @ self.A) * self.M[rows]
        return R, (R.square() * self.ainv).sum(dim=1)

    def run(self, max_iter: int, deadline: float) -> None:
        while self.rows.numel() and self.iterations < max_iter and time.perf_counter() < deadline:
            Q = (self.P @ self.A) * self.M
            pq = (self.P * Q).sum(dim=1)
            stalled = ~(pq > 0) | ~torch.isfinite(pq)  # P in A_MM's null space, or rounding
            alpha = torch.where(stalled, torch.zeros_like(pq), self.rho / pq.where(~stalled, torch.ones_like(pq)))
            self.X += alpha[:, None] * self.P
            self.R -= alpha[:, None] * Q
            self.iterations += 1
            self.Z = self.R * self.ainv
            rho = (self.R * self.Z).sum(dim=1)
            restart = torch.zeros_like(stalled)
            claimed = (self._relative(rho) <= self.tol) | stalled
            if bool(claimed.any()):
                R, fresh = self._fresh_residual(claimed)
                rho[claimed] = fresh
                self.R[claimed] = R
                self.Z[claimed] = R * self.ainv
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
