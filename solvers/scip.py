r"""Exact mixed-integer backend on SCIP (pyscipopt): certified optimum or an honest gap.

Every model is built on the unit-diagonal problem (:meth:`LayerProblem.scaled`) and its
objective divided by the warm start's value, so SCIP sees an O(1) objective; bounds are mapped
back. Rows decouple for ``per-row`` and ``nm`` (one model per row, bounds summed, the wall-time
limit shared: each row gets ``remaining / rows_left``); ``unstructured`` and ``columns``
couple the layer and get one model.

``mask`` (binary QP in the pruned indicators ``p``)
    ``pᵀQp`` with ``Q = diag(w̃) G̃ diag(w̃)`` per row (for ``columns``: ``Q = G̃ ⊙ W̃ᵀW̃``,
    since ``Σ_r u_rᵀG̃u_r = qᵀ(G̃ ⊙ W̃ᵀW̃)q`` for the pruned columns ``q``). As ``p_j² = p_j``,
    ``pᵀQp = pᵀ(Q − Δ)p + δᵀp`` for every diagonal ``Δ = diag(δ)``. With ``Q − Δ ⪰ 0``
    factored as ``FFᵀ`` (eigen-decomposition, tiny eigenvalues dropped), the model is the
    visibly convex epigraph ``min t + δᵀp, t ≥ ‖Fᵀp‖², Σ_group p = pruned count``, by default
    *split* (option ``epigraph="split"``): ``y = Fᵀp``, ``t_k ≥ y_k²``, objective ``Σ_k t_k``
    (the disaggregated extended formulation of Vielma–Dunning–Huchette–Lubin 2017: SCIP's
    gradient cuts approximate each univariate square, a tighter outer approximation of
    ``‖y‖²`` than cuts on the joint ``t ≥ ‖y‖²``, option ``epigraph="joint"``).
    ``δ ≥ 0`` (option ``diag``): ``"none"`` (the plain factored form of DESIGN.md §2),
    ``"sdp"`` (approximately ``max Σδ s.t. Q − Δ ⪰ 0, δ ≥ 0``, by the Burer–Monteiro mixing
    method on its dual ``min ⟨Q, X⟩, diag X ≥ 1, X ⪰ 0``, then shrunk into the PSD cone),
    ``"eig"`` (``δ = λ_min(Q)``), ``"dense"`` (``t ≥ pᵀQp`` unfactored). ``δ ≥ 0`` only ever
    raises the continuous relaxation (``pᵀΔp ≤ δᵀp`` on ``[0,1]``).
    ``"qcr"`` (:mod:`._qcr`): the exact rewrite ``‖Fᵀp‖² + lᵀp + const``, convex only on the
    budget hyperplane, with the Shor SDP's diagonal multipliers; its root relaxation is at
    least the SDP bound. ``"auto"`` (the ``mask`` default): ``qcr`` where the mixing-method
    ``sdp`` diagonal carries at least :data:`._quadratic.AUTO_MIN_SHARE` of ``tr Q``, else
    ``none`` (and the plain ``sdp`` diagonal should the SDP fail or be predicted to outlast the
    time left); ``qcr`` needs every budget inside one block, so ``unstructured`` models use
    ``auto``'s diagonal. ``mask`` defaults: ``epigraph="split"``, ``heuristics="off"`` (the
    warm start is polished to a 1-swap optimum by :func:`one_swap` and handed over as a
    complete solution, so SCIP spends its time on the bound).
``reconstruct`` (perspective formulation, DESIGN.md §2)
    ``G̃ = (G̃ − Δ) + Δ`` with ``δ ≥ 0`` (option ``diag``); kept weights ``v``,
    binary kept indicators ``z``; the perspective of ``δ_i (w_i − v_i)²`` on the residual,
    ``e_i = √δ_i (w_i z_i − v_i)``, ``e_i² ≤ T_i z_i``; objective
    ``‖Fᵀ(w − v)‖² + Σ (T_i + δ_i w_i² (1 − z_i))``, ``Σ_group z = kept count``. (The same
    relaxation as ``δ_i (w_i² − 2 w_i v_i + s_i)`` with ``v_i² ≤ s_i z_i``, which was used
    before and cancelled ``O(δ_i w_i²)`` terms down to the objective: SCIP's incumbents could
    then undercut their mask's exact value by ``feastol·δ_i w_i²``, and SCIP stopped at its gap
    limit on a gap that the exact re-score did not confirm.) The weights are in units of the
    largest ``|w̃|`` of the model (SCIP's tolerances are absolute: with ``W`` scaled by 1e-6 the
    cones were void and "optimal" masks 1.1–7× the optimum).
    Defaults: ``diag="logdet"`` (``max Σ log δ``, :func:`._quadratic.logdet_diagonal`, once
    per layer), ``epigraph="joint"``, SCIP's heuristics always on (the start is partial and
    needs SCIP's completion heuristic). SCIP's presolve *aggregation* is off in this model
    (``presolving/donotaggr``): with it SCIP cut off the true optimum of tiny rows (regression
    tests keep both rows).

Bound validity (all in the scaled model, objective O(1)):

- negative eigenvalues clipped when factoring ``Q − Δ`` make ``FFᵀ ⪰ Q − Δ`` larger by
  at most ``λ₋ = |λ_min(Q − Δ)|``; the bound loses ``λ₋·‖p‖²`` (``mask``: ``‖p‖² ≤`` pruned
  count) or ``λ₋·‖w − v‖²`` (``reconstruct``: taken as 4× the warm start's ``‖w − v‖²``, a
  heuristic scale; Δ is shrunk so that ``λ₋`` is ``G̃``'s own round-off, ~1e-13·‖G̃‖);
- SCIP's dual bound is only accurate to its tolerances: with ``numerics/feastol`` =
  :data:`FEASTOL` (absolute, on O(1) rows) each epigraph row ``t ≥ ‖y‖²`` and its ``y`` rows
  may be violated by ~feastol; :data:`SAFETY` ``·charge·max(1, |bound|)`` is subtracted from
  every model bound, in the model's units, where the charge is 1 per joint epigraph
  (10× feastol) and ``0.2`` per split ``t_k ≥ y_k²`` (2× feastol each, at least 1 per block).

Status: ``optimal`` only when every model was proved optimal (SCIP ``optimal`` or
``gaplimit`` with ``limits/gap = gap_tol/2``); a time limit gives ``feasible`` + ``time``;
Ctrl-C (SCIP catches SIGINT itself) gives ``feasible`` + ``interrupted``. Rows never reached
keep their warm start and the bound 0.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from layerprune.problems import LayerProblem

from . import _qcr
from ._quadratic import max_diagonal, one_swap, psd_factor, warm_start
from .base import Option, Params, Proposal, Solver, Status, share_of_time_left

__all__ = ["ScipSolver"]

#: SCIP's ``numerics/feastol`` (absolute, on models scaled to an O(1) objective)
FEASTOL = 1e-7
#: per epigraph constraint, subtracted (× max(1, |bound|)) from SCIP's dual bound of an O(1) model
SAFETY = 10 * FEASTOL
#: a start whose value is below this fraction of the all-pruned value is optimal to round-off
TINY = 1e-13



# ---------------------------------------------------------------------- SCIP plumbing
@dataclass
class _ModelResult:
    """One solved model: values, bound (scaled problem's units, corrected) and SCIP status."""

    values: np.ndarray           # mask (bool) of the model's variables (kept = True)
    bound: float
    status: str
    nodes: int = 0
    qcr: bool = False            # the mask model used the QCR rewrite (see :mod:`._qcr`)


def _new_model(params: Params, time_limit: float, gap: float, heuristics: str = "default"):
    from pyscipopt import SCIP_PARAMSETTING, Model

    m = Model()
    if not params.verbose:
        m.hideOutput()
    m.setParam("limits/time", max(0.01, float(time_limit)))
    m.setParam("limits/gap", gap)
    m.setParam("numerics/feastol", FEASTOL)
    m.setParam("randomization/randomseedshift", int(params.seed) % (2**31 - 1))
    if params.threads:
        m.setParam("parallel/maxnthreads", int(params.threads))
    if heuristics == "off":  # the warm start is already 1-swap optimal: branch, do not search
        m.setHeuristics(SCIP_PARAMSETTING.OFF)
    elif heuristics != "default":
        raise ValueError(f"unknown heuristics setting {heuristics!r}")
    return m


def _epigraph(m, ys, yv, split: bool, startvals: list, name: str) -> tuple[list, float]:
    """Objective terms bounding ``‖y‖²`` from above; returns (terms, safety charge).

    Safety charge, in units of :data:`SAFETY` (= 10·feastol): SCIP may violate each quadratic
    constraint by ``feastol`` (absolute; the model is O(1)), so ``k`` split constraints are
    charged ``2·feastol`` each (``0.2·k``, at least 1) and the joint one ``10·feastol`` (1).

    ``split``: one ``t_k ≥ y_k²`` per coordinate (disaggregated, Vielma et al. 2017): SCIP's
    gradient cuts then approximate each univariate square separately, a much tighter outer
    approximation of ``‖y‖²`` for the same number of cuts. Otherwise one ``t ≥ Σ_k y_k²``.
    """
    if not split:
        t = m.addVar(lb=0.0, name=name)
        m.addCons(quicksum_sq(ys) <= t)
        startvals.append((t, float(yv @ yv) * (1 + 1e-9) + 1e-12))
        return [t], 1.0
    ts = []
    for k, y in enumerate(ys):
        t = m.addVar(lb=0.0, name=f"{name}_{k}")
        m.addCons(y * y <= t)
        startvals.append((t, float(yv[k]) ** 2 * (1 + 1e-9) + 1e-14))
        ts.append(t)
    return ts, max(1.0, 0.2 * len(ts))


def quicksum_sq(ys):
    from pyscipopt import quicksum

    return quicksum(y * y for y in ys)


def _add_start(m, values: list, complete: bool = False) -> bool:
    """Hand SCIP a feasible point ((variable, value) pairs).

    ``complete``: every variable is given (the ``mask`` model): a full solution, used even with
    heuristics off. Otherwise partial, because indicator constraints add slack variables that
    SCIP's completion heuristic fills in.
    """
    sol = m.createSol() if complete else m.createPartialSol()
    for var, val in values:
        m.setSolVal(sol, var, float(val))
    return bool(m.addSol(sol, free=True))


def _run(m, scale: float, correction: float, deadline: float, blocks: float) -> tuple[str, float, int]:
    """Optimise until ``deadline`` (perf_counter); return (status, safe bound in the scaled
    problem's units, nodes). Model building counts against the limit."""
    m.setParam("limits/time", max(0.01, min(1e20, deadline - time.perf_counter())))
    try:
        m.optimize()
    except Exception:  # e.g. "unresolved numerical troubles in LP": keep what SCIP found, no bound
        return "error", 0.0, 0
    status = m.getStatus()
    dual = m.getDualbound()
    if not math.isfinite(dual):
        return status, 0.0, m.getNNodes()
    safe = dual - SAFETY * blocks * max(1.0, abs(dual))
    return status, max(0.0, safe * scale - correction), m.getNNodes()


def _best(m, xs, start: np.ndarray, pruned: bool) -> np.ndarray:
    """Kept mask from SCIP's best solution of the binaries ``xs`` (``start`` if none)."""
    try:
        if m.getNSols() == 0:
            return start.copy()
        sol = m.getBestSol()
        vals = np.array([m.getSolVal(sol, x) for x in xs])
    except Exception:  # SCIP in an error state
        return start.copy()
    return vals < 0.5 if pruned else vals > 0.5


# ---------------------------------------------------------------------- mask model
def _mask_model(Qs, groups, n, start, params, time_limit, gap, opts, caps):
    """``min Σ_b p_bᵀQ_b p_b`` over binary pruned indicators, group cardinalities fixed.

    Parameters
    ----------
    Qs : list of (idx (k,) int array, Q (k, k)) blocks; idx index the n variables
    groups : list of (idx, pruned count)
    start : (n,) bool warm start (True = kept)
    caps : per block, an upper bound on ``‖p_b‖²`` (pruned entries in that block)

    Returns
    -------
    _ModelResult (values: kept mask over the n variables)
    """
    from pyscipopt import quicksum

    deadline = time.perf_counter() + time_limit
    q0 = (~start).astype(float)
    scale = sum(float(q0[idx] @ Q @ q0[idx]) for idx, Q in Qs)
    full = sum(float(Q.sum()) for _, Q in Qs)  # everything pruned: the objective's natural size
    if scale <= TINY * max(full, 0.0):  # the start is optimal to round-off; scaling by it would
        return _ModelResult(start.copy(), 0.0, "optimal")  # blow the coefficients up
    diag = opts["diag"]
    m = _new_model(params, time_limit, gap, opts["heuristics"])
    p = [m.addVar(vtype="B", name=f"p{j}") for j in range(n)]
    for idx, count in groups:
        m.addCons(quicksum(p[j] for j in idx) == count)
    obj, startvals, correction, nepi = [], [(v, q0[j]) for j, v in enumerate(p)], 0.0, 0.0
    const, sdp, used_qcr = 0.0, 0.0, False  # QCR: objective constant, Σ of certified SDP bounds
    for b, (idx, Q) in enumerate(Qs):
        Qn = Q / scale
        if diag == "dense":
            t = m.addVar(lb=0.0, name=f"t{b}")
            m.addCons(quicksum(Qn[a, c] * p[idx[a]] * p[idx[c]] for a in range(len(idx))
                               for c in range(len(idx)) if Qn[a, c] != 0.0) <= t)
            obj.append(t)
            nepi += 1
            startvals.append((t, float(q0[idx] @ Qn @ q0[idx]) * (1 + 1e-9) + 1e-12))
            continue
        label, counts = _block_budgets(idx, groups)
        form = _qcr.convex_form(Qn, label, counts, diag, params, min(deadline, time.perf_counter() + 0.5 * time_limit))
        # QCR: exact on the budget hyperplane, ‖Fᵀp‖² + lᵀp + const; else ‖Fᵀp‖² + δᵀp
        F, neg, delta, const = form.F, form.neg, form.lin, const + form.const
        used_qcr |= form.sdp_bound is not None
        sdp = None if sdp is None or form.sdp_bound is None else sdp + form.sdp_bound
        correction += neg * caps[b] * scale
        ys = []
        yv = F.T @ q0[idx]
        for k in range(F.shape[1]):
            y = m.addVar(lb=-m.infinity(), name=f"y{b}_{k}")
            m.addCons(y == quicksum(float(F[a, k]) * p[idx[a]] for a in range(len(idx)) if F[a, k] != 0.0))
            ys.append(y)
            startvals.append((y, yv[k]))
        terms, k = _epigraph(m, ys, yv, opts["epigraph"] == "split", startvals, f"t{b}")
        obj.extend(terms)
        nepi += k
        obj.extend(float(delta[a]) * p[idx[a]] for a in range(len(idx)) if delta[a] != 0.0)
    m.setObjective(quicksum(obj) + const, "minimize")
    _add_start(m, startvals, complete=True)
    status, bound, nodes = _run(m, scale, correction, deadline, nepi)
    if sdp is not None and status not in _PROVED:  # the SDP's own certificate may be higher
        bound = max(bound, sdp * scale)
    return _ModelResult(_best(m, p, start, pruned=True), bound, status, nodes, qcr=used_qcr)


def _block_budgets(idx, groups):
    """The budgets of block ``idx`` as (label (k,) group of each entry, counts), or (None, None)
    if a budget straddles blocks (unstructured: no per-block QCR rewrite)."""
    pos = {int(j): a for a, j in enumerate(idx)}
    label, counts = np.full(len(idx), -1), []
    for gidx, count in groups:
        inside = [pos.get(int(j)) for j in gidx]
        if any(a is None for a in inside):
            if any(a is not None for a in inside):
                return None, None
            continue
        label[inside] = len(counts)
        counts.append(count)
    if (label < 0).any():
        return None, None
    return label, np.asarray(counts)


# ---------------------------------------------------------------------- reconstruct model
def _reconstruct_model(W, G, zmap, groups, nz, start, v0, params, time_limit, gap, opts, resid):
    """Perspective best-subset model over rows sharing ``G̃``.

    Parameters
    ----------
    W : (R, d) scaled weights of the rows in this model
    G : (d, d) scaled Gram
    zmap : (R, d) int, index of the kept indicator of entry (r, i) among nz binaries
    groups : list of (idx over z, kept count)
    start : (nz,) bool warm start; v0 : (R, d) its refit weights (zero off the mask)
    resid : ‖w − v‖² of the rows at the warm start (for the clipping correction)

    Returns
    -------
    _ModelResult (values: kept indicators z as bool (nz,))
    """
    from pyscipopt import quicksum

    deadline = time.perf_counter() + time_limit
    R, d = W.shape
    scale = float(np.einsum("ri,ij,rj->", W - v0, G, W - v0))
    if scale <= TINY * max(float(np.einsum("ri,ij,rj->", W, G, W)), 0.0):
        # the start is optimal to round-off (finalize checks the absolute gap); scaling the model
        # by it would give SCIP coefficients beyond its infinity ("error in input data")
        return _ModelResult(start.copy(), 0.0, "optimal")
    # SCIP's tolerances (feastol) are absolute, so the model's weights must be O(1) whatever the
    # layer's scale: in units of the largest |w̃|, v_i² ≤ s_i z_i and the indicators v_i = 0 are
    # enforced to feastol relative to the weights (with W scaled by 1e-6, v² ~ 1e-12 < feastol
    # made the cones void: "optimal" masks 1.1–7× the brute-force optimum). The objective is
    # still divided by the start's value, so the model's value × scale is the true objective.
    omega = float(np.abs(W).max())
    W, v0 = W / omega, v0 / omega
    scale_n = scale / omega ** 2
    delta = opts["delta"]
    F, neg = psd_factor(G - np.diag(delta))
    Fn, dn = F / math.sqrt(scale_n), delta / scale_n
    m = _new_model(params, time_limit, gap, opts["heuristics"])
    # SCIP's variable aggregation (e.g. z₂ = 1 − z₁ from an nm:1:2 group) together with the
    # indicator and cone constraints cut off true optima of tiny rows (wrong "optimal" with a
    # bound above the brute-force optimum, with or without an incumbent); measured: only
    # ``presolving/donotaggr`` or no linear presolve fixes it (tests: *_reconstruct_presolve_*)
    m.setParam("presolving/donotaggr", True)
    z = [m.addVar(vtype="B", name=f"z{j}") for j in range(nz)]
    for idx, count in groups:
        m.addCons(quicksum(z[j] for j in idx) == count)
    startvals = [(v, float(start[j])) for j, v in enumerate(z)]
    obj, const, nepi = [], 0.0, 0.0
    box = _improving_box(G, scale_n)
    for r in range(R):
        w = W[r]
        v = [m.addVar(lb=-m.infinity() if box is None else w[i] - box[i],
                      ub=m.infinity() if box is None else w[i] + box[i], name=f"v{r}_{i}") for i in range(d)]
        for i in range(d):
            zi = z[zmap[r, i]]
            if dn[i] > 0.0:
                # the perspective of δ_i(w_i − v_i)², written on the residual and in objective
                # units: e_i = √δ_i (w_i z_i − v_i), e_i² ≤ T_i z_i, term T_i + δ_i w_i² (1 − z_i).
                # Same relaxation as δ_i(w_i² − 2 w_i v_i + s_i) with v_i² ≤ s_i z_i, but without
                # that form's cancellation of O(δ_i w_i²) terms down to the O(1) objective, which
                # let SCIP's incumbents undercut the exact value of their mask by feastol × δ_i w_i²
                # (0.5% on a tiny row: SCIP stopped at its gap limit on a gap that was not there).
                # e_i is its own variable: written inline, SCIP did not see the cone (it tightened
                # its LP feastol below SoPlex's 1e-10 floor, and 2 of 8 layout-grid models that
                # the old form proved in 2–5 s ran to 20 s at 9–10% gaps). The cost, measured
                # against the old form on a loaded machine: 1.2–1.5× the time on real 4×16 rows.
                rt = math.sqrt(float(dn[i]))
                T = m.addVar(lb=0.0, name=f"T{r}_{i}")
                e = m.addVar(lb=-m.infinity(), name=f"e{r}_{i}")
                m.addCons(e == rt * float(w[i]) * zi - rt * v[i])
                m.addCons(e * e <= T * zi)  # a rotated cone in (e, T, z), as SCIP detects it
                ev = rt * (float(w[i]) * float(start[zmap[r, i]]) - v0[r, i])
                startvals.append((e, ev))
                startvals.append((T, (ev * ev if start[zmap[r, i]] else 0.0) * (1 + 1e-9) + 1e-14))
                obj.append(T)
                obj.append(-float(dn[i] * w[i] * w[i]) * zi)
            startvals.append((v[i], v0[r, i]))
            # the cone alone lets z_i ≈ 0 (within tolerance) carry v_i ≠ 0 when δ_i = 0; the
            # indicators enforce supp v ⊆ z exactly at integral z
            m.addConsIndicator(v[i] <= 0.0, z[zmap[r, i]], activeone=False)
            m.addConsIndicator(-v[i] <= 0.0, z[zmap[r, i]], activeone=False)
        yv = Fn.T @ (w - v0[r])
        ys = []
        for k in range(F.shape[1]):
            y = m.addVar(lb=-m.infinity(), name=f"y{r}_{k}")
            m.addCons(y == float(Fn[:, k] @ w) - quicksum(float(Fn[i, k]) * v[i] for i in range(d) if Fn[i, k] != 0.0))
            ys.append(y)
            startvals.append((y, yv[k]))
        terms, k = _epigraph(m, ys, yv, opts["epigraph"] == "split", startvals, f"t{r}")
        obj.extend(terms)
        nepi += k
        const += float(dn @ (w * w))
    m.setObjective(quicksum(obj) + const, "minimize")
    _add_start(m, startvals)
    status, bound, nodes = _run(m, scale, 4.0 * neg * resid, deadline, nepi)
    return _ModelResult(_best(m, z, start, pruned=False), bound, status, nodes)


def _improving_box(G: np.ndarray, scale: float) -> Optional[np.ndarray]:
    """Half-widths ``b`` (d,) with ``|w_i − v_i| ≤ b_i`` for every row of every solution at
    least as good as the warm start, or None when ``G`` is too close to singular.

    Each row's ``(w − v)ᵀG(w − v)`` is at most the model's total, which an improving solution
    keeps ``≤ scale`` (the start's value), and ``max {e_iᵀx : xᵀGx ≤ scale} = √(scale·(G⁻¹)_ii)``.
    The box only removes solutions worse than the start, so the optimum and every dual bound
    on it stay valid; it bounds the otherwise free ``v``, on which SCIP may branch spatially
    through the cones (measured on a 2×4 Hypothesis instance with λ_min(G̃) = 0.014: dual bound
    −∞ after 48k nodes without the box).
    """
    lam, U = np.linalg.eigh(G)
    if lam[0] <= 1e-9 * max(float(lam[-1]), 1e-300):
        return None
    ginv_diag = np.einsum("ik,k,ik->i", U, 1.0 / lam, U)
    return 1.01 * np.sqrt(scale * ginv_diag) + 1e-9


# ---------------------------------------------------------------------- the backend
_PROVED = ("optimal", "gaplimit")


class ScipSolver(Solver):
    """SCIP branch-and-bound on strong convex formulations (see the module docstring).

    Options
    -------
    diag : ``"none"`` | ``"sdp"`` | ``"eig"`` | ``"logdet"`` (| ``"dense"`` for ``mask``: plain ``t ≥ pᵀQp``;
        | ``"qcr"`` for ``mask``: the SDP-chosen rewrite convex on the budget hyperplane;
        | ``"auto"`` for ``mask``: ``qcr`` where the ``sdp`` diagonal moves at least
        :data:`._quadratic.AUTO_MIN_SHARE` of ``tr Q`` off the quadratic, else ``none``) diagonal moved out
        of the quadratic; default ``"auto"`` for ``mask``, ``"logdet"`` for ``reconstruct``
        (module docstring: measurements).
    epigraph : ``"split"`` (``t_k ≥ y_k²``, default for ``mask``) | ``"joint"`` (``t ≥ ‖y‖²``,
        default for ``reconstruct``)
    heuristics : ``"off"`` (default) | ``"default"`` (SCIP's primal heuristics); ``mask`` only,
        ``reconstruct`` always keeps them on
    polish : bool, default True: 1-swap local search on the ``mask`` warm start (per-row, nm)
    """

    name = "scip"
    option_specs = (
        Option("diag", str, None, "diagonal moved out of the quadratic (default: auto for mask, logdet for "
               "reconstruct; auto and qcr are mask only)",
               choices=("none", "sdp", "eig", "logdet", "dense", "auto", "qcr")),
        Option("epigraph", str, None, "t_k ≥ y_k² (split, default for mask) or t ≥ ‖y‖² (joint, default for "
               "reconstruct)", choices=("split", "joint")),
        Option("heuristics", str, "off", "SCIP's primal heuristics for mask (reconstruct always keeps them on)",
               choices=("off", "default")),
        Option("polish", bool, True, "1-swap local search on the mask warm start (per-row, nm)"),
    )
    description = "SCIP MIQCP: convexified epigraph (mask), perspective (reconstruct); certified"
    requires = ("pyscipopt",)
    certifies = True
    exact = True
    uses_init = True

    def _options_conflict(self, objective: str) -> Optional[str]:
        if objective == "reconstruct" and self.option("diag") in ("auto", "qcr"):
            return f"solver 'scip' option 'diag': {self.option('diag')!r} is for the mask objective only"
        return None

    def _solve(self, problem: LayerProblem, params: Params, init, callback) -> Proposal:
        start_time = time.perf_counter()
        deadline = params.deadline(start_time)
        sp, _ = problem.to("cpu", torch.float64).scaled()  # scaled in float64, whatever the storage
        W = sp.W.numpy()
        G = sp.G.numpy()
        start = warm_start(sp, None if init is None else init.cpu())
        pat_name = sp.pattern.name
        recon_kind = problem.objective_kind == "reconstruct"
        if self.option("polish") and not recon_kind and pat_name in ("per-row", "nm"):
            group = np.arange(sp.d_in) // (sp.pattern.m if pat_name == "nm" else sp.d_in)
            polish_until = share_of_time_left(deadline, 0.2, start_time)  # at most 1/5 of the limit
            for r in range(sp.d_out):  # a 1-swap optimum: SCIP's scale and first incumbent
                if time.perf_counter() < polish_until:
                    start[r] = one_swap(W[r][:, None] * G * W[r][None, :], start[r], group, deadline=polish_until)
        diag = self.option("diag") or ("logdet" if recon_kind else "auto")
        # heuristics off only for mask: the reconstruct model's start is partial and needs
        # SCIP's completion heuristic to become its incumbent
        opts = {"diag": diag, "epigraph": self.option("epigraph") or ("joint" if recon_kind else "split"),
                "heuristics": "default" if recon_kind else self.option("heuristics")}
        gap = max(params.gap_tol / 2, 1e-9)
        pat = sp.pattern
        recon = sp.objective_kind == "reconstruct"
        v0 = sp.refit(torch.from_numpy(start)).numpy() if recon else None
        if recon:  # the perspective split of G̃, shared by every model of the layer
            opts["delta"] = max_diagonal(G, "sdp" if diag == "dense" else diag, nonneg=True, seed=params.seed,
                                         deadline=share_of_time_left(deadline, 0.5, start_time))
        info = {**{k: v for k, v in opts.items() if k != "delta"}, "rows_proved": 0, "models": 0, "nodes": 0,
                "qcr_models": 0}
        mask = start.copy()

        if pat.name in ("per-row", "nm"):
            bounds = np.zeros(sp.d_out)
            statuses = []
            for r in range(sp.d_out):
                left = deadline - time.perf_counter()
                if left <= 0.05 or (statuses and statuses[-1] == "userinterrupt"):
                    statuses.append("skipped")
                    continue
                tl = left / (sp.d_out - r) if math.isfinite(left) else 1e20
                groups = _row_groups(pat, sp.d_in, sp.d_out, 1)
                try:
                    res = self._model(W[r:r + 1], G, groups, start[r:r + 1], None if v0 is None else v0[r:r + 1],
                                      recon, params, tl, gap, opts)
                except KeyboardInterrupt:  # Ctrl-C outside SCIP's own handler (model building)
                    statuses.append("userinterrupt")
                    continue
                mask[r] = res.values.reshape(1, -1)[0]
                bounds[r] = res.bound
                statuses.append(res.status)
                info["nodes"] += res.nodes
                info["qcr_models"] += res.qcr
                if callback is not None and callback({"iteration": r, "row": r, "status": res.status,
                                                     "bound": float(bounds.sum())}):
                    statuses.extend(["skipped"] * (sp.d_out - r - 1))
                    break
            statuses += ["skipped"] * (sp.d_out - len(statuses))
            lb = float(bounds.sum())
        else:
            left = deadline - time.perf_counter()
            tl = left if math.isfinite(left) else 1e20
            groups = _row_groups(pat, sp.d_in, sp.d_out, sp.d_out)
            try:
                res = self._model(W, G, groups, start, v0, recon, params, tl, gap, opts)
                mask = res.values.reshape(sp.d_out, sp.d_in)
                statuses, lb = [res.status], res.bound
                info["nodes"] += res.nodes
                info["qcr_models"] += res.qcr
            except KeyboardInterrupt:  # Ctrl-C outside SCIP's own handler: keep the warm start
                statuses, lb = ["userinterrupt"], 0.0
        info["models"] = len(statuses)
        info["rows_proved"] = sum(s in _PROVED for s in statuses)
        info["scip_status"] = statuses if len(statuses) <= 16 else None
        if all(s in _PROVED for s in statuses):
            status, limit = Status.OPTIMAL, None
        elif "userinterrupt" in statuses:
            status, limit = Status.FEASIBLE, "interrupted"
        elif any(s in ("timelimit", "skipped") for s in statuses):
            status, limit = Status.FEASIBLE, "time"
        else:
            status, limit = Status.FEASIBLE, next(s for s in statuses if s not in _PROVED)
        return Proposal(mask=torch.from_numpy(np.ascontiguousarray(mask)).to(problem.device), lower_bound=lb,
                        bound_source=(f"scip dual bound (diag={diag}, epigraph={opts['epigraph']}, "
                                      f"safety {SAFETY:g}·charge·max(1,|b|))"),
                        status=status, limit=limit, iterations=info["nodes"], info=info)

    @classmethod
    def _model(cls, W, G, groups, start, v0, recon, params, tl, gap, opts):
        """:meth:`_model_once`, solved again from its own optimum when that is needed to close
        the gap: the safety margin is relative to the warm start's value (the model's unit),
        so an optimum far below the warm start leaves a relative gap above ``gap_tol`` although
        SCIP proved it. Re-scaling by the optimum shrinks the margin to ~1e-6 of it."""
        deadline = time.perf_counter() + tl
        res = cls._model_once(W, G, groups, start, v0, recon, params, tl, gap, opts)
        values = res.values.reshape(W.shape)
        if res.status not in _PROVED or np.array_equal(values, start.reshape(W.shape)):
            return res
        found = _objective(W, G, values, recon)
        left = deadline - time.perf_counter()
        if found - res.bound <= 0.5 * gap * found or left <= 0.05:
            return res
        v1 = _refit_rows(W, G, values) if recon else None
        again = cls._model_once(W, G, groups, values.reshape(start.shape), v1, recon, params, left, gap, opts)
        again.nodes += res.nodes
        return again if again.status in _PROVED else res

    @staticmethod
    def _model_once(W, G, groups, start, v0, recon, params, tl, gap, opts):
        """Build and solve the model of ``W``'s rows (one row, or the coupled layer).

        ``groups``: (flat indices over W's entries, kept count, kind) from :func:`_row_groups`.
        """
        R, d = W.shape
        columns = groups[0][2] == "columns"
        if recon:
            resid = float(((W - v0) ** 2).sum())
            if columns:
                zmap, zgroups, zstart = np.broadcast_to(np.arange(d), (R, d)), [(np.arange(d), groups[0][1])], start[0]
            else:
                zmap, zgroups, zstart = np.arange(R * d).reshape(R, d), [(i, c) for i, c, _ in groups], start.reshape(-1)
            res = _reconstruct_model(W, G, zmap, zgroups, zstart.size, zstart, v0, params, tl, gap, opts, resid)
            res.values = np.broadcast_to(res.values, (R, d)).copy() if columns else res.values.reshape(R, d)
            return res
        if columns:
            pruned = d - int(groups[0][1])
            res = _mask_model([(np.arange(d), G * (W.T @ W))], [(np.arange(d), pruned)], d, start[0],
                              params, tl, gap, opts, [pruned])
            res.values = np.broadcast_to(res.values, (R, d)).copy()
            return res
        pruned_groups = [(idx, idx.size - cnt) for idx, cnt, _ in groups]
        total = sum(c for _, c in pruned_groups)
        Qs = [(np.arange(r * d, (r + 1) * d), W[r][:, None] * G * W[r][None, :]) for r in range(R)]
        return _mask_model(Qs, pruned_groups, R * d, start.reshape(-1), params, tl, gap, opts,
                           [min(d, total)] * R)


def _refit_rows(W: np.ndarray, G: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Optimal kept weights of each row on its support (least squares; exact for singular G)."""
    V = np.zeros_like(W)
    B = W @ G
    for r in range(W.shape[0]):
        S = mask[r]
        if S.any():
            V[r, S] = np.linalg.lstsq(G[np.ix_(S, S)], B[r, S], rcond=None)[0]
    return V


def _objective(W: np.ndarray, G: np.ndarray, mask: np.ndarray, recon: bool) -> float:
    """The rows' objective of ``mask`` (R, d) in the scaled model's data."""
    R = W - (_refit_rows(W, G, mask) if recon else W * mask)
    return float(np.einsum("ri,ij,rj->", R, G, R))


def _row_groups(pattern, d_in: int, d_out: int, rows: int):
    """Cardinality groups (flat indices over ``rows`` rows, kept count, kind)."""
    if pattern.name == "per-row":
        return [(np.arange(r * d_in, (r + 1) * d_in), pattern.keep, "row") for r in range(rows)]
    if pattern.name == "nm":
        return [(np.arange(r * d_in + b * pattern.m, r * d_in + (b + 1) * pattern.m), pattern.n, "block")
                for r in range(rows) for b in range(d_in // pattern.m)]
    if pattern.name == "unstructured":
        return [(np.arange(rows * d_in), pattern.budget(d_out, d_in), "layer")]
    keep = pattern.bind(d_out, d_in).keep
    return [(np.arange(rows * d_in), keep, "columns")]
