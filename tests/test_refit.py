"""The batched PCG refit (problems/refit.py) and its use by finalize: accuracy against the exact
refit, monotonicity from a warm start, caps, and an honest Result."""
import math
import time

import pytest
import torch

from layerprune.problems import LayerProblem, make_arrays, make_instance, pcg_refit, refit_weights
from layerprune.problems.refit import EXACT_MAX_FLOPS, exact_refit_flops
from layerprune.solvers import Params, make_solver

PATTERNS = ("per-row:0.5", "nm:2:4", "unstructured:0.5", "columns:0.5")


def _problem(d_out=24, d_in=64, pattern="per-row:0.5", seed=0, **kw):
    return make_instance(d_out, d_in, pattern=pattern, objective="reconstruct", seed=seed, **kw)


def _wanda_mask(p):
    return p.round(p.W.abs() * torch.diagonal(p.G).clamp_min(0).sqrt())


def _ill_conditioned(d_out=16, d_in=48, seed=1):
    """Real-like: outlier channels 100× larger, a strong shared component, rank d_in/2 (singular
    G), and two dead inputs (zero rows/columns of G)."""
    W, G = make_arrays(d_out, d_in, seed=seed, rho=0.9, outlier_scale=100.0, rank=d_in // 2)
    G[:, :2] = 0.0
    G[:2, :] = 0.0
    return LayerProblem.create(W, G, pattern="per-row:0.5", objective="reconstruct")


def _relative_excess(p, V, mask):
    exact = float(p.weight_errors(p.refit(mask)).sum())
    return (float(p.weight_errors(V).sum()) - exact) / p.scale


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcg_matches_exact_refit(pattern, dtype):
    p = _problem(pattern=pattern)
    mask = _wanda_mask(p)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    fit = pcg_refit(p.W, p.G, mask, tol=tol, dtype=dtype)
    assert fit.method == "cg" and fit.converged and fit.max_relative_residual <= tol
    assert not bool((fit.weights[~mask] != 0).any())
    # the excess over the exact refit is the G-norm distance to its weights (G is ill-conditioned:
    # the weights themselves may differ along G's near-null directions)
    assert abs(_relative_excess(p, fit.weights, mask)) <= (1e-7 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype, tol, excess", [(torch.float32, 1e-6, 1e-7), (torch.float64, 1e-10, 1e-14)])
def test_pcg_on_singular_gram_with_dead_inputs(dtype, tol, excess):
    p = _ill_conditioned()
    mask = _wanda_mask(p)
    fit = pcg_refit(p.W, p.G, mask, tol=tol, dtype=dtype, max_iter=500)
    assert torch.isfinite(fit.weights).all() and fit.converged and fit.max_relative_residual <= tol
    assert _relative_excess(p, fit.weights, mask) <= excess


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_row_no_worse_than_its_warm_start(pattern):
    p = _problem(pattern=pattern, seed=3)
    sgpt = make_solver("admm").propose(p, Params(max_iter=5))
    start = sgpt.weights.to(torch.float64) * sgpt.mask
    for iters in (1, 3, 50):
        fit = pcg_refit(p.W, p.G, sgpt.mask, start, max_iter=iters, dtype=torch.float64)
        assert (p.weight_errors(fit.weights) <= p.weight_errors(start) * (1 + 1e-12) + 1e-15).all()


def test_caps_are_respected():
    p = _problem(64, 128, seed=2)
    mask = _wanda_mask(p)
    capped = pcg_refit(p.W, p.G, mask, tol=1e-12, max_iter=3)
    assert capped.iterations == 3 and not capped.converged and capped.max_relative_residual > 1e-12
    t0 = time.perf_counter()
    late = pcg_refit(p.W, p.G, mask, tol=1e-12, max_iter=10_000, deadline=t0)
    assert late.iterations == 0 and not late.converged
    assert torch.equal(late.weights, (p.W.to(torch.float32) * mask).to(torch.float64))


def test_dual_start_cuts_the_primal_iterations_on_a_real_like_layer():
    """The dual (OBS-form) start: same accuracy as the primal CG alone, in fewer primal
    iterations, on an ill-conditioned layer with outlier channels."""
    W, G = make_arrays(48, 96, seed=11, rho=0.9, outlier_scale=100.0)
    p = LayerProblem.create(W, G, pattern="per-row:0.5", objective="reconstruct")
    mask = _wanda_mask(p)
    alone = pcg_refit(p.W, p.G, mask, dual_iter=0, tol=1e-5)
    dual = pcg_refit(p.W, p.G, mask, tol=1e-5)
    assert alone.dual_iterations == 0 and dual.dual_iterations > 0
    assert alone.converged and dual.converged and dual.iterations < alone.iterations
    assert _relative_excess(p, dual.weights, mask) <= max(_relative_excess(p, alone.weights, mask), 1e-9)
    assert dual.describe()["dual_iterations"] == dual.dual_iterations


def test_dual_start_needs_a_factorisation_and_time():
    """No dual start where ``G`` has no positive diagonal (nothing to factorise) or the deadline
    has passed; the primal CG still returns the right weights."""
    from layerprune.problems.refit import _damped_inverse

    assert _damped_inverse(torch.zeros(4, 4)) is None
    W = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = LayerProblem.create(W, torch.zeros(8, 8, dtype=torch.float64), pattern="per-row:0.5", objective="reconstruct")
    mask = _wanda_mask(p)
    fit = pcg_refit(p.W, p.G, mask, dtype=torch.float64)
    assert fit.dual_iterations == 0 and fit.converged and torch.isfinite(fit.weights).all()
    q = _problem(16, 32, seed=12)
    late = pcg_refit(q.W, q.G, _wanda_mask(q), deadline=time.perf_counter())
    assert late.dual_iterations == 0 and late.iterations == 0


def test_params_choose_the_dual_start():
    """``Params.refit_dual_iter`` reaches the refit (0: none) and is validated."""
    from layerprune.solvers.base import refit_scored

    p = _ill_conditioned(32, 64, seed=13)
    mask = _wanda_mask(p)
    runs = {}
    for cap in (0, 24):
        info = {}
        refit_scored(p, mask, None, Params(refit="cg", refit_dual_iter=cap), info)
        runs[cap] = info["refit"]["dual_iterations"]
    assert runs[0] == 0 and runs[24] > 0
    with pytest.raises(ValueError):
        Params(refit_dual_iter=-1)


def test_chunks_give_the_same_weights():
    p = _problem(40, 32, seed=4)
    mask = _wanda_mask(p)
    whole = pcg_refit(p.W, p.G, mask, dtype=torch.float64, tol=1e-10)
    chunked = pcg_refit(p.W, p.G, mask, dtype=torch.float64, tol=1e-10, chunk_bytes=7 * 32 * 8 * 3)
    assert chunked.converged and chunked.iterations == whole.iterations
    assert torch.allclose(whole.weights, chunked.weights, rtol=0, atol=1e-6)  # only GEMM rounding differs
    assert abs(_relative_excess(p, chunked.weights, mask)) <= 1e-15


def test_zero_target_rows_refit_to_zero():
    W, G = make_arrays(3, 16, seed=5)
    W[1] = 0.0
    p = LayerProblem.create(W, G, pattern="per-row:0.5", objective="reconstruct")
    mask = _wanda_mask(p)
    start = torch.ones_like(p.W) * mask  # a bad start on the zero row
    fit = pcg_refit(p.W, p.G, mask, start, dtype=torch.float64)
    assert float(fit.weights[1].abs().max()) == 0.0 and fit.converged


def test_auto_policy_is_exact_on_small_layers_and_cg_on_large():
    small = _problem(8, 16)
    m = _wanda_mask(small)
    assert exact_refit_flops(m) <= EXACT_MAX_FLOPS
    assert refit_weights(small, m).method == "exact"
    assert refit_weights(small, m, method="cg").method == "cg"
    big_mask = torch.ones(64, 2048, dtype=torch.bool)
    assert exact_refit_flops(big_mask) > EXACT_MAX_FLOPS
    with pytest.raises(ValueError):
        refit_weights(small, m, method="fast")
    with pytest.raises(ValueError):
        Params(refit="fast")


@pytest.mark.parametrize("solver", ["sparsegpt", "admm", "wanda"])
def test_finalize_under_cg_is_honest(solver):
    p = _problem(32, 64, pattern="nm:2:4", seed=6)
    exact = make_solver(solver).solve(p, params=Params(refit="exact"))
    cg = make_solver(solver).solve(p, params=Params(refit="cg", refit_max_iter=4))
    assert torch.equal(exact.mask, cg.mask)
    assert exact.info["refit"]["method"] == "exact" and "objective_is_upper_bound" not in exact.info
    info = cg.info["refit"]
    assert info["method"] == "cg" and info["iterations"] <= 4 and info["tolerance"] == Params().refit_tol
    assert cg.info["objective_is_upper_bound"] is True and "upper bound" in info["objective"]
    assert cg.objective >= exact.objective - 1e-12 * p.scale  # an upper bound on the exact refit
    assert math.isclose(cg.objective, float(p.weight_errors(cg.weights).sum()), rel_tol=1e-12)
    assert not bool((cg.weights[~cg.mask] != 0).any())
    if "own_weights_objective" in cg.info:  # never worse than the backend's own weights
        assert cg.objective <= cg.info["own_weights_objective"] * (1 + 1e-12)
        assert (p.weight_errors(cg.weights) <= p.weight_errors(
            make_solver(solver).propose(p).weights.to(torch.float64) * cg.mask) * (1 + 1e-9) + 1e-15).all()


def test_finalize_certified_bound_stays_valid_under_cg():
    p = _problem(2, 8, seed=7)
    res = make_solver("brute").solve(p, params=Params(refit="cg", refit_tol=1e-8))
    exact = make_solver("brute").solve(p, params=Params(refit="exact"))
    assert res.lower_bound is not None and res.lower_bound <= res.objective
    assert res.status.value == "optimal" and exact.status.value == "optimal"
    assert res.objective >= exact.objective - 1e-12 * p.scale


def test_sparsegpt_start_is_improved_on_a_real_like_layer():
    p = _ill_conditioned(32, 64, seed=8)
    res = make_solver("sparsegpt").solve(p, params=Params(refit="cg"))
    assert res.objective <= res.info["own_weights_objective"]
    assert _relative_excess(p, res.weights, res.mask) <= 1e-4 * max(1.0, res.objective / p.scale)


def test_finalize_keeps_own_rows_that_cg_would_worsen():
    """From the exact minimiser, float32 CG can only add rounding: every row keeps its own weights."""
    from layerprune.solvers.base import refit_scored

    p = _problem(16, 64, seed=9)
    mask = _wanda_mask(p)
    own = p.refit(mask)
    info = {}
    weights, objective = refit_scored(p, mask, own, Params(refit="cg", refit_max_iter=2), info)
    assert (p.weight_errors(weights) <= p.weight_errors(own)).all()
    assert info["refit"]["rows_kept_own_weights"] > 0 and objective <= info["own_weights_objective"]


def test_shared_support_refit_is_one_factor_and_equals_the_per_row_solve():
    """A ``columns`` mask (every row the same support) takes the shared-factor path: same
    weights as each row's own solve, and ``auto`` picks it whatever the size."""
    from layerprune.problems import LayerProblem
    from layerprune.problems.refit import exact_refit_flops, refit_weights, shared_support

    g = torch.Generator().manual_seed(7)
    W = torch.randn(12, 20, generator=g, dtype=torch.float64)
    X = torch.randn(60, 20, generator=g, dtype=torch.float64)
    problem = LayerProblem.create(W, X.T @ X / 60, pattern="columns:9", objective="reconstruct")
    keep = torch.zeros(20, dtype=torch.bool)
    keep[torch.randperm(20, generator=g)[:9]] = True
    mask = keep.expand(12, 20).clone()
    assert shared_support(mask) and not shared_support(torch.eye(12, 20, dtype=torch.bool))
    assert exact_refit_flops(mask) == 9 ** 3 / 3 + 2 * 12 * 81
    got = problem.refit(mask)
    S = keep.nonzero().flatten()
    G = problem.G.double()
    want = torch.zeros_like(W)
    for r in range(12):
        want[r, S] = torch.linalg.solve(G[S][:, S], (G @ W[r])[S])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert refit_weights(problem, mask, method="auto").method == "exact"
