r"""``alternating``: structured (column) pruning by a penalty method and alternating minimisation.

After SPAP (Hu & Yuan, arXiv 2505.03373; DESIGN.md §3): ``min ‖X(W − V)ᵀ‖²`` over ``V`` with
the pruned set's columns zero and ``K`` columns kept, the binary selection relaxed by a penalty
on the pruned columns' weights that grows on a schedule. The steps below are derived here (the
paper's equations are not public in a readable form).

The model, on the unit-diagonal problem (``G̃ = D⁻¹GD⁻¹``, ``W̃ = W·D``, ``D = diag(G)^{1/2}``;
both objectives unchanged, :meth:`LayerProblem.scaled`), with ``s ∈ {0,1}^{d_in}``, ``1ᵀs = K``::

    F_ρ(V, s) = f(V) + ρ Σ_j (1 − s_j) ‖Ṽ_{:,j}‖²,   f(V) = tr((W̃ − Ṽ) G̃ (W̃ − Ṽ)ᵀ).

In the original variables the penalty is ``ρ Σ_j (1 − s_j) G_jj ‖V_{:,j}‖²``: weighting by
``G_jj`` makes it invariant to rescaling an input channel (and ``W → cW`` scales ``F`` by
``c²``, so the iterates are scale-equivariant). As ``ρ → ∞`` the minimiser over ``V`` for a
fixed ``s`` tends to the exact refit on the kept columns, so ``F_∞`` is the problem.

**V-step** (``s`` fixed): ``F`` is a convex quadratic in ``Ṽ``; its gradient
``2(Ṽ − W̃)G̃ + 2ρ Ṽ Δ`` with ``Δ = diag(1 − s)`` vanishes at

    Ṽ (G̃ + ρΔ) = W̃G̃ =: B   ⇒   Ṽ = B (G̃ + ρΔ)⁻¹           (:func:`weight_step`)

one ``d_in × d_in`` Cholesky shared by all rows: ``d_in³/3`` flop, in float64 (the real Grams'
``λ_min/λ_max`` reach 1e-7, DESIGN.md: float32 cannot factor them reliably; the factor of a
``d_in × d_in`` matrix costs as much as 1/(6·d_out/d_in) of the solve below, so float64 here is
cheap), then two triangular solves with the ``d_out`` right-hand sides in the working dtype,
``2·d_out·d_in²`` flop. If the kept block is numerically singular (a squared pivot at or below
1e-12 of the largest diagonal entry), ``εI`` (ε = 10^k·mean diag, k = −12, −11, …, the smallest
that factors) is added and ``info["ridge_added"]`` records the largest. At the minimiser ``F_ρ = ⟨W̃, B⟩ − ⟨Ṽ, B⟩`` (expand ``f`` and use
the stationarity equation), so the history's penalised objective costs ``O(d_out·d_in)``.

**s-step** (``Ṽ`` fixed): only the penalty depends on ``s``; it is
``ρ(Σ_j ‖Ṽ_j‖² − Σ_j s_j ‖Ṽ_j‖²)``, minimised over ``1ᵀs = K`` exactly by keeping the ``K``
columns of largest ``‖Ṽ_j‖²`` (:func:`selection_step`, score ``norm``, ``O(d_out·d_in)``). Score
``obs`` instead keeps the largest ``‖Ṽ_j‖² / [(G̃ + ρΔ)⁻¹]_jj`` (the Optimal-Brain-Surgeon cost of
zeroing column ``j`` under the V-step's Hessian); it needs the inverse's diagonal, ``d_in³``
flop more per step. docs/DECISIONS.md records which is better on real layers.

**Schedule**: ``ρ_0 = rho0`` (relative to the unit diagonal of ``G̃``), one V-step and one
s-step per outer iteration, then ``ρ ← growth·ρ``. The run stops once the selection has not
changed for ``patience`` outer iterations and the pruned columns hold at most ``tol`` of
``‖Ṽ‖²`` (the relaxation has become binary), or at ``iterations`` V-steps (``Params.max_iter``
caps them), the time limit or a callback. The start: ``s`` from ``init`` (or ``init_solver``'s
mask, default Wanda's column mask); with none, the top-``K`` column norms of ``W̃``.

**Polish** (``swaps`` > 0): exact single-column exchanges on the kept set ``S``
(:class:`ExchangeState`, float64). With ``P = G̃_SS⁻¹`` (zero-padded to ``d_in × d_in``), refit
``Ṽ = B P``, residual gradient ``R = (W̃ − Ṽ)G̃`` and Schur complement ``Σ = G̃ − G̃ P G̃``, the
exact change of the objective is ``+‖Ṽ_{:,j}‖²/P_jj`` for dropping ``j ∈ S`` and
``−‖R_{:,i}‖²/Σ_ii`` for adding ``i ∉ S``; each move is a rank-one update of ``P``, ``Ṽ``, ``R``,
``Σ`` (``O(d_in² + d_out·d_in)``). An exchange drops the cheapest kept column, then adds the
best column; it is kept only when the added column is not the dropped one (then it lowers the
objective strictly: the dropped column is itself a candidate, with gain equal to its cost), else
the drop is undone and the next cheapest is tried (``3`` tries); none moving ends the polish (a
local optimum of these exchanges). ``swaps`` caps the exchanges (limit ``iterations``), the time
limit stops them (limit ``time``); ``Params.max_iter`` caps the V-steps only.
Set-up: one Cholesky of ``G̃_SS`` and ``O(d_in³)`` products in float64. The exchanges use the
kept block's inverse; where ``G̃_SS`` is numerically singular the polish is skipped, and candidate
columns with ``Σ_ii ≤ 1e-10`` (nearly in the span of ``S``) are never added. The polished set is
returned only if its exact objective (one shared Cholesky, :func:`columns_objective`) is lower.

History: one event per V-step with ``iteration``, ``rho``, ``penalised_objective`` (``F_ρ`` at
the V-step's minimiser, in the scaled problem), ``support_change`` (columns that entered or left),
``pruned_share`` (of ``‖Ṽ‖²``) and ``seconds``; ``info`` has the final ``rho``, ``ridge_added``,
``stopped`` and, after a polish, ``exchanges``, ``polish_stopped``, ``polish_kept``. Memory:
``W̃``, ``B``, ``Ṽ`` (d_out × d_in, working dtype) and ``G̃`` with its factor (d_in × d_in,
float64); the polish adds ``P``, ``Σ`` (d_in × d_in) and ``Ṽ``, ``R`` (d_out × d_in) in float64.

The solver returns the kept columns; the solver contract's refit gives the weights (a mask
whose rows share their support is refitted exactly, one ``K × K`` Cholesky in float64). A
heuristic: no lower bound, status ``feasible``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from layerprune.problems import LayerProblem

from .base import Option, Params, Proposal, Solver, Status, stop_reason
from ._baseline import working

__all__ = ["Alternating", "weight_step", "selection_step", "penalised_objective",
           "columns_objective", "ExchangeState", "polish"]

#: candidates whose Schur complement Σ_ii (relative to the unit diagonal) is at or below this are not added
SCHUR_FLOOR = 1e-10
#: squared Cholesky pivots at or below this (relative to the largest diagonal entry) count as singular
PIVOT_FLOOR = 1e-12
#: drops tried per exchange before the polish stops
EXCHANGE_TRIES = 3


def _cholesky(A: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of a symmetric PSD ``A`` (float64), adding the smallest ``εI``
    (ε = 1e-12, 1e-11, …, relative to mean diag A) that makes it factor with every squared pivot
    above ``1e-12·max diag A`` (round-off lets a singular matrix "factor" with tiny pivots).
    Returns (L, ε)."""
    scale = float(torch.diagonal(A).mean().clamp_min(1e-300))
    top = float(torch.diagonal(A).amax())
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eps = 0.0
    for k in range(-12, 1):
        L, info = torch.linalg.cholesky_ex(A + eps * eye)
        if int(info) == 0 and float(torch.diagonal(L).amin() ** 2) > PIVOT_FLOOR * top:
            return L, eps
        eps = scale * 10.0 ** k
    raise torch.linalg.LinAlgError("the V-step matrix does not factor even with a ridge of its mean diagonal")


