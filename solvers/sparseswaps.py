r"""SparseSwaps: exact best-improvement 1-swap local search on the ``mask`` objective.

Rows decouple under ``per-row`` and ``nm``. For a row ``w`` with kept set ``m``, the pruned
vector is ``u = w ⊙ (1 − m)``, its error ``uᵀGu`` and ``c = Gu``. Swapping a kept ``i``
(kept → pruned) with a pruned ``j`` (pruned → kept) changes the error by

.. math::
    Δ_{ij} = a_i + b_j − 2 w_i w_j G_{ij},\qquad
    a_i = w_i^2 G_{ii} + 2 w_i c_i,\quad b_j = w_j^2 G_{jj} − 2 w_j c_j,

and after the swap ``c ← c + w_i G_{:,i} − w_j G_{:,j}``.

Dense target (CONTRACT.md): the error of ``v = w − u`` is ``uᵀGu + 2uᵀg + k`` with
``g = (C − G)w`` (:meth:`LayerProblem.mask_linear`) and ``k`` constant. Pruning ``i`` adds
``2w_i g_i``, keeping ``j`` removes ``2w_j g_j``: the same ``Δ`` with ``c = Gu + g``, and the
same update of ``c`` (``g`` does not change with the mask). Each step applies, in every row
still improving, the pair of smallest ``Δ`` (``nm``: ``i`` and ``j`` in the same block of
``M``). A row stops when no pair improves its error by more than a round-off tolerance, i.e.
at a 1-swap local optimum: the search is monotone and never worsens its warm start.

Speed (where an implementation wins or loses, DESIGN.md §3): for ``per-row`` a step scores
exactly only the ``candidates × candidates`` pairs with the smallest screening values of each
row (:func:`_screened_best`: an exact lower bound on ``Δ`` from each input's largest
correlation); rows where those pairs do not improve and the bound cannot rule out the rest get
4× more candidates, up to all ``K × P`` pairs, so a row stops only when proved 1-swap optimal.
``nm`` scores all in-block pairs every step (``d·M`` per row). ``c`` is recomputed exactly
every ``refresh`` steps against drift, and a final float64 re-score reverts any row that
ended worse than its start (round-off in a float32 run), so the result is never worse than
the warm start.

No lower bound: a local search certifies nothing.
"""
from __future__ import annotations

import time

import torch

from layerprune.problems import LayerProblem
from layerprune.problems.patterns import NM

from .base import Option, Params, Proposal, Solver, Status
from ._baseline import working

__all__ = ["SparseSwaps", "swap_terms", "best_pairs", "best_block_pairs", "max_correlations"]

#: elements of one chunk of scored pairs (bounds the temporaries: a few tensors of this size)
FULL_CHECK_ELEMENTS = 1 << 21


