r"""Exact ``mask`` objective with OR-Tools MathOpt (GSCIP): a factored, convexified binary QP.

Why this formulation
--------------------
With ``p ∈ {0,1}`` the *pruned* indicators, every pattern's ``mask`` objective is a PSD
binary quadratic form ``f(p) = pᵀHp`` over one or more *blocks*:

- ``per-row`` / ``nm``: one block per row, ``H_r = diag(w_r) G diag(w_r)``; the rows decouple
  (``Σ_{i∈row} p_i = d − K``, resp. ``Σ_{i∈block} p_i = M − N``), so each row is its own model;
- ``unstructured``: every row is a block of one model, linked by ``Σ p = d_out·d_in − budget``;
- ``columns``: one block over the pruned-column indicators ``q`` (``Σ q = d_in − K``):
  ``Σ_r (w_r⊙q)ᵀG(w_r⊙q) = qᵀ(G ⊙ WᵀW)q`` (a Schur product of PSD matrices, so PSD).

Each block is written in a *factored, visibly convex* form (a dense ``Σ H_ij p_i p_j``
objective took GSCIP 33 s at d_in = 32 against 1 s for this one)::

    min  Σ_k y_k² + Σ_i D_i p_i
    s.t. y_k = Σ_i M_ik p_i      (|y_k| ≤ Σ_i |M_ik|, a valid finite bound SCIP needs)

with ``H − D = M Mᵀ``. The diagonal ``D = μ·diag(H)``, ``μ = λ_min(diag(H)^{-½} H diag(H)^{-½})``
(= λ_min of the unit-diagonal ``G̃`` for per-row rows) is the largest multiple of ``diag(H)``
keeping ``H − D ⪰ 0``: since ``p_i² = p_i`` on {0,1} the objective is unchanged on binaries,
its continuous relaxation stays convex (GSCIP can bound it by outer approximation) and is
never weaker than with ``D = 0`` (``D_i p_i ≥ D_i p_i²`` on [0,1]). ``H − D`` is factored by an
eigen-decomposition; eigenvalues below ``1e-12·λ_max`` are dropped (a PSD remainder: the
model only under-estimates, bounds stay valid) and negative rounding eigenvalues ``ν`` are
clipped, for which ``|ν|·n_b`` (``n_b`` the block's binaries, ``‖p‖² ≤ n_b``) is taken off
the bound. Measured on ``make_instance`` rows, ``μ`` is only 1e-5…1e-3 (rank-deficient,
correlated G), so this costs nothing but gains little; a Shor-SDP-chosen diagonal (cvxpy/SCS)
raised the root bound (0.047 vs 0.032, optimum 0.077, d_in = 48) but made GSCIP slower
(32 s vs 16 s), so it is not used.

MathOpt with GSCIP was chosen over CP-SAT because it keeps the coefficients real (CP-SAT
needs integer scaling whose rounding must be charged to the bound, and 9.15 has a known
wrong-optimum bug with big Boolean coefficient sums, google/or-tools#5293). This backend is
written independently of ``scip`` (pyscipopt) so the two exact backends check each other.

Numerics and the bound
----------------------
The problem is first put on unit diagonal (``problem.scaled()``, objective unchanged). The
start (the better of ``init`` and Wanda's rounding, per row where rows decouple) is improved
by a best-improvement 1-swap local search, and the objective is divided by ``s`` = the
start's value (≥ the optimum), so values are O(1) and SCIP's absolute tolerances act as
relative ones. SCIP runs with ``numerics/feastol = 1e-8``. Its dual bound ``β`` is valid for
its tolerance-relaxed model, which contains every binary point, so ``β`` under-estimates the
exact optimum up to LP round-off; we subtract a stated safety margin ``SAFETY = 1e-6``
(normalised units, i.e. ``1e-6·s`` in the exact objective) and the clipping term above, then
map back: ``bound = s·(β − SAFETY − clip)``. If the optimum found is ``v < s/8`` (the margin
would then be large next to it) the model is solved again normalised by ``v`` (at most twice
more, within the same time); the largest of the valid bounds is kept.

Warm start: the starting mask is passed as a MathOpt solution hint (GSCIP takes one hint).
Time: ``params.time_limit`` bounds the whole solve; per-row / N:M rows share what is left
(each row gets ``remaining / rows_left``, so time an easy row leaves goes to the next).
Rows never started, or whose model found nothing better, keep the start mask; a row not
proved contributes its own dual bound (0 if it never ran) and the result is ``feasible``
with limit ``time``.

Process isolation: OR-Tools 9.15 and highspy (loaded by ``import cvxpy``) bundle different
``libhighs.so.1`` with the same soname, so they cannot live in one process (whichever loads
second fails to import). By default the models are solved in a child process
(:mod:`ortools_worker`, numpy + ortools only, ~1 s start-up once; the child is kept
and serves later solves); ``OrToolsSolver(isolate=False)``
solves in-process.

``objectives = {"mask"}`` only: ``reconstruct`` is not implemented here (use ``scip``).
"""
from __future__ import annotations