def weight_step(B: torch.Tensor, G64: torch.Tensor, pruned: torch.Tensor, rho: float) -> tuple[torch.Tensor, float]:
    """The V-step ``Ṽ = B (G̃ + ρΔ)⁻¹``, ``Δ = diag(pruned)``: one shared Cholesky.

    Parameters
    ----------
    B : (d_out, d_in) ``W̃G̃`` in the working dtype
    G64 : (d_in, d_in) ``G̃`` in float64 on the working device
    pruned : (d_in,) bool, the columns ``1 − s``
    rho : penalty ρ ≥ 0

    Returns
    -------
    (Ṽ (d_out, d_in) in B's dtype, ε the ridge that had to be added (0 if none)).
    """
    A = G64 + torch.diag(rho * pruned.to(G64.dtype))
    L, eps = _cholesky(A)
    L = L.to(B.dtype)
    # Ṽ A = B ⇔ A Ṽᵀ = Bᵀ (A symmetric) ⇔ L (Lᵀ Ṽᵀ) = Bᵀ
    Y = torch.linalg.solve_triangular(L, B.T, upper=False)
    return torch.linalg.solve_triangular(L.T, Y, upper=True).T, eps


def selection_step(V: torch.Tensor, keep: int, inv_diag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The s-step: keep the ``keep`` columns of largest ``‖Ṽ_j‖²`` (divided by ``inv_diag`` for
    the ``obs`` score). V: (d_out, d_in). Returns (d_in,) bool, ties to the lower index."""
    score = (V.to(torch.float64) ** 2).sum(dim=0)
    if inv_diag is not None:
        score = score / inv_diag.to(score)
    order = torch.sort(-score, stable=True).indices[:keep]
    kept = torch.zeros(V.shape[1], dtype=torch.bool, device=V.device)
    kept[order] = True
    return kept


def penalised_objective(W: torch.Tensor, B: torch.Tensor, V: torch.Tensor) -> float:
    """``F_ρ`` at the V-step's minimiser: ``⟨W̃, B⟩ − ⟨Ṽ, B⟩`` (all (d_out, d_in))."""
    return float(((W - V).to(torch.float64) * B.to(torch.float64)).sum())


def columns_objective(W64: torch.Tensor, G64: torch.Tensor, kept: torch.Tensor) -> Optional[float]:
    """The exact ``reconstruct`` objective of keeping the columns ``kept`` (None if ``G_SS``
    does not factor): ``tr(W G Wᵀ) − ‖L⁻¹ (WG)_{:,S}ᵀ‖²`` with ``G_SS = LLᵀ``."""
    idx = torch.nonzero(kept).flatten()
    total = float(((W64 @ G64) * W64).sum())
    if idx.numel() == 0:
        return total
    L, info = torch.linalg.cholesky_ex(G64[idx][:, idx])
    if int(info) != 0:
        return None
    Y = torch.linalg.solve_triangular(L, (W64 @ G64[:, idx]).T, upper=False)
    return max(0.0, total - float((Y ** 2).sum()))


@dataclass
class ExchangeState:
    """The kept set and what its exact moves need (float64, unit-diagonal problem).

    kept : (d_in,) bool; P : (d_in, d_in) ``G̃_SS⁻¹`` zero-padded; V : (d_out, d_in) refit
    ``B P``; R : (d_out, d_in) ``(W̃ − Ṽ)G̃``; S : (d_in, d_in) Schur complement ``G̃ − G̃PG̃``;
    G : (d_in, d_in) ``G̃``.
    """

    kept: torch.Tensor
    P: torch.Tensor
    V: torch.Tensor
    R: torch.Tensor
    S: torch.Tensor
    G: torch.Tensor

    @classmethod
    def start(cls, W64: torch.Tensor, G64: torch.Tensor, kept: torch.Tensor) -> Optional["ExchangeState"]:
        """The state of ``kept``, or None where ``G̃_SS`` is numerically singular."""
        idx = torch.nonzero(kept).flatten()
        L, info = torch.linalg.cholesky_ex(G64[idx][:, idx])
        if int(info) != 0 or float(torch.diagonal(L).amin() ** 2) <= SCHUR_FLOOR:
            return None
        P = torch.zeros_like(G64)
        P[idx[:, None], idx[None, :]] = torch.cholesky_inverse(L)
        B = W64 @ G64
        V = B @ P
        GP = G64 @ P
        return cls(kept.clone(), P, V, B - V @ G64, G64 - GP @ G64, G64)

    def drop_costs(self) -> torch.Tensor:
        """(d_in,) exact increase of the objective from dropping each kept column (inf elsewhere)."""
        cost = (self.V ** 2).sum(dim=0) / torch.diagonal(self.P).clamp_min(1e-300)
        return torch.where(self.kept, cost, torch.full_like(cost, float("inf")))

    def add_gains(self) -> torch.Tensor:
        """(d_in,) exact decrease from adding each pruned column (−inf where kept or Σ_ii too small)."""
        sigma = torch.diagonal(self.S)
        gain = (self.R ** 2).sum(dim=0) / sigma.clamp_min(1e-300)
        ok = ~self.kept & (sigma > SCHUR_FLOOR)
        return torch.where(ok, gain, torch.full_like(gain, -float("inf")))

    def drop(self, j: int) -> None:
        """Remove column ``j`` from the kept set (rank-one downdate)."""
        m = self.P[:, j].clone()
        mj = float(m[j])
        Gm = self.G @ m
        vj = self.V[:, j].clone()
        self.P.addr_(m, m, alpha=-1.0 / mj)
        self.V.addr_(vj, m, alpha=-1.0 / mj)
        self.R.addr_(vj, Gm, alpha=1.0 / mj)
        self.S.addr_(Gm, Gm, alpha=1.0 / mj)
        self.kept[j] = False
        self.P[j, :], self.P[:, j], self.V[:, j] = 0.0, 0.0, 0.0

    def add(self, i: int) -> None:
        """Add column ``i`` to the kept set (rank-one update)."""
        z = -self.P @ self.G[:, i]
        z[i] += 1.0
        col = self.S[:, i].clone()
        sii = float(col[i])
        ri = self.R[:, i].clone()
        self.P.addr_(z, z, alpha=1.0 / sii)
        self.V.addr_(ri, z, alpha=1.0 / sii)
        self.R.addr_(ri, col, alpha=-1.0 / sii)
        self.S.addr_(col, col, alpha=-1.0 / sii)
        self.kept[i] = True


def polish(W64: torch.Tensor, G64: torch.Tensor, kept: torch.Tensor, swaps: int, deadline: float
           ) -> tuple[torch.Tensor, int, str]:
    """Up to ``swaps`` exact exchanges from ``kept`` (module docstring).

    Returns (kept, exchanges made, why it stopped: ``local optimum``, ``swaps``, ``time`` or
    ``singular``, the last when ``G̃_SS`` is numerically singular and nothing was tried).
    """
    if bool(kept.all()) or not bool(kept.any()):
        return kept, 0, "local optimum"  # nothing to exchange
    state = ExchangeState.start(W64, G64, kept)
    if state is None:
        return kept, 0, "singular"
    made = 0
    while made < swaps:
        if time.perf_counter() > deadline:
            return state.kept, made, "time"
        if not _exchange(state):
            return state.kept, made, "local optimum"
        made += 1
    return state.kept, made, "swaps"


def _exchange(state: ExchangeState) -> bool:
    """One exchange: drop the cheapest kept column, add the best; True if the set changed
    (the objective then fell), else every tried drop was undone."""
    for j in torch.argsort(state.drop_costs())[:EXCHANGE_TRIES].tolist():
        if not bool(state.kept[j]):
            return False
        state.drop(j)
        i = int(torch.argmax(state.add_gains()))
        state.add(i)
        if i != j:
            return True
    return False


class _Setup(NamedTuple):
    """The fixed data: ``W̃``, ``B = W̃G̃`` (working dtype), ``G̃`` (float64), ``d`` (float64), K."""

    W: torch.Tensor
    B: torch.Tensor
    G64: torch.Tensor
    d: torch.Tensor
    keep: int


def _set_up(problem: LayerProblem, device, dtype) -> _Setup:
    scaled, d = problem.scaled()
    G64 = scaled.G.to(device=device, dtype=torch.float64)
    W = scaled.W.to(device=device, dtype=dtype)
    B = (scaled.W.to(device=device, dtype=torch.float64) @ G64).to(dtype)
    return _Setup(W, B, G64, d.to(device), problem.pattern.keep)


class Alternating(Solver):
    """Penalty method with alternating weight and selection steps (``columns``, reconstruct).

    Options
    -------
    rho0 : float (default 1e-3) — first ρ, relative to the unit diagonal of G̃
    growth : float (default 3.0) — ρ is multiplied by it after every outer iteration
    iterations : int (default 60) — V-steps at most (``Params.max_iter`` caps them)
    patience : int (default 3) — outer iterations without a selection change before stopping
    tol : float (default 1e-6) — pruned share of ``‖Ṽ‖²`` under which the relaxation counts as binary
    score : ``norm`` (default) or ``obs`` — the s-step's column score
    swaps : int (default 1000) — exact exchanges of the final polish at most (0: none)
    init_solver : str (default ``"wanda"``)
    """

    name = "alternating"
    description = "SPAP-style penalty method: shared-Cholesky weight step, column selection step, exact refit"
    option_specs = (
        Option("rho0", float, 1e-3, "first penalty ρ, relative to the unit diagonal of G̃", low=0.0, low_open=True),
        Option("growth", float, 3.0, "ρ is multiplied by this after every outer iteration", low=1.0, low_open=True),
        Option("iterations", int, 60, "weight steps at most (Params.max_iter caps them)", low=1),
        Option("patience", int, 3, "outer iterations with an unchanged selection before stopping", low=1),
        Option("tol", float, 1e-6, "pruned share of the weights' squared norm counted as zero", low=0.0),
        Option("score", str, "norm", "selection score: norm = exact penalty minimiser, obs = OBS cost",
               choices=("norm", "obs")),
        Option("swaps", int, 1000, "exact single-column exchanges of the final polish at most (0: none)", low=0),
    )
    patterns = frozenset({"columns"})
    objectives = frozenset({"reconstruct"})
    uses_init = True
    default_init = "wanda"

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        started = time.perf_counter()
        deadline = params.deadline(started)
        iters = self.option("iterations")
        capped = params.max_iter is not None and params.max_iter < iters
        iters = params.max_iter if capped else iters
        if init is None:
            init = self.start_mask(problem, params)
        device, dtype = working(problem, params)
        su = _set_up(problem, device, dtype)
        kept = selection_step(su.W, su.keep) if init is None else init[0].to(device).clone()
        rho, growth, obs = self.option("rho0"), self.option("growth"), self.option("score") == "obs"
        history, still, limit, t, ridge = [], 0, ("iterations" if capped else None), 0, 0.0
        for t in range(iters):
            V, eps = weight_step(su.B, su.G64, ~kept, rho)
            ridge = max(ridge, eps)
            inv_diag = _inverse_diagonal(su.G64, ~kept, rho) if obs else None
            new = selection_step(V, su.keep, inv_diag)
            changes = int((new ^ kept).sum())
            share = float((V[:, ~kept].to(torch.float64) ** 2).sum() / (V.to(torch.float64) ** 2).sum().clamp_min(1e-300))
            event = {"iteration": t + 1, "rho": rho, "penalised_objective": penalised_objective(su.W, su.B, V),
                     "support_change": changes, "pruned_share": share,
                     "seconds": time.perf_counter() - started}
            history.append(event)
            kept, still = new, (still + 1 if changes == 0 else 0)
            if still >= self.option("patience") and share <= self.option("tol"):
                limit = None
                break
            stop = stop_reason(event, callback, deadline)
            if stop is not None:
                limit = stop
                break
            rho *= growth
        info = {"rho": rho, "ridge_added": ridge, "stopped": limit or "settled"}
        W64 = su.W.to(torch.float64)
        if self.option("swaps") > 0 and limit not in ("time", "interrupted"):
            kept, info, polish_limit = _polished(W64, su.G64, kept, self.option("swaps"), deadline, info)
            limit = limit or polish_limit
        mask = kept.expand(problem.d_out, problem.d_in).clone()
        return Proposal(mask=mask, weights=None, status=Status.FEASIBLE, limit=limit,
                        iterations=t + 1, history=history, info=info)


def _polished(W64, G64, kept, swaps, deadline, info) -> tuple[torch.Tensor, dict, Optional[str]]:
    """The polish's kept set where its exact objective is lower, ``info`` with what it did, and
    the limit it hit (``time``, ``iterations`` for the swap cap, or None)."""
    new, made, stop = polish(W64, G64, kept, swaps, deadline)
    before, after = columns_objective(W64, G64, kept), columns_objective(W64, G64, new)
    better = made > 0 and before is not None and after is not None and after < before
    info = dict(info, exchanges=made, polish_stopped=stop, polish_kept=better)
    limit = {"time": "time", "swaps": "iterations"}.get(stop)
    return (new if better else kept), info, limit


def _inverse_diagonal(G64: torch.Tensor, pruned: torch.Tensor, rho: float) -> torch.Tensor:
    """``diag((G̃ + ρΔ)⁻¹)`` (d_in,) float64, for the ``obs`` score."""
    L, _ = _cholesky(G64 + torch.diag(rho * pruned.to(G64.dtype)))
    return torch.diagonal(torch.cholesky_inverse(L))
