r"""SparseGPT (Frantar & Alistarh 2023): one-shot OBS pruning with lazy block updates.

The published algorithm (reference: IST-DASLab/sparsegpt ``fasterprune``), for ``W``
(d_out × d_in) and ``H = G``:

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_{:j} = 0``;
2. damping ``H ← H + λI`` with ``λ = percdamp · mean(diag H)`` (``percdamp`` = 0.01);
3. ``U`` = upper Cholesky factor of ``H⁻¹`` (``UᵀU = H⁻¹``); row ``j`` of ``U`` holds the
   OBS update of the inputs after ``j`` once inputs ``< j`` are fixed;
4. columns in blocks of ``blocksize`` (128). At the start of a block the pruned set is chosen
   by the OBS saliency ``w²/U_jj²`` of the *current* (already updated) weights; then for each
   column ``j`` of the block, ``q = w ⊙ keep``, ``e = (w − q)/U_jj`` and
   ``W_{:, j+1:} −= e ⊗ U_{j, j+1:}``; after the block, the later columns get the lazy update
   ``W_{:, i2:} −= E · U_{i1:i2, i2:}``.

Mask selection, made exact for each pattern (the reference's rules with exact counts):

``nm:N:M``
    as the reference (``prunen = M−N``, ``prunem = M``): at each group's first column the
    ``M−N`` lowest saliencies of the group are pruned (blocks are a multiple of ``M``).
``per-row:K``
    the reference's adaptive per-block mask taken *per row*: block ``[i1, i2)`` prunes
    ``⌊P·i2/d⌋ − ⌊P·i1/d⌋`` lowest saliencies of each row (``P = d − K``), so every row
    prunes exactly ``P`` in total and every block the same fraction.
``unstructured:S``
    the reference's per-block threshold over the whole block, with the count made exact:
    block ``[i1, i2)`` prunes the ``⌊P·i2/d⌋ − ⌊P·i1/d⌋`` lowest saliencies of the block
    (``P`` = weights the layer must prune), so the total is exact.
``columns``
    not supported (the method has no column variant).

Damping makes this a heuristic for the undamped objective: no lower bound. The solver returns
its own OBS weights; ``finalize`` records their error as ``info["own_weights_objective"]``
and then refits the mask (``Params.refit``: exactly on small layers, else by CG from these
weights, never worse per row). If a Cholesky factorisation fails the damping is raised
×10 (up to ``max_damp_tries`` times); the value used is ``info["percdamp"]``.
"""
from __future__ import annotations

import torch

from layerprune.problems import LayerProblem
from layerprune.problems.patterns import topk_mask

from .base import Option, Params, Proposal, Solver, SolverError, Status
from ._baseline import working

__all__ = ["SparseGPT", "inverse_hessian_factor", "obs_prune"]


