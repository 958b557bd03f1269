r"""Model building and GSCIP solving for the ``ortools`` backend (numpy + ortools only).

The backend (:mod:`ortools_mathopt`) runs :func:`run` in a child process started from this
file's path, because OR-Tools 9.15 and highspy (loaded by ``import cvxpy``) ship different
``libhighs.so.1`` libraries with the same soname: whichever is loaded first breaks the
other in the same process. Nothing here imports torch or layerprune, so the child starts in
about a second (once: it serves later solves too); ``ortools`` is imported inside the functions.

Protocol (child, kept alive between solves): pickled ``job`` dicts on stdin; for each, one
pickled result dict per model on stdout, then ``{"done": True}`` (solver logs go to stderr).

Maths: see :mod:`ortools_mathopt`. A model is ``min Σ_b (‖y_b‖² + D_bᵀp_b)`` with
``y_b = M_bᵀ p_b`` over binaries ``p`` (1 = pruned) and cardinality groups ``Σ_{i∈g} p_i = c_g``.
"""
from __future__ import annotations

import math
import os
import pickle
import sys
import time
from datetime import timedelta

import numpy as np

#: bound margin, in units of the normaliser s (the starting mask's objective)
SAFETY = 1e-6
#: SCIP feasibility tolerance used in every model
FEASTOL = 1e-8
#: relative eigenvalue cut-off of the factorisation
EIG_RTOL = 1e-12
#: largest model (binaries) whose start is improved by 1-swap local search
LS_MAX_VARS = 2048
#: extra solves, re-normalised by the optimum found, when it is far below the start
RESOLVES = 2


