"""The QCR branch-and-bound: its pure steps are exact, it agrees with brute force, limits stay honest."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

pytest.importorskip("cvxpy")

from layerprune.problems import LayerProblem, make_instance  # noqa: E402
from layerprune.solvers import Params, Status, make_solver  # noqa: E402
from layerprune.solvers.bnb import (Pseudocosts, linear_bound, mask_block, node_convexity,  # noqa: E402
                                    probe_kept, project_budgets, project_warm, root_pseudocosts, search)

REL = 1e-6


def _random_node_sets(rng, B, k, m, c):
    """Node sets with random binary fixings that keep every group's budget feasible."""
    out_lo, out_hi = [], []
    while len(out_lo) < B:
        fix = rng.random((k, m)) < 0.3
        val = (rng.random((k, m)) < 0.4).astype(float)
        lo, hi = np.where(fix, val, 0.0), np.where(fix, val, 1.0)
        if (lo.sum(-1) <= c).all() and (hi.sum(-1) >= c).all():
            out_lo.append(lo)
            out_hi.append(hi)
    t = lambda a: torch.tensor(np.array(a), dtype=torch.float64)
    return t(out_lo), t(out_hi)


@pytest.mark.parametrize("k,m", [(1, 9), (3, 4), (1, 64)])
def test_projection_is_a_threshold_with_exact_budgets(k, m):
    rng = np.random.default_rng(k * m)
    c = np.full(k, m // 2, dtype=float)
    lo, hi = _random_node_sets(rng, 40, k, m, c)
    y = torch.tensor(3.0 * rng.standard_normal((40, k, m)))
    x, tau = project_budgets(y, lo, hi, torch.tensor(c))
    assert torch.allclose(x.sum(-1), torch.tensor(c).expand(40, k), atol=1e-12)
    assert (x >= lo - 1e-15).all() and (x <= hi + 1e-15).all()
    # KKT of the projection onto {lo ≤ x ≤ hi, Σ x = c}: x = clip(y − τ, lo, hi) for one τ per group
    assert torch.allclose(x, torch.minimum(torch.maximum(y - tau, lo), hi), atol=1e-9)


@pytest.mark.parametrize("k,m", [(1, 9), (3, 4), (1, 64)])
@pytest.mark.parametrize("shift", [0.0, 1e-3, 5.0])
def test_warm_projection_equals_the_sorted_one(k, m, shift):
    """From the threshold of a nearby point (Newton lands), or a far one (some nodes fall back
    to sorting), the warm projection is the exact projection."""
    rng = np.random.default_rng(k + m)
    c = torch.tensor(np.full(k, m // 2, dtype=float))
    lo, hi = _random_node_sets(rng, 40, k, m, c.numpy())
    y0 = torch.tensor(rng.standard_normal((40, k, m)))
    _, tau0 = project_budgets(y0, lo, hi, c)
    y = y0 + shift * torch.tensor(rng.standard_normal((40, k, m)))
    x, tau = project_warm(y, lo, hi, c, tau0)
    exact, _ = project_budgets(y, lo, hi, c)
    assert torch.allclose(x, exact, atol=1e-9)
    assert torch.allclose(x.sum(-1), c.expand(40, k), atol=1e-9)
    assert torch.allclose(x, torch.minimum(torch.maximum(y - tau, lo), hi), atol=1e-9)


def test_linear_bound_and_reduced_costs_match_enumeration():
    rng = np.random.default_rng(3)
    k, m = 2, 5
    c = np.array([2.0, 3.0])
    lo, hi = _random_node_sets(rng, 12, k, m, c)
    g = torch.tensor(rng.standard_normal((12, k, m)))
    value, s, reduced = linear_bound(g, lo, hi, torch.tensor(c))
    for b in range(12):
        pts = []
        for bits in itertools.product([0.0, 1.0], repeat=k * m):
            v = np.array(bits).reshape(k, m)
            if (v >= lo[b].numpy()).all() and (v <= hi[b].numpy()).all() and (v.sum(-1) == c).all():
                pts.append(v)
        vals = np.array([(g[b].numpy() * v).sum() for v in pts])
        assert float(value[b]) == pytest.approx(vals.min(), abs=1e-12)
        assert float((g[b] * s[b]).sum()) == pytest.approx(vals.min(), abs=1e-12)
        for gi, i in itertools.product(range(k), range(m)):
            if lo[b, gi, i] == hi[b, gi, i]:
                continue
            other = [val for val, v in zip(vals, pts) if v[gi, i] != float(s[b, gi, i])]
            want = (min(other) - vals.min()) if other else math.inf
            assert float(reduced[b, gi, i]) == pytest.approx(want, abs=1e-12)


def test_pseudocosts_product_rule_per_node():
    pc = Pseudocosts(4)
    # entry 1 gained 2.0 per unit both ways, entry 2 0.5 up / 8.0 down; 0 and 3 never branched
    pc.record(np.array([1, 1, 2, 2, 3]), np.array([0, 1, 0, 1, 0]), np.array([1.0, 1.0, 4.0, 0.25, np.inf]),
              np.array([0.5, 0.5, 0.5, 0.5, 0.5]))
    assert pc.cnt[:, 3].sum() == 0                      # an infinite gain is not recorded
    x = np.array([[0.5, 0.5, 0.2, 0.0],                 # 1: (2·0.5)(2·0.5) = 1 beats 2: (8·0.2)(0.5·0.8) = 0.64
                  [0.5, 0.9, 0.5, 1.0],                 # 1: (2·0.9)(2·0.1) = 0.36 < 2: (8·0.5)(0.5·0.5) = 1
                  [0.0, 1.0, 0.0, 1.0]])                # nothing fractional: the first free entry
    free = np.array([[False, True, True, True], [False, True, True, True], [False, False, True, True]])
    assert pc.choose(x, free).tolist() == [1, 2, 2]


def _well_conditioned(d_out, d_in, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((300, d_in)) + 0.3 * rng.standard_normal((300, 1))
    return torch.from_numpy(rng.standard_normal((d_out, d_in))), torch.from_numpy(X.T @ X / 300)


@pytest.mark.parametrize("source", ["calibration-like", "synthetic"])
@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4", "columns:0.5"])
def test_bnb_proves_the_brute_force_optimum(source, pattern):
    if source == "synthetic":
        p = make_instance(2, 12, pattern=pattern, objective="mask", seed=7)
    else:
        W, G = _well_conditioned(2, 12, seed=1)
        p = LayerProblem.create(W, G, pattern=pattern, objective="mask")
    brute = make_solver("brute").solve(p)
    res = make_solver("bnb").solve(p, params=Params(time_limit=60))
    assert res.status == Status.OPTIMAL, res.info
    assert res.objective == pytest.approx(brute.objective, rel=REL)
    assert res.lower_bound <= brute.objective * (1 + 1e-9)
    assert res.gap <= Params().gap_tol
    if source == "calibration-like":  # the SDP carries weight there: the QCR rewrite is used
        assert res.info["qcr_blocks"] == (1 if pattern.startswith("columns") else 2), res.info


def test_near_singular_rows_use_the_diagonal_form():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((10, 2))
    G = torch.from_numpy(v @ v.T + 1e-9 * np.eye(10))   # rank two: the SDP can move almost nothing
    p = LayerProblem.create(torch.from_numpy(rng.standard_normal((2, 10))), G, pattern="per-row:0.5", objective="mask")
    brute = make_solver("brute").solve(p)
    res = make_solver("bnb").solve(p, params=Params(time_limit=60))
    assert res.info["qcr_blocks"] == 0
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(brute.objective, rel=REL, abs=1e-9 * p.scale)
    assert res.lower_bound <= brute.objective + 1e-9 * p.scale


def _outlier_row(seed=3, d=12):
    """One row whose Gram matrix has two outlier channels (activations 50× the rest)."""
    return make_instance(1, d, pattern="per-row:0.5", objective="mask", seed=seed, n_outliers=2, outlier_scale=50.0)


def test_probing_keeps_only_entries_no_better_point_prunes():
    p = _outlier_row()
    w, G = p.W[0].double().numpy(), p.G.double().numpy()
    Q = w[:, None] * G * w[None, :]
    n, c = Q.shape[0], Q.shape[0] // 2
    group = np.zeros(n, dtype=int)
    blk, _ = mask_block(Q, 1, n, c, group, Params(), math.inf, torch.device("cpu"), None)
    start = np.zeros(n, dtype=bool)
    start[np.argsort(np.diag(Q))[:c]] = True                  # prune the c smallest diagonals
    thr = float(start @ Q @ start)
    kept, floor = probe_kept(blk, start, thr)
    assert kept.any() and not (kept & start).any()
    assert floor >= thr
    for i in np.flatnonzero(kept):                           # every point pruning i is worth ≥ thr
        best = min(float(np.array(s) @ Q @ np.array(s)) for s in itertools.product((0.0, 1.0), repeat=n)
                   if sum(s) == c and s[i] == 1.0)
        assert best >= thr * (1 - 1e-9)


def test_bnb_proves_the_optimum_after_probing_outliers():
    for seed in (3, 5):
        p = _outlier_row(seed)
        brute = make_solver("brute").solve(p)
        res = make_solver("bnb").solve(p, params=Params(time_limit=60))
        assert res.info["probed_kept"] > 0, res.info
        assert res.status == Status.OPTIMAL
        assert res.objective == pytest.approx(brute.objective, rel=REL)
        assert res.lower_bound <= brute.objective * (1 + 1e-9)


@pytest.mark.parametrize("k,m", [(1, 12), (3, 4), (6, 2)])
def test_node_convexity_is_the_least_eigenvalue_on_the_node_directions(k, m):
    rng = np.random.default_rng(k)
    n = k * m
    A = rng.standard_normal((n, n))
    H2 = torch.from_numpy(A @ A.T / n)
    free = torch.from_numpy(rng.random((30, n)) < 0.7)
    s = 1.5 * float(torch.linalg.eigvalsh(H2)[-1])
    got = node_convexity(H2, free, k, m, s)
    for b in range(free.shape[0]):  # an explicit basis of {d : d_fixed = 0, Σ_group d = 0}
        basis = []
        for g in range(k):
            idx = [i for i in range(g * m, (g + 1) * m) if free[b, i]]
            for j in idx[1:]:
                v = np.zeros(n)
                v[idx[0]], v[j] = 1.0, -1.0
                basis.append(v)
        want = s
        if basis:
            V = np.linalg.qr(np.array(basis).T)[0]
            want = min(s, float(np.linalg.eigvalsh(V.T @ H2.numpy() @ V)[0]))
        assert got[b] <= max(want, 0.0) and got[b] >= max(want, 0.0) - 1e-8 * s



def test_node_shifts_past_the_deadline_are_left_out_and_the_rest_exact():
    """Wide blocks compute the shifts in small chunks; a chunk predicted to end past the deadline
    is not started (NaN: the search keeps the parent's shift), the others equal node_convexity."""
    import time

    rng = np.random.default_rng(0)
    n = 192
    w = rng.standard_normal(n)
    X = rng.standard_normal((400, n))
    Q = w[:, None] * (X.T @ X / 400) * w[None, :]
    blk, _ = mask_block(Q, 1, n, n // 2, np.zeros(n, dtype=int), Params(), math.inf, torch.device("cpu"), None)
    lo, hi = _random_node_sets(rng, 12, 1, n, n // 2)
    lo, hi = lo.reshape(12, n), hi.reshape(12, n)
    full = blk.node_shift(lo, hi)
    want = node_convexity(0.5 * blk.H, hi > lo, 1, n, 1.5 * blk.lam_max)
    assert torch.equal(full, want) and not torch.isnan(full).any()
    assert blk.shift_seconds > 0.0
    none = blk.node_shift(lo, hi, time.perf_counter())                # no chunk fits: all left out
    assert torch.isnan(none).all()
    blk.shift_seconds = 1e-9                                         # a chunk or more fits
    some = blk.node_shift(lo, hi, time.perf_counter() + 5.0)
    done = ~torch.isnan(some)
    assert done.any() and torch.equal(some[done], want[done])


def test_diagonals_stopped_by_a_deadline_stay_valid():
    """The log-det barrier and the mixing method stop early (or are skipped) by a deadline; the
    δ they return still keeps ``A − diag δ`` positive (semi)definite."""
    import time

    from layerprune.solvers._quadratic import logdet_diagonal, max_diagonal

    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 64))
    A = X.T @ X / 300
    full = logdet_diagonal(A)
    early = logdet_diagonal(A, deadline=time.perf_counter())
    for d in (full, early):
        assert (d > 0).all() and float(np.linalg.eigvalsh(A - np.diag(d))[0]) > 0.0
    assert np.log(early).sum() < np.log(full).sum()
    assert not max_diagonal(A, "sdp", nonneg=True, deadline=time.perf_counter()).any()   # skipped: δ = 0
    d = max_diagonal(A, "sdp", nonneg=True)
    assert d.sum() > 0 and float(np.linalg.eigvalsh(A - np.diag(d))[0]) >= -1e-12 * float(np.diag(A).max())

def _binary_points(n):
    return np.array(list(itertools.product((0.0, 1.0), repeat=n)))


@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4"])
def test_shifted_node_bounds_stay_below_every_binary_point_of_the_node(pattern):
    """The node relaxation of ``f + δ Σ_free (p − p²)`` bounds the node's binaries from below,
    and is tighter than the unshifted one (δ > 0 once entries are fixed)."""
    W, G = _well_conditioned(1, 12, seed=4)
    w, G = W[0].numpy(), G.numpy()
    Q = w[:, None] * G * w[None, :]
    n = 12
    k, m = (1, n) if pattern.startswith("per-row") else (n // 4, 4)
    c = m // 2
    group = np.arange(n) // m
    blk, qcr = mask_block(Q, k, m, c, group, Params(), math.inf, torch.device("cpu"), np.zeros(n, dtype=bool))
    assert qcr
    lo, hi = _random_node_sets(np.random.default_rng(5), 40, k, m, np.full(k, c, dtype=float))
    lo, hi = lo.reshape(40, n), hi.reshape(40, n)
    shift = blk.node_shift(lo, hi)
    assert (shift >= 0).all() and (shift > 0).any()
    P = _binary_points(n)
    P = P[(P.reshape(-1, k, m).sum(-1) == c).all(-1)]
    vals = ((P @ Q) * P).sum(1)
    thr = 2.0 * float(vals.max())                         # above every node: relaxed to convergence
    x = torch.full((40, n), 0.5, dtype=torch.float64)
    lb = torch.full((40,), -math.inf, dtype=torch.float64)
    _, plain, _, _, _ = blk.relax(x, lo, hi, lb, thr, 3000)
    _, shifted, _, _, _ = blk.relax(x, lo, hi, lb, thr, 3000, shift=shift)
    for b in range(40):
        inside = ((P >= lo[b].numpy()) & (P <= hi[b].numpy())).all(1)
        assert shifted[b] <= vals[inside].min() * (1 + 1e-9) + 1e-12
    assert (shifted >= plain - 1e-5 * thr).all()
    assert float((shifted - plain).max()) > 1e-3 * float(vals.min())


@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4", "columns:0.5"])
def test_bnb_with_a_shift_at_every_node_proves_the_brute_force_optimum(pattern, monkeypatch):
    monkeypatch.setattr(search, "SHIFT_EVERY", 1)
    for seed in (1, 2):
        W, G = _well_conditioned(2, 12, seed=seed)
        p = LayerProblem.create(W, G, pattern=pattern, objective="mask")
        brute = make_solver("brute").solve(p)
        res = make_solver("bnb").solve(p, params=Params(time_limit=60))
        assert res.status == Status.OPTIMAL
        assert res.objective == pytest.approx(brute.objective, rel=REL)
        assert res.lower_bound <= brute.objective * (1 + 1e-9)


def test_root_strong_branching_measures_both_children_of_every_free_entry():
    W, G = _well_conditioned(1, 12, seed=3)
    w, G = W[0].numpy(), G.numpy()
    Q = w[:, None] * G * w[None, :]
    n, c = 12, 6
    blk, _ = mask_block(Q, 1, n, c, np.zeros(n, dtype=int), Params(), math.inf, torch.device("cpu"),
                        np.zeros(n, dtype=bool))
    pc = Pseudocosts(n)
    zeros, ones = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    start = torch.zeros(n, dtype=torch.float64)
    start[:c] = 1.0
    P = _binary_points(n)
    P = P[P.sum(1) == c]
    vals = ((P @ Q) * P).sum(1)
    thr = float(start @ torch.from_numpy(Q) @ start)                 # the start's value, as the search uses
    (x, lb, lo, hi, _), children = root_pseudocosts(blk, pc, start, zeros, ones, thr, math.inf)
    free = (hi[0] > lo[0]).numpy()
    assert children == 2 * free.sum()
    frac = free & (x[0].numpy() > 1e-9) & (x[0].numpy() < 1 - 1e-9)   # entries that moved when branched
    assert (pc.cnt[:, frac] == 1).all() and (pc.sum >= 0).all() and pc.sum[:, frac].sum() > 0
    assert float(lb[0]) <= vals.min() * (1 + 1e-9)


def test_limits_are_honest_and_never_worse_than_the_start():
    W, G = _well_conditioned(2, 48, seed=4)
    p = LayerProblem.create(W, G, pattern="per-row:0.5", objective="mask")
    wanda = make_solver("wanda").solve(p)
    res = make_solver("bnb", max_nodes=1).solve(p, params=Params(time_limit=60))
    assert res.status == Status.FEASIBLE and res.limit == "nodes", (res.status, res.limit, res.info)
    assert 0.0 < res.lower_bound <= res.objective <= wanda.objective * (1 + 1e-12)
    res = make_solver("bnb").solve(p, params=Params(time_limit=1e-3))
    assert res.status == Status.FEASIBLE and res.limit == "time"
    assert res.lower_bound <= res.objective <= wanda.objective * (1 + 1e-12)


# ---------------------------------------------------------------------- reconstruct
def _perspective_block(W, G, pattern="per-row"):
    from layerprune.solvers.bnb.perspective import PerspectiveBlock
    from layerprune.solvers._quadratic import logdet_diagonal

    d = G.shape[0]
    k, m, c = (d // 4, 4, 2) if pattern == "nm" else (1, d, d // 2)
    return PerspectiveBlock(W, G, logdet_diagonal(G), k, m, c, torch.device("cpu"))


def test_perspective_h_and_value_match_the_problem():
    """h and ∇h equal :func:`relax_perspective.h_and_grad` (the cvxpy backend's certified
    formula); h equals the exact refit objective at binary points and is below it elsewhere
    on the budget set; ``value`` equals :meth:`LayerProblem.row_errors`."""
    from layerprune.solvers.relax_perspective import h_and_grad

    W, G = _well_conditioned(1, 8, seed=5)
    Wn, Gn = W.numpy(), G.numpy()
    blk = _perspective_block(Wn, Gn)
    p = LayerProblem.create(W, G, pattern="per-row:4", objective="reconstruct")
    rng = np.random.default_rng(0)
    pts = np.array([rng.permutation(8) < 4 for _ in range(6)])        # pruned indicators
    frac = rng.uniform(0, 1, (6, 8))
    h, g = blk.h_and_grad(torch.from_numpy(frac))
    for b in range(6):
        want, want_g, _ = h_and_grad(Wn[0], Gn, blk.delta.numpy(), 1.0 - frac[b])
        assert float(h[b]) == pytest.approx(want, rel=1e-10)
        assert np.allclose(g[b].numpy(), -want_g, rtol=1e-8, atol=1e-12)
    exact = blk.value(pts)
    hb, _ = blk.h_and_grad(torch.from_numpy(pts.astype(float)))
    for b in range(6):
        assert exact[b] == pytest.approx(float(p.row_errors(torch.from_numpy(~pts[b])[None])[0]), rel=1e-10)
        assert float(hb[b]) == pytest.approx(exact[b], rel=1e-9)
    mid = 0.5 * (pts[0] + pts[1]).astype(float)                            # on the budget, fractional
    assert float(blk.h_and_grad(torch.from_numpy(mid[None]))[0][0]) <= 0.5 * (exact[0] + exact[1]) + 1e-12


@pytest.mark.parametrize("source", ["calibration-like", "synthetic", "singular"])
@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4", "columns:0.5"])
def test_bnb_reconstruct_proves_the_brute_force_optimum(source, pattern):
    if source == "synthetic":
        p = make_instance(2, 12, pattern=pattern, objective="reconstruct", seed=7)
    else:
        W, G = _well_conditioned(2, 12, seed=1)
        if source == "singular":  # rank 8 of 12: no perspective split, the monotone bound
            X = np.random.default_rng(3).standard_normal((8, 12))
            G = torch.from_numpy(X.T @ X / 8)
        p = LayerProblem.create(W, G, pattern=pattern, objective="reconstruct")
    brute = make_solver("brute").solve(p)
    res = make_solver("bnb").solve(p, params=Params(time_limit=60))
    assert res.status == Status.OPTIMAL, res.info
    assert res.objective == pytest.approx(brute.objective, rel=REL, abs=1e-9 * p.scale)
    assert res.lower_bound <= brute.objective + 1e-9 * p.scale
    assert res.bound_source.startswith("monotone" if source == "singular" else "perspective"), res.bound_source


def test_bnb_reconstruct_limits_are_honest():
    W, G = _well_conditioned(1, 40, seed=4)
    p = LayerProblem.create(W, G, pattern="per-row:0.5", objective="reconstruct")
    res = make_solver("bnb", max_nodes=1).solve(p, params=Params(time_limit=60))
    assert res.status == Status.FEASIBLE and res.limit == "nodes", (res.status, res.limit, res.info)
    assert 0.0 < res.lower_bound <= res.objective
    res = make_solver("bnb").solve(p, params=Params(time_limit=1e-3))
    assert res.status == Status.FEASIBLE and res.limit == "time"
    assert res.lower_bound <= res.objective


def test_an_sdp_that_cannot_finish_in_time_is_not_started():
    """The SDP's canonicalisation cannot be interrupted: when its predicted time exceeds what is
    left, the QCR form is declined at once (callers fall back to the diagonal form)."""
    import time

    from layerprune.solvers import _qcr

    n = 128
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, n))
    Q = X.T @ X / 300
    Q /= np.abs(np.diag(Q)).max()
    t = time.perf_counter()
    assert _qcr.build(Q, np.zeros(n, dtype=int), np.array([n // 2]), Params(), t + 0.5) is None
    assert time.perf_counter() - t < 0.5
    assert _qcr.predicted_sdp_seconds(2 * n) > 5 * _qcr.predicted_sdp_seconds(n)


@pytest.mark.parametrize("objective, pattern", [("mask", "per-row:0.5"), ("reconstruct", "nm:2:4"),
                                                ("mask", "columns:0.5")])
def test_anytime_history_brackets_the_optimum_and_ends_at_the_result(objective, pattern):
    """Every event's objective is a mask's exact error and its bound valid: bound ≤ optimum ≤
    objective at every moment; objectives never rise; the last event is the result."""
    from layerprune.studies.analysis import anytime

    W, G = _well_conditioned(3, 12, seed=2)
    p = LayerProblem.create(W, G, pattern=pattern, objective=objective)
    opt = make_solver("brute").solve(p).objective
    res = make_solver("bnb").solve(p, params=Params(time_limit=60))
    events = [e for e in res.history if "seconds" in e]
    assert len(events) >= (2 if pattern.startswith("columns") else 2 * p.d_out)  # start and end of each block
    objs = [e["objective"] for e in events]
    assert all(b <= opt * (1 + 1e-9) + 1e-12 for b in (e["lower_bound"] for e in events))
    assert all(o >= opt * (1 - 1e-9) for o in objs)
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(objs, objs[1:]))
    assert objs[-1] == pytest.approx(res.objective, rel=1e-9)
    assert events[-1]["lower_bound"] == pytest.approx(res.lower_bound, rel=1e-12)
    assert [e["seconds"] for e in events] == sorted(e["seconds"] for e in events)
    curve = anytime(res)
    assert list(curve.columns) == ["seconds", "objective", "lower_bound"] and len(curve) == len(events) + 1