def inverse_hessian_factor(G: torch.Tensor, percdamp: float, tries: int = 4
                           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor of the damped inverse Hessian.

    Parameters
    ----------
    G : (d, d) PSD tensor (working dtype and device)
    percdamp : relative damping ``λ / mean(diag H)``
    tries : damping escalations (×10 each) before giving up

    Returns
    -------
    U : (d, d) upper-triangular, ``UᵀU = (H + λI)⁻¹`` with dead diagonals set to 1
    dead : (d,) bool, inputs with ``G_jj = 0``
    percdamp : the relative damping actually used
    """
    d = G.shape[0]
    H = G.clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(d, dtype=G.dtype, device=G.device)
    for t in range(tries + 1):
        pd = percdamp * 10.0 ** t
        L, info = torch.linalg.cholesky_ex(H + (pd * mean) * eye)
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, dead, pd
    raise SolverError(f"sparsegpt: Cholesky failed even with percdamp={percdamp * 10.0 ** tries:g}")


def _block_counts(total: int, d: int, i1: int, i2: int) -> int:
    """Pruned count of columns ``[i1, i2)`` when ``total`` is spread evenly over ``d`` columns."""
    return total * i2 // d - total * i1 // d


def _saliency(W1: torch.Tensor, dU: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``w² / U_jj²``. W1: (rows, c), dU: (c,). Returns (rows, c)."""
    return W1.square() / dU.square()[None, :]


def _block_prune(kind: str, S: torch.Tensor, prune: int) -> torch.Tensor:
    """Pruned set of one block from saliencies S (rows, c): ``prune`` lowest per row
    (``per-row``) or over the whole block (``unstructured``). Returns bool (rows, c)."""
    rows, c = S.shape
    if kind == "per-row":
        return ~topk_mask(S, c - prune)
    return ~topk_mask(S.reshape(1, -1), rows * c - prune).reshape(rows, c)


def obs_prune(W: torch.Tensor, U: torch.Tensor, kind: str, *, prune: int = 0, n: int = 0,
              m: int = 0, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The SparseGPT sweep over the columns.

    Parameters
    ----------
    W : (d_out, d_in) tensor, working copy (overwritten)
    U : (d_in, d_in) upper Cholesky factor of the damped ``H⁻¹``
    kind : "per-row" | "unstructured" | "nm"
    prune : pruned weights per row (per-row) or in the layer (unstructured)
    n, m : N:M pattern (``n`` kept of every ``m``)
    blocksize : columns per lazy-update block (rounded down to a multiple of ``m`` for nm)

    Returns
    -------
    keep : (d_out, d_in) bool mask
    Q : (d_out, d_in) updated weights, zero off ``keep``
    blocks : number of blocks
    """
    d_out, d = W.shape
    if kind == "nm":
        blocksize = max(m, blocksize // m * m)
    keep = torch.ones(d_out, d, dtype=torch.bool, device=W.device)
    blocks = 0
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        dU = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        if kind == "nm":
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        else:
            pruned = _block_prune(kind, _saliency(W1, dU), _block_counts(prune, d, i1, i2))
        for i in range(i2 - i1):
            if kind == "nm" and i % m == 0:
                pruned[:, i:i + m] = ~topk_mask(_saliency(W1[:, i:i + m], dU[i:i + m]), n)
            w = W1[:, i]
            err = torch.where(pruned[:, i], w, torch.zeros_like(w)) / dU[i]
            W1[:, i] = torch.where(pruned[:, i], torch.zeros_like(w), w)
            W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        keep[:, i1:i2] = ~pruned
        blocks += 1
    return keep, W * keep, blocks


class SparseGPT(Solver):
    """SparseGPT's OBS sweep (options ``percdamp`` = 0.01, ``blocksize`` = 128)."""

    name = "sparsegpt"
    option_specs = (
        Option("percdamp", float, 0.01, "damping added to G's diagonal, relative to its mean", low=0.0, low_open=True),
        Option("blocksize", int, 128, "columns per lazy-update block", low=1),
        Option("max_damp_tries", int, 4, "times the damping is multiplied by 10 when G is not positive definite",
               low=1),
    )
    description = "SparseGPT: OBS updates, damping, 128-column lazy blocks (Frantar & Alistarh 2023)"
    patterns = frozenset({"per-row", "nm", "unstructured"})

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        percdamp = self.option("percdamp")
        blocksize = self.option("blocksize")
        tries = self.option("max_damp_tries")
        device, dtype = working(problem, params)
        W = problem.W.to(device=device, dtype=dtype).clone()
        G = problem.G.to(device=device, dtype=dtype)
        U, dead, used = inverse_hessian_factor(G, percdamp, tries)
        W[:, dead] = 0.0
        p = problem.pattern
        if p.name == "nm":
            keep, Q, blocks = obs_prune(W, U, "nm", n=p.n, m=p.m, blocksize=blocksize)
        else:
            prune = problem.d_out * problem.d_in - problem.budget
            if p.name == "per-row":
                prune = problem.d_in - p.keep
            keep, Q, blocks = obs_prune(W, U, p.name, prune=prune, blocksize=blocksize)
        info = {"percdamp": used, "blocksize": blocksize, "dead_inputs": int(dead.sum())}
        return Proposal(mask=keep, weights=Q, status=Status.FEASIBLE, limit=None,
                        iterations=blocks, info=info)
