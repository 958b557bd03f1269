"""The SCIP exact backend: agrees with brute force, bounds stay valid, limits stay honest."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pyscipopt")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from layerprune.problems import LayerProblem, make_arrays, make_instance  # noqa: E402
from layerprune.problems.strategies import tiny_problems  # noqa: E402
from conftest import examples  # noqa: E402
from layerprune.solvers import Params, SolverError, Status, make_solver  # noqa: E402
from layerprune.solvers._quadratic import logdet_diagonal, mask_diagonal, max_diagonal, psd_factor  # noqa: E402

REL = 1e-6  # objectives agree to this relative tolerance (both are exact re-scores)


def _check_against_brute(p: LayerProblem):
    brute = make_solver("brute").solve(p)
    res = make_solver("scip").solve(p, params=Params(time_limit=60))
    scale = max(abs(brute.objective), 1e-6 * p.scale)  # near-zero optima: round-off is relative to p.scale
    assert p.is_feasible(res.mask)
    assert res.lower_bound is not None
    assert res.lower_bound <= brute.objective + 1e-9 * scale, (res.lower_bound, brute.objective)
    assert res.info.get("raw_lower_bound", res.lower_bound) <= brute.objective + 1e-9 * scale
    assert res.objective >= brute.objective - REL * scale
    if res.status == Status.OPTIMAL:
        assert res.objective <= brute.objective + REL * scale, (res.objective, brute.objective)
    return brute, res


def _assert_proves_brute(p: LayerProblem):
    """SCIP is consistent with brute force and proves its optimum."""
    brute, res = _check_against_brute(p)
    assert res.status == Status.OPTIMAL, res.info
    assert res.objective == pytest.approx(brute.objective, rel=REL)
    return brute, res


@pytest.mark.parametrize("objective", ["mask", "reconstruct"])
@pytest.mark.parametrize("pattern", ["per-row:3", "nm:2:4", "unstructured:0.5", "columns:3"])
def test_explicit_cases_match_brute(pattern, objective):
    W, G = make_arrays(2, 8 if pattern.startswith("nm") else 6, seed=3, rank=None)
    p = LayerProblem.create(W, G, pattern=pattern, objective=objective)
    _assert_proves_brute(p)


@settings(max_examples=examples(0.6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems(max_d_in=6, max_d_out=2))
def test_hypothesis_matches_brute(p):
    _check_against_brute(p)


def test_rank_deficient_reconstruct():
    W, G = make_arrays(1, 8, seed=1, rank=6)
    p = LayerProblem.create(W, G, pattern="per-row:3", objective="reconstruct")
    _assert_proves_brute(p)


def test_time_limit_is_honest():
    p = make_instance(2, 96, pattern="per-row:0.5", objective="mask", seed=5)
    res = make_solver("scip", diag="none").solve(p, params=Params(time_limit=1.0))
    assert res.status == Status.FEASIBLE and res.limit == "time"
    assert res.lower_bound is not None and res.lower_bound <= res.objective
    assert res.seconds < 30  # the limit is honoured (model building and SDP included, busy machine)


def test_warm_start_accepted_and_never_worse():
    p = make_instance(3, 32, pattern="nm:2:4", objective="mask", seed=2)
    sp, _ = p.scaled()
    wanda = p.round(sp.W.abs())
    init = p.round(torch.rand(p.shape, generator=torch.Generator().manual_seed(0)))
    init[0] = wanda[0]
    res = make_solver("scip").solve(p, init=init, params=Params(time_limit=0.05))
    # whatever the limit, the result is at least as good as the best given start in every row
    base = torch.minimum(p.row_errors(init), p.row_errors(wanda))
    assert float(p.row_errors(res.mask).sum()) <= float(base.sum()) * (1 + 1e-9)


def test_max_diagonal_stays_psd():
    W, G = make_arrays(1, 24, seed=0, rank=20)
    lam0 = np.linalg.eigvalsh(G)[0]
    for method in ("sdp", "eig", "logdet"):
        for nonneg in (False, True):
            d = max_diagonal(G, method, nonneg=nonneg)
            lam = np.linalg.eigvalsh(G - np.diag(d))[0]
            assert lam >= min(lam0, 0) - 1e-12 * np.abs(G).max()
            if nonneg:
                assert (d >= 0).all()
    Q = np.diag(W[0]) @ G @ np.diag(W[0])
    assert max_diagonal(Q, "sdp").sum() > 0  # the SDP moves something out of the quadratic


def test_logdet_diagonal_is_feasible_and_optimal():
    """Strictly inside the cone, and ``Σ log δ`` equal to the optimum of the cvxpy
    exponential-cone model (Clarabel); zeros where G is singular."""
    cp = pytest.importorskip("cvxpy")
    _, G = make_arrays(1, 12, seed=3)
    G = G + 0.05 * np.eye(12)                       # positive definite
    d = logdet_diagonal(G)
    assert (d > 0).all()
    assert np.linalg.eigvalsh(G - np.diag(d))[0] > 0
    delta = cp.Variable(12)
    prob = cp.Problem(cp.Maximize(cp.sum(cp.log(delta))), [G - cp.diag(delta) >> 0])
    prob.solve(solver="CLARABEL")
    assert np.log(d).sum() >= prob.value - 1e-5
    assert np.log(d).sum() <= prob.value + 1e-5     # the cvxpy optimum is (near) optimal too
    # singular (rank-deficient) G: no δ > 0 fits, the plain model
    _, Gs = make_arrays(1, 12, seed=3, rank=6)
    assert not logdet_diagonal(Gs).any()


def test_psd_factor_reports_clipping():
    A = np.array([[1.0, 0.0], [0.0, -1e-3]])
    F, neg = psd_factor(A)
    assert neg == pytest.approx(1e-3)
    assert np.allclose(F @ F.T, np.diag([1.0, 0.0]))


def test_interrupt_keeps_warm_start(monkeypatch):
    from layerprune.solvers.scip import ScipSolver

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ScipSolver, "_model", staticmethod(boom))
    p = make_instance(2, 8, pattern="per-row:0.5", seed=1)
    res = make_solver("scip").solve(p)
    assert res.status == Status.FEASIBLE and res.limit == "interrupted"
    assert p.is_feasible(res.mask) and res.lower_bound == 0.0


def test_params_accepted():
    p = make_instance(1, 8, pattern="nm:2:4", seed=4)
    res = make_solver("scip").solve(p, params=Params(threads=1, seed=7, gap_tol=5e-5))
    brute = make_solver("brute").solve(p)
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(brute.objective, rel=REL)


def test_float32_storage_bound_valid():
    p = make_instance(2, 8, pattern="nm:2:4", seed=9).to(dtype=torch.float32)
    res = make_solver("scip").solve(p)
    brute = make_solver("brute").solve(p)
    assert res.status == Status.OPTIMAL
    assert res.info.get("raw_lower_bound", res.lower_bound) <= brute.objective * (1 + 1e-9)


def test_one_swap_is_monotone_and_locally_optimal():
    from layerprune.solvers._quadratic import one_swap

    rng = np.random.default_rng(0)
    for group in (np.zeros(12, int), np.arange(12) // 4):
        A = rng.standard_normal((12, 5))
        w = rng.standard_t(4, 12)
        Q = w[:, None] * (A @ A.T) * w[None, :]
        kept = np.zeros(12, bool)
        for g in np.unique(group):  # keep the first half of every group
            idx = np.flatnonzero(group == g)
            kept[idx[: idx.size // 2]] = True
        out = one_swap(Q, kept, group)
        val = lambda k: float((~k).astype(float) @ Q @ (~k).astype(float))  # noqa: E731
        assert val(out) <= val(kept) * (1 + 1e-12)
        assert all(out[group == g].sum() == kept[group == g].sum() for g in np.unique(group))
        for i in np.flatnonzero(out):  # no improving swap inside a group is left
            for j in np.flatnonzero(~out):
                if group[i] == group[j]:
                    k = out.copy()
                    k[i], k[j] = False, True
                    assert val(k) >= val(out) - 1e-9 * max(val(out), 1e-12)


@pytest.mark.parametrize("epigraph", ["split", "joint"])
@pytest.mark.parametrize("heuristics", ["off", "default"])
@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4"])
def test_mask_formulations_match_brute(epigraph, heuristics, pattern):
    p = make_instance(2, 12, pattern=pattern, objective="mask", seed=11)
    brute = make_solver("brute").solve(p)
    res = make_solver("scip", epigraph=epigraph, heuristics=heuristics).solve(p, params=Params(threads=1))
    assert res.status == Status.OPTIMAL, res.info
    assert res.info["epigraph"] == epigraph
    assert res.objective == pytest.approx(brute.objective, rel=REL)
    assert res.info.get("raw_lower_bound", res.lower_bound) <= brute.objective * (1 + 1e-9)


def test_reconstruct_keeps_heuristics_on():
    W = torch.tensor([[-0.6594, -0.5157]], dtype=torch.float64)
    G = torch.tensor([[0.4171, -0.3854], [-0.3854, 233.1860]], dtype=torch.float64)
    p = LayerProblem.create(W, G, pattern="per-row:1", objective="reconstruct")
    res = make_solver("scip", heuristics="off").solve(p)
    assert res.info["heuristics"] == "default"
    _check_against_brute(p)


def test_reconstruct_presolve_aggregation_regression():
    # found by test_hypothesis_matches_brute: with SCIP's presolve aggregation on, the
    # perspective model claimed "optimal" at 0.0762 (bound too) against the true 0.0600
    W = torch.tensor([[-1.94583877927110893, -0.19554995751950940, -0.22568056959873653,
                       0.61760779245554132]], dtype=torch.float64)
    G = torch.tensor([[1.32189755708738227e-01, 2.09530738968815994e-01, -9.92626751502662152e+00,
                       5.47998357234888087e-03],
                      [2.09530738968815994e-01, 1.28768117426789508e+00, -1.87918923644774978e+01,
                       -1.71593372423624491e-01],
                      [-9.92626751502662152e+00, -1.87918923644774978e+01, 1.19685555622254560e+03,
                       6.42012171189500247e+00],
                      [5.47998357234888087e-03, -1.71593372423624491e-01, 6.42012171189500247e+00,
                       1.24667877221544765e-01]], dtype=torch.float64)
    p = LayerProblem.create(W, G, pattern="nm:1:2", objective="reconstruct")
    _assert_proves_brute(p)


def test_polished_start_never_worse_than_wanda():
    p = make_instance(2, 48, pattern="per-row:0.5", objective="mask", seed=3)
    res = make_solver("scip").solve(p, params=Params(time_limit=0.5, threads=1))
    wanda = make_solver("wanda").solve(p)
    assert res.objective <= wanda.objective * (1 + 1e-9)
    assert res.lower_bound <= res.objective


def test_reconstruct_zero_optimum_regression():
    # found by Hypothesis: the warm start's value is ~1e-32, and scaling the model by it gave
    # SCIP coefficients beyond its infinity ("error in input data"); such a start is optimal
    W = torch.tensor([[0.19880326182735794, -0.86579255008540601]], dtype=torch.float64)
    G = torch.tensor([[54.04884736151485924, -2.55042147078107284],
                      [-2.55042147078107284, 0.18752198220921187]], dtype=torch.float64)
    p = LayerProblem.create(W, G, pattern="unstructured:0.25", objective="reconstruct")
    brute, res = _check_against_brute(p)
    assert res.status == Status.OPTIMAL


def test_auto_diagonal_only_where_the_sdp_moves_weight():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 12))
    well = X.T @ X / 200                       # well conditioned: the SDP moves a lot
    v = rng.standard_normal(12)
    near_singular = np.outer(v, v) + 1e-9 * np.eye(12)  # rank one: it can move almost nothing
    d = mask_diagonal(well, "auto")
    assert d.sum() >= 0.01 * np.trace(well) and np.linalg.eigvalsh(well - np.diag(d))[0] > -1e-9
    assert not mask_diagonal(near_singular, "auto").any()
    assert not mask_diagonal(well, "none").any()
    with pytest.raises(SolverError, match="option 'diag': 'auto' is for the mask objective only"):
        make_solver("scip", diag="auto").solve(make_instance(1, 8, objective="reconstruct"))


def _feasible_binaries(group: np.ndarray, count: np.ndarray):
    """Every pruned-indicator vector with ``count[g]`` ones in each group (tiny n only)."""
    import itertools

    per_group = [list(itertools.combinations(np.flatnonzero(group == g), int(c))) for g, c in enumerate(count)]
    for pick in itertools.product(*per_group):
        p = np.zeros(group.size)
        for ids in pick:
            p[list(ids)] = 1.0
        yield p


@pytest.mark.parametrize("groups", ["row", "nm"])
def test_qcr_rewrite_is_exact_and_convex_on_the_budget_hyperplane(groups):
    from layerprune.solvers._qcr import budget_projection, qcr_form

    rng = np.random.default_rng(5)
    n = 8
    Q = rng.standard_normal((n, n))
    Q = Q + Q.T                                   # indefinite on purpose
    group, count = (np.zeros(n, int), np.array([3])) if groups == "row" else (np.arange(n) // 4, np.array([2, 1]))
    mu = 5.0 * rng.standard_normal(n)             # arbitrary multipliers: repaired, still exact
    F, lin, const, neg, mu2 = qcr_form(Q, group, count, mu)
    assert neg < 1e-9
    model = lambda x: float(np.sum((F.T @ x) ** 2) + lin @ x + const)
    for p in _feasible_binaries(group, count):
        assert model(p) == pytest.approx(float(p @ Q @ p), abs=1e-9)
    Pi, p0 = budget_projection(group, count)
    assert np.allclose(Pi @ Pi, Pi) and np.allclose(Pi @ np.ones(n) * (groups == "row"), 0.0)
    for _ in range(5):  # anywhere on the hyperplane: pᵀQp + Σ μ'_i (p_i − p_i²), a convex function
        x = Pi @ rng.standard_normal(n) + p0
        assert model(x) == pytest.approx(float(x @ Q @ x + mu2 @ (x - x * x)), abs=1e-8)
    assert np.linalg.eigvalsh(Pi @ (Q - np.diag(mu2)) @ Pi)[0] > -1e-9


def test_qcr_sdp_bound_is_below_the_optimum_and_the_models_agree_with_brute():
    from layerprune.solvers._qcr import qcr_multipliers

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 12)) + 0.3 * rng.standard_normal((300, 1))
    G = torch.from_numpy(X.T @ X / 300)          # well conditioned, like real calibration rows
    W = torch.from_numpy(rng.standard_normal((2, 12)))
    for pattern in ("per-row:0.5", "nm:2:4"):
        p = LayerProblem.create(W, G, pattern=pattern, objective="mask")
        brute = make_solver("brute").solve(p)
        for diag in ("qcr", "auto"):
            res = make_solver("scip", diag=diag).solve(p, params=Params(threads=1))
            assert res.status == Status.OPTIMAL, res.info
            assert res.info["qcr_models"] == 2, res.info   # auto picks QCR on these rows
            assert res.objective == pytest.approx(brute.objective, rel=REL)
            assert res.lower_bound <= brute.objective * (1 + 1e-9)
        sp, _ = p.to("cpu", torch.float64).scaled()
        w, Gs = sp.W.numpy()[0], sp.G.numpy()
        group = np.zeros(12, int) if pattern == "per-row:0.5" else np.arange(12) // 4
        count = np.array([6]) if pattern == "per-row:0.5" else np.full(3, 2)
        Q = w[:, None] * Gs * w[None, :]
        mu, bound = qcr_multipliers(Q, group, count, Params(), float("inf"), ("CLARABEL", "SCS"))
        row0 = min(float(q @ Q @ q) for q in _feasible_binaries(group, count))
        assert 0.5 * row0 < bound <= row0 * (1 + 1e-9)   # valid, and far from trivial here


def test_qcr_falls_back_where_budgets_couple_rows():
    p = make_instance(2, 6, pattern="unstructured:0.5", objective="mask", seed=2)
    brute = make_solver("brute").solve(p)
    res = make_solver("scip", diag="qcr").solve(p, params=Params(threads=1))
    assert res.info["qcr_models"] == 0
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(brute.objective, rel=REL)


def test_reconstruct_free_weights_regression():
    # found by Hypothesis (dev profile): with the kept weights v unbounded, SCIP's dual bound on
    # this 2×4 layer stayed −∞ after 48k nodes (30 s) and it missed the optimum; the box of
    # improving solutions (``_improving_box``) lets it prove the optimum in a few nodes
    W = torch.tensor([[-0.381617641961949, 2.0569215108624914, 0.2638175095216054, -0.4853797752909476],
                      [-0.007236821014746243, 0.3195039906178256, 0.1358106015384426, -0.008833747366406764]],
                     dtype=torch.float64)
    G = torch.tensor([[1.94295070572436, -0.9232131743276173, -4.556643779911101, -14.84397213351504],
                      [-0.9232131743276173, 1.1095845260101809, 2.960888377420444, 11.578036837819232],
                      [-4.556643779911101, 2.960888377420444, 14.938441206673046, 57.220688960518224],
                      [-14.84397213351504, 11.578036837819232, 57.220688960518224, 241.7054130954674]],
                     dtype=torch.float64)
    p = LayerProblem.create(W, G, pattern="unstructured:0.5", objective="reconstruct")
    brute = make_solver("brute").solve(p)
    res = make_solver("scip").solve(p, params=Params(time_limit=20, threads=1))
    assert res.status == Status.OPTIMAL, res.info
    assert res.objective == pytest.approx(brute.objective, rel=REL)
    assert res.lower_bound <= brute.objective * (1 + 1e-9)