import atexit
import math
import pickle
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch

from layerprune.problems import LayerProblem

from . import ortools_worker as worker
from .base import Option, Params, Proposal, Solver, SolverError, Status

__all__ = ["OrToolsSolver"]


def _groups(pattern, d_out: int, d_in: int) -> list[tuple[np.ndarray, int]]:
    """Cardinality constraints ``(indices, count)`` on pruned indicators of one model.

    per-row / nm: one row's variables; unstructured: all ``d_out·d_in``; columns: one per column.
    """
    if pattern.name in ("per-row", "columns"):
        return [(np.arange(d_in), d_in - pattern.keep)]
    if pattern.name == "nm":
        return [(b * pattern.m + np.arange(pattern.m), pattern.m - pattern.n) for b in range(d_in // pattern.m)]
    return [(np.arange(d_out * d_in), d_out * d_in - pattern.budget(d_out, d_in))]


def _start_mask(problem: LayerProblem, scaled: LayerProblem, init: Optional[torch.Tensor]) -> torch.Tensor:
    """Wanda's rounding of ``|W̃|``, replaced by ``init`` (per row, or as a whole) where better."""
    wanda = problem.round(scaled.W.abs())
    if init is None:
        return wanda
    if problem.pattern.couples_rows:
        return init if problem.objective(init) < problem.objective(wanda) else wanda
    better = problem.row_errors(init) < problem.row_errors(wanda)
    return torch.where(better[:, None], init, wanda)


_WORKER: dict = {"proc": None}
_WORKER_LOCK = threading.Lock()


def _worker() -> subprocess.Popen:
    """The persistent child process (started on first use, restarted if it died)."""
    proc = _WORKER["proc"]
    if proc is None or proc.poll() is not None:
        code = ("import sys, runpy; sys.path.pop(0); "
                f"runpy.run_path({worker.__file__!r}, run_name='__main__')")
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _WORKER["proc"] = proc
    return proc


def _kill_worker() -> None:
    proc, _WORKER["proc"] = _WORKER["proc"], None
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass


@atexit.register
def _close_worker() -> None:
    proc = _WORKER["proc"]
    if proc is not None and proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    _kill_worker()


def _run_isolated(job: dict, on_result: Callable[[dict], bool]) -> None:
    """Run :func:`ortools_worker.run` in the child process; ``on_result`` → True stops it.

    Stopping early (or any exception, e.g. KeyboardInterrupt) kills the child, which
    interrupts GSCIP; the next solve starts a fresh one.
    """
    with _WORKER_LOCK:
        proc = _worker()
        try:
            pickle.dump(job, proc.stdin)
            proc.stdin.flush()
            while True:
                try:
                    msg = pickle.load(proc.stdout)
                except EOFError:
                    raise SolverError(f"the ortools worker process died (exit code {proc.wait()}); "
                                      "see its stderr") from None
                if "error" in msg:
                    raise SolverError(f"ortools worker: {msg['error']}")
                if msg.get("done"):
                    return
                if on_result(msg):
                    _kill_worker()
                    return
        except BaseException:
            _kill_worker()
            raise


class _Stop(Exception):
    """Raised by the in-process result handler to stop early."""


class OrToolsSolver(Solver):
    """Certified optimum of the ``mask`` objective with OR-Tools MathOpt / GSCIP.

    Options
    -------
    isolate : bool, default True
        Solve in a child process (needed where highspy/cvxpy is or will be loaded).
    Everything else comes from :class:`Params` (time_limit for the whole solve, gap_tol,
    threads, seed, verbose).
    """

    name = "ortools"
    option_specs = (Option("isolate", bool, True, "solve in a child process (needed where highspy/cvxpy is loaded)"),)
    description = "OR-Tools MathOpt/GSCIP factored convexified binary QP (mask objective, exact)"
    requires = ("ortools",)
    objectives = frozenset({"mask"})
    certifies = True
    exact = True
    uses_init = True

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        if problem.objective_kind != "mask":
            raise SolverError("ortools takes only the 'mask' objective")
        deadline = math.inf if params.time_limit is None else time.time() + float(params.time_limit)
        scaled, _ = problem.to(dtype=torch.float64).scaled()  # in float64: a float32 scaling is off by 1e-7
        kind = problem.pattern.name
        d_out, d_in = problem.shape
        rows = not problem.pattern.couples_rows
        mask0 = _start_mask(problem, scaled, init)
        start = mask0.cpu().numpy()
        if kind == "columns":
            start = start[:1]
        job = dict(W=scaled.W.detach().to("cpu", torch.float64).numpy(),
                   G=scaled.G.detach().to("cpu", torch.float64).numpy(),
                   kind=kind, rows=rows, groups=_groups(problem.pattern, 1 if rows else d_out, d_in),
                   start=start, deadline=deadline, gap_tol=float(params.gap_tol),
                   seed=int(params.seed), threads=params.threads, verbose=bool(params.verbose))
        results: list[dict] = []

        def on_result(res: dict) -> bool:
            results.append(res)
            bound = sum(r["bound"] for r in results)
            stop = callback is not None and bool(callback({
                "iteration": len(results), "bound": bound, "proved": sum(r["proved"] for r in results)}))
            if stop:
                results[-1] = dict(results[-1], stopped=True)
            return stop

        if self.option("isolate"):
            _run_isolated(job, on_result)
        else:
            def emit(res: dict) -> None:
                if on_result(res):
                    raise _Stop
            try:
                worker.run(job, emit)
            except _Stop:
                pass
        return _proposal(problem, mask0, results, rows)


def _proposal(problem: LayerProblem, mask0: torch.Tensor, results: list[dict], rows: bool) -> Proposal:
    """Assemble the mask, summed bound and honest status from the per-model results."""
    n_models = problem.d_out if rows else 1
    mask = mask0.clone().cpu()
    if rows:
        for r, res in enumerate(results):
            mask[r] = torch.as_tensor(res["keep"][0])
    elif results:
        mask = torch.as_tensor(np.broadcast_to(results[0]["keep"], problem.shape).copy())
    proved = sum(bool(r["proved"]) for r in results)
    bound = float(sum(r["bound"] for r in results))
    optimal = proved == n_models and len(results) == n_models
    limit = None
    if not optimal:
        limits = [r["limit"] for r in results if r["limit"]]
        stopped = any(r.get("stopped") for r in results)
        limit = "interrupted" if stopped else (limits[0] if limits else "time")
    return Proposal(mask=mask.to(problem.device), lower_bound=bound,
                    bound_source="gscip dual bound" + (" (sum over rows)" if rows else ""),
                    status=Status.OPTIMAL if optimal else Status.FEASIBLE, limit=limit,
                    iterations=len(results), info={"proved_models": proved, "models": n_models})