def factor_block(H: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Split a PSD ``H`` (n, n) into ``diag(D) + M Mᵀ`` with the largest ``D = μ·diag(H)``.

    ``μ = max(0, λ_min(diag(H)^{-½} H diag(H)^{-½}))`` over the entries with ``H_ii > 0``.
    Eigenvalues of ``H − diag(D)`` below ``EIG_RTOL·λ_max`` are dropped (a PSD remainder,
    so the model under-estimates); negative ones ``ν`` are clipped and ``|ν_min|·n`` is
    returned as what the bound must give up (``‖p‖² ≤ n`` on binaries).

    Returns
    -------
    M : (n, r) float64, D : (n,) float64, clip : float
    """
    n = H.shape[0]
    h = np.clip(np.diag(H), 0.0, None)
    live = h > 0.0
    D = np.zeros(n)
    if live.any():
        s = 1.0 / np.sqrt(h[live])
        mu = max(0.0, float(np.linalg.eigvalsh(H[np.ix_(live, live)] * s[:, None] * s[None, :])[0]))
        D[live] = mu * h[live]
    ev, U = np.linalg.eigh(H - np.diag(D))
    keep = ev > EIG_RTOL * max(float(ev[-1]), 0.0)
    M = U[:, keep] * np.sqrt(ev[keep])[None, :]
    return M, D, abs(min(0.0, float(ev[0]))) * n


def blocks_of(W: np.ndarray, G: np.ndarray, kind: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Blocks ``(index, M, D, clip)`` of a (scaled) problem on ``W`` (rows, d_in).

    Variables are numbered row-major (``r·d_in + i``); for ``columns`` there is one pruned
    indicator per column and ``H = G ⊙ WᵀW``.
    """
    d_in = W.shape[1]
    if kind == "columns":
        return [(np.arange(d_in), *factor_block(G * (W.T @ W)))]
    return [(r * d_in + np.arange(d_in), *factor_block(G * np.outer(W[r], W[r]))) for r in range(W.shape[0])]


def build(n_vars: int, blocks, groups, hint: np.ndarray):
    """The MathOpt model, its binaries ``p`` and model parameters carrying ``hint`` (n_vars,)."""
    from ortools.math_opt.python import mathopt

    model = mathopt.Model(name="layerprune-mask")
    p = [model.add_binary_variable(name=f"p{i}") for i in range(n_vars)]
    for idx, count in groups:
        model.add_linear_constraint(mathopt.fast_sum(p[i] for i in idx) == count)
    hint_values = {p[i]: float(hint[i]) for i in range(n_vars)}
    quad, lin = [], []
    for b, (index, M, D, _) in enumerate(blocks):
        pv = [p[i] for i in index]
        lin.extend(float(D[j]) * pv[j] for j in range(len(pv)) if D[j] != 0.0)
        hb = hint[index]
        for k in range(M.shape[1]):
            col = M[:, k]
            bound = float(np.abs(col).sum())  # |y_k| ≤ Σ|M_ik| on [0,1]: SCIP needs finite bounds
            y = model.add_variable(lb=-bound, ub=bound, name=f"y{b}_{k}")
            model.add_linear_constraint(y - mathopt.fast_sum(float(col[j]) * pv[j] for j in np.flatnonzero(col)) == 0.0)
            quad.append(y * y)
            hint_values[y] = float(np.clip(col @ hb, -bound, bound))
    model.minimize(mathopt.fast_sum(quad) + mathopt.fast_sum(lin))
    mparams = mathopt.ModelSolveParameters(solution_hints=[mathopt.SolutionHint(variable_values=hint_values)])
    return model, p, mparams


def solve_model(model, p, mparams, seconds: float, opts: dict):
    """Run GSCIP. Returns (pruned indicators (n,) bool or None, dual bound, proved, limit)."""
    from ortools.math_opt.python import mathopt
    from ortools.math_opt.solvers.gscip import gscip_pb2

    gscip = gscip_pb2.GScipParameters()
    gscip.real_params["numerics/feastol"] = FEASTOL
    sp = mathopt.SolveParameters(
        time_limit=timedelta(seconds=max(seconds, 0.01)) if math.isfinite(seconds) else None,
        relative_gap_tolerance=0.5 * opts["gap_tol"], absolute_gap_tolerance=0.0,
        random_seed=int(opts["seed"]) % (2**31 - 1), enable_output=bool(opts["verbose"]), gscip=gscip)
    if opts.get("threads") is not None:
        sp.threads = int(opts["threads"])
    res = mathopt.solve(model, mathopt.SolverType.GSCIP, params=sp, model_params=mparams)
    reason = res.termination.reason
    dual = float(res.termination.objective_bounds.dual_bound)
    proved = reason == mathopt.TerminationReason.OPTIMAL
    limit = None
    if not proved:
        lim = res.termination.limit
        limit = "time" if lim == mathopt.Limit.TIME else (lim.name.lower() if lim is not None else reason.name.lower())
    x = None
    if res.has_primal_feasible_solution():
        x = np.array([v > 0.5 for v in res.variable_values(p)], dtype=bool)
    return x, (dual if math.isfinite(dual) else -math.inf), proved, limit


def value(W: np.ndarray, G: np.ndarray, keep: np.ndarray) -> float:
    """Exact ``mask`` objective of kept indicators ``keep`` (rows or (1, d_in) columns) on W."""
    U = W * ~np.broadcast_to(keep, W.shape)
    return float(np.einsum("ri,ij,rj->", U, G, U))


def dense_h(W: np.ndarray, G: np.ndarray, kind: str) -> np.ndarray:
    """``H`` with ``f(p) = pᵀHp`` over the model's variables (block-diagonal over rows)."""
    if kind == "columns":
        return G * (W.T @ W)
    n_rows, d_in = W.shape
    H = np.zeros((n_rows * d_in, n_rows * d_in))
    for r in range(n_rows):
        sl = slice(r * d_in, (r + 1) * d_in)
        H[sl, sl] = G * np.outer(W[r], W[r])
    return H


def swap_search(H: np.ndarray, p: np.ndarray, groups, max_swaps: int) -> np.ndarray:
    """Best-improvement 1-swap local search on ``pᵀHp`` inside each cardinality group.

    Un-pruning ``i`` and pruning ``j`` changes the value by
    ``Δ = −2g_i + H_ii + 2g_j + H_jj − 2H_ij`` with ``g = Hp``. Returns the improved (n,) bool p.
    """
    p = p.astype(bool).copy()
    g = H @ p
    diag = np.diag(H)
    for _ in range(max_swaps):
        f = float(p @ g)
        best, pair = -1e-12 * max(abs(f), 1e-300), None
        for idx, _ in groups:
            on, off = idx[p[idx]], idx[~p[idx]]
            if on.size == 0 or off.size == 0:
                continue
            delta = ((diag[on] - 2 * g[on])[:, None] + (diag[off] + 2 * g[off])[None, :]
                     - 2 * H[np.ix_(on, off)])
            k = int(np.argmin(delta))
            if delta.flat[k] < best:
                best, pair = float(delta.flat[k]), (on[k // off.size], off[k % off.size])
        if pair is None:
            break
        i, j = pair
        p[i], p[j] = False, True
        g += H[:, j] - H[:, i]
    return p


def solve_one(W, G, kind, groups, start, seconds, opts) -> dict:
    """One model: ``W`` (rows, d_in) scaled weights, ``start`` its kept start mask.

    The start is first improved by :func:`swap_search` (models up to ``LS_MAX_VARS``
    variables); the objective is normalised by ``s`` = the best value known. If GSCIP then
    proves an optimum ``v < s/8``, the margin ``SAFETY·s`` would be large next to ``v``, so
    the model is solved again normalised by ``v`` (at most ``1 + RESOLVES`` solves, inside
    the same time share); the best of the bounds is kept (each is valid).

    Returns a dict: ``keep`` (the best mask found, never worse than ``start``), ``bound``
    (valid for the exact objective: ``s·(β − SAFETY − clip)``), ``proved``, ``limit``.
    """
    if all(c in (0, len(idx)) for idx, c in groups):  # one feasible mask: its value (less round-off)
        return dict(keep=start, bound=value(W, G, start) * (1.0 - 1e-12), proved=True, limit=None)
    t_end = time.time() + seconds
    keep = start
    n = start.size
    if n <= LS_MAX_VARS and seconds > 0.0:
        p = swap_search(dense_h(W, G, kind), ~start.reshape(-1), groups, max_swaps=n)
        cand = (~p).reshape(start.shape)
        if value(W, G, cand) < value(W, G, start):
            keep = cand
    bound, proved, limit = 0.0, False, None
    for _ in range(1 + RESOLVES):
        s = value(W, G, keep)
        if s <= 0.0:
            return dict(keep=keep, bound=0.0, proved=True, limit=None)
        remaining = t_end - time.time()
        if remaining <= 0.0:
            limit = limit or "time"
            break
        blocks = blocks_of(W / math.sqrt(s), G, kind)
        model, pv, mparams = build(n, blocks, groups, (~keep).reshape(-1).astype(float))
        remaining = t_end - time.time()   # what the model build left (seconds at d_in = 576)
        if remaining <= 0.0:
            limit = limit or "time"
            break
        x, dual, ok, lim = solve_model(model, pv, mparams, remaining, opts)
        clip = sum(b[3] for b in blocks)
        if math.isfinite(dual):
            bound = max(bound, s * (dual - SAFETY - clip))
        proved, limit = proved or ok, None if (proved or ok) else lim
        if x is not None and all(int(x[idx].sum()) == c for idx, c in groups):
            cand = (~x).reshape(keep.shape)
            if value(W, G, cand) < value(W, G, keep):
                keep = cand
        if not (ok and value(W, G, keep) < s / 8):
            break
    return dict(keep=keep, bound=bound, proved=proved, limit=limit)


def run(job: dict, emit) -> None:
    """Solve every model of ``job`` in turn, sharing the time left; ``emit(result)`` each.

    job keys: ``W`` (d_out, d_in) and ``G`` scaled float64; ``kind``; ``rows`` (True: one
    model per row, groups of one row); ``groups``; ``start`` kept masks ((d_out, d_in), or
    (1, d_in) for columns); ``deadline`` (``time.time()``
    epoch or inf); ``gap_tol``, ``seed``, ``threads``, ``verbose``.
    """
    W, G, kind, groups = job["W"], job["G"], job["kind"], job["groups"]
    models = range(W.shape[0]) if job["rows"] else [None]
    for i, r in enumerate(models):
        seconds = (job["deadline"] - time.time()) / (len(models) - i)
        sel = slice(None) if r is None else slice(r, r + 1)
        Wr = W if r is None else W[sel]
        emit(solve_one(Wr, G, kind, groups, job["start"][sel] if r is not None else job["start"],
                       seconds, job))


def _die_with_parent() -> None:
    """On Linux, ask the kernel to kill this child when its parent dies (no orphan solves)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() == 1:  # the parent died before we got here
        sys.exit(0)


def main() -> None:
    """Child entry point: serve jobs from stdin until it closes.

    Each job's results go to the original stdout, followed by ``{"done": True}`` (or
    ``{"error": text}`` if the job raised); solver logs go to stderr.
    """
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def emit(result: dict) -> None:
        pickle.dump(result, out)
        out.flush()

    while True:
        try:
            job = pickle.load(sys.stdin.buffer)
        except EOFError:
            break
        try:
            run(job, emit)
        except Exception as exc:  # reported to the parent, which raises it
            emit({"error": f"{type(exc).__name__}: {exc}"})
            continue
        emit({"done": True})
    out.close()


if __name__ == "__main__":
    main()