def swap_terms(w: torch.Tensor, c: torch.Tensor, gdiag: torch.Tensor, kept: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruning and keeping costs of every entry, ``+inf`` where the move is not allowed.

    Parameters
    ----------
    w, c : (R, d) weights and ``c = G u`` of the rows
    gdiag : (d,) diagonal of ``G``
    kept : (R, d) bool current mask

    Returns
    -------
    a : (R, d) ``w² G_ii + 2 w c`` on kept entries (cost of pruning ``i``), ``+inf`` elsewhere
    b : (R, d) ``w² G_jj − 2 w c`` on pruned entries (cost of keeping ``j``), ``+inf`` elsewhere
    """
    q = w * w * gdiag
    t = 2.0 * w * c
    inf = torch.full((), float("inf"), dtype=w.dtype, device=w.device)
    return torch.where(kept, q + t, inf), torch.where(kept, inf, q - t)


def best_pairs(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, G: torch.Tensor,
               I: torch.Tensor, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best swap among candidate pairs ``I × J`` of each row.

    Parameters
    ----------
    a, b, w : (R, d) from :func:`swap_terms` and the weights
    G : (d, d) Gram matrix
    I, J : (R, s) and (R, t) long candidate indices (kept / pruned)

    Returns
    -------
    delta, i, j : (R,) the smallest ``Δ_ij`` of each row and its pair
    """
    wI, wJ = torch.gather(w, 1, I), torch.gather(w, 1, J)
    D = (torch.gather(a, 1, I)[:, :, None] + torch.gather(b, 1, J)[:, None, :]
         - 2.0 * (wI[:, :, None] * wJ[:, None, :]) * G[I[:, :, None], J[:, None, :]])
    delta, flat = D.reshape(D.shape[0], -1).min(dim=1)
    t = J.shape[1]
    i = torch.gather(I, 1, (flat // t)[:, None])[:, 0]
    j = torch.gather(J, 1, (flat % t)[:, None])[:, 0]
    return delta, i, j


def best_block_pairs(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, G_blocks: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best in-block swap of each row for ``nm:N:M``.

    Parameters
    ----------
    a, b, w : (R, d) as in :func:`best_pairs`
    G_blocks : (d/M, M, M) diagonal blocks of ``G``

    Returns
    -------
    delta, i, j : (R,) the smallest ``Δ_ij`` over pairs inside one block, and its pair
    """
    R, d = w.shape
    nb, M, _ = G_blocks.shape
    ab, bb, wb = (x.reshape(R, nb, M) for x in (a, b, w))
    D = ab[..., :, None] + bb[..., None, :] - 2.0 * (wb[..., :, None] * wb[..., None, :]) * G_blocks
    delta, flat = D.reshape(R, -1).min(dim=1)
    blk, rest = flat // (M * M), flat % (M * M)
    return delta, blk * M + rest // M, blk * M + rest % M


def max_correlations(G: torch.Tensor) -> torch.Tensor:
    """``g_i = max_{j≠i} |G_ij| / sqrt(G_ii G_jj)`` (0 for dead inputs). G: (d, d) → (d,)."""
    s = torch.diagonal(G).clamp_min(0.0).sqrt()
    denom = s[:, None] * s[None, :]
    r = torch.where(denom > 0, G.abs() / torch.where(denom > 0, denom, torch.ones_like(denom)),
                    torch.zeros_like(G))
    r.fill_diagonal_(0.0)
    return r.max(dim=1).values if G.shape[0] > 1 else torch.zeros_like(s)


def _screened_best(a, b, w, G, kept, sa, sb, thresh, cand) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An improving swap of each row if one exists, else the row's proof that none does.

    Screening bound: with ``α = |w|·sqrt(diag G)`` and ``g`` from :func:`max_correlations`,
    ``2|w_i w_j G_ij| = 2α_iα_j r_ij ≤ r_ij(α_i² + α_j²) ≤ g_iα_i² + g_jα_j²``, hence
    ``Δ_ij ≥ s^a_i + s^b_j`` with ``s^a = a − gα²`` (kept) and ``s^b = b − gα²`` (pruned).
    The ``t`` smallest ``s^a`` and ``s^b`` of a row are scored exactly (``t × t`` pairs); if
    none improves, every pair left out has ``Δ ≥ s^a_(t+1) + min s^b`` (or the symmetric
    bound), so when that is ≥ ``thresh`` the row is proved 1-swap optimal; otherwise ``t``
    grows ×4 for those rows (up to all of K and P).

    Parameters
    ----------
    a, b, w, sa, sb : (R, d); kept : (R, d) bool; G : (d, d); thresh : (R,); cand : first ``t``

    Returns
    -------
    delta, i, j : (R,) the best scored pair (``+inf`` delta for rows proved optimal)
    """
    R, d = w.shape
    k = int(kept[0].sum()) if R else 0
    p = d - k
    delta = torch.full((R,), float("inf"), dtype=w.dtype, device=w.device)
    i = torch.zeros(R, dtype=torch.long, device=w.device)
    j = torch.zeros_like(i)
    rows = torch.arange(R, device=w.device)
    t = cand
    while rows.numel() and k and p:
        ti, tj = min(t, k), min(t, p)
        va, I = torch.topk(sa[rows], min(ti + 1, k), dim=1, largest=False)
        vb, J = torch.topk(sb[rows], min(tj + 1, p), dim=1, largest=False)
        chunk = max(1, FULL_CHECK_ELEMENTS // (ti * tj))
        parts = [best_pairs(a[rows[s:s + chunk]], b[rows[s:s + chunk]], w[rows[s:s + chunk]], G,
                            I[s:s + chunk, :ti], J[s:s + chunk, :tj]) for s in range(0, rows.numel(), chunk)]
        dr, ir, jr = (torch.cat(x) for x in zip(*parts))
        delta[rows], i[rows], j[rows] = dr, ir, jr
        # rows whose left-out pairs could still improve: grow their candidate sets
        left_a = va[:, ti] + vb[:, 0] if ti < k else torch.full_like(dr, float("inf"))
        left_b = vb[:, tj] + va[:, 0] if tj < p else torch.full_like(dr, float("inf"))
        unsure = ~(dr < thresh[rows]) & ((left_a < thresh[rows]) | (left_b < thresh[rows]))
        rows = rows[unsure]
        t *= 4
    return delta, i, j


class SparseSwaps(Solver):
    """Best-improvement 1-swap local search on the ``mask`` objective (per-row and N:M).

    Options
    -------
    candidates : int (default 16) — pairs scored first per row per step (``per-row``)
    refresh : int (default 50) — steps between exact recomputations of ``c = G u``
    init_solver : str (default ``"wanda"``) — warm start when no ``init`` mask is given
    """

    name = "sparseswaps"
    option_specs = (
        Option("candidates", int, 16, "pairs scored first per row per step (per-row)", low=1),
        Option("refresh", int, 50, "steps between exact recomputations of c = G u", low=1),
    )
    description = "SparseSwaps: best-improvement 1-swap local search on the mask objective"
    targets = frozenset({"mask"})  # the target's linear term enters c (see the module docstring)
    patterns = frozenset({"per-row", "nm"})
    objectives = frozenset({"mask"})
    uses_init = True
    default_init = "wanda"

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        start_time = time.perf_counter()
        deadline = params.deadline(start_time)
        device, dtype = working(problem, params)
        cand = self.option("candidates")
        refresh = self.option("refresh")
        if init is None:
            init = self.start_mask(problem, params)
        if init is None:  # init_solver none, or one that cannot take it: Wanda's mask
            from .registry import make_solver
            init = make_solver("wanda").propose(problem, params).mask
        start_mask = init.to(device)
        W = problem.W.to(device=device, dtype=dtype)
        G = problem.G.to(device=device, dtype=dtype)
        gdiag = torch.diagonal(G).clone()
        gcorr = max_correlations(G)
        tol = (1e-12 if dtype == torch.float64 else 1e-5)
        nm = problem.pattern if isinstance(problem.pattern, NM) else None
        G_blocks = None
        if nm is not None:
            nb = problem.d_in // nm.m
            G_blocks = torch.stack([G[s * nm.m:(s + 1) * nm.m, s * nm.m:(s + 1) * nm.m] for s in range(nb)])

        kept = start_mask.clone()
        lin = problem.mask_linear()  # (d_out, d_in) or None: the dense target's linear term
        lin = None if lin is None else lin.to(device=device, dtype=dtype)
        C = (W * ~kept) @ G if lin is None else (W * ~kept) @ G + lin
        active = torch.arange(problem.d_out, device=device)
        steps = swaps = 0
        limit, history = None, []
        max_iter = params.max_iter if params.max_iter is not None else 10 * problem.d_in
        try:
            while active.numel():
                if steps >= max_iter:
                    limit = "iterations"
                    break
                if time.perf_counter() > deadline:
                    limit = "time"
                    break
                if steps and steps % refresh == 0:
                    C[active] = (W[active] * ~kept[active]) @ G
                    if lin is not None:
                        C[active] += lin[active]
                w, c, m = W[active], C[active], kept[active]
                a, b = swap_terms(w, c, gdiag, m)
                err = ((w * ~m) * c).sum(dim=1)  # uᵀGu (uᵀGu + uᵀg with a target: a scale only)
                thresh = -tol * err.abs().clamp_min(torch.finfo(dtype).tiny)
                if nm is not None:
                    delta, i, j = best_block_pairs(a, b, w, G_blocks)
                else:
                    sq = gcorr * w * w * gdiag
                    delta, i, j = _screened_best(a, b, w, G, m, a - sq, b - sq, thresh, cand)
                improve = delta < thresh
                rows, i, j = active[improve], i[improve], j[improve]
                if rows.numel():
                    wi, wj = W[rows, i], W[rows, j]
                    kept[rows, i] = False
                    kept[rows, j] = True
                    C[rows] += wi[:, None] * G[i] - wj[:, None] * G[j]  # G symmetric: rows = columns
                    swaps += int(rows.numel())
                active = rows
                steps += 1
                if steps % refresh == 0 or not active.numel():
                    event = {"iteration": steps, "active_rows": int(active.numel()), "swaps": swaps}
                    history.append(event)
                    if callback is not None and callback(dict(event)):
                        limit = "interrupted"
                        break
        except KeyboardInterrupt:
            limit = "interrupted"

        # never worse than the warm start: revert rows that round-off made worse (float64 check)
        before, after = problem.row_errors(start_mask), problem.row_errors(kept)
        worse = after > before
        kept[worse] = start_mask[worse]
        info = {"swaps": swaps, "reverted_rows": int(worse.sum()), "start_objective": float(before.sum())}
        return Proposal(mask=kept, status=Status.FEASIBLE, limit=limit, iterations=steps,
                        history=history, info=info)
