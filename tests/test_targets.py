"""Dense targets (CONTRACT.md, issue 16 item 3): the error of kept weights ``v_r`` is
``‖X̃v_r − Xw_r‖²`` with ``X̃`` the pruned model's inputs and ``X`` the dense model's.

Checked on tiny instances made from explicit ``X̃``, ``X``: the problem's error is that norm;
the ``reconstruct`` refit is its least-squares minimiser; brute force is the optimum over every
mask; every backend that takes targets returns a feasible mask no better than brute force, and
its raw bound is no larger; ``C = G0 = G`` is today's problem; a bad ``C``/``G0`` is one
ProblemError.
"""
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from layerprune.cli import main
from layerprune.problems import LayerProblem, ProblemError, load_instance, make_arrays, save_instance
from layerprune.problems.strategies import tiny_target_problems
from layerprune.solvers import Params, Status, get_solver_class, make_solver, solver_names

from conftest import examples, rel_tol

INSTALLED = [n for n in solver_names() if get_solver_class(n).is_installed()]


def _explicit_error(Xt, X, w, v):
    """‖X̃v − Xw‖² / n, in float64 numpy."""
    return float(np.sum((Xt @ v - X @ w) ** 2)) / X.shape[0]


def _inputs(d_in=5, n=40, seed=0, drift=0.4):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d_in)) * np.exp(rng.standard_normal(d_in))
    Xt = X + drift * rng.standard_normal((n, d_in))
    return Xt, X


def _target_problem(W, Xt, X, **kw):
    n = X.shape[0]
    return LayerProblem.create(W, Xt.T @ Xt / n, C=Xt.T @ X / n, G0=X.T @ X / n, **kw)


# ------------------------------------------------------------------ the error
@settings(max_examples=examples(1.0))
@given(tiny_target_problems(max_d_in=6, max_d_out=3))
def test_error_is_the_distance_to_the_dense_outputs(case):
    problem, Xt, X = case
    rng = np.random.default_rng(0)
    W = problem.W.numpy()
    V = rng.standard_normal(W.shape) * np.abs(W).max()
    got = problem.weight_errors(torch.as_tensor(V)).numpy()
    want = np.array([_explicit_error(Xt, X, W[r], V[r]) for r in range(W.shape[0])])
    scale = max(problem.scale, float(np.sum((Xt @ V.T) ** 2)) / X.shape[0])
    assert got == pytest.approx(want, rel=1e-9, abs=1e-10 * scale)
    # the mask objective keeps the dense weights on the mask
    mask = problem.round(torch.as_tensor(rng.random(W.shape)))
    if problem.objective_kind == "mask":
        kept = W * mask.numpy()
        want = sum(_explicit_error(Xt, X, W[r], kept[r]) for r in range(W.shape[0]))
        assert problem.objective(mask) == pytest.approx(want, rel=1e-9, abs=1e-10 * problem.scale)


@settings(max_examples=examples(1.0))
@given(tiny_target_problems(max_d_in=6, max_d_out=2, objectives=("reconstruct",)))
def test_refit_is_the_least_squares_fit_to_the_dense_outputs(case):
    problem, Xt, X = case
    mask = problem.round(torch.as_tensor(np.random.default_rng(1).random(problem.shape)))
    V = problem.refit(mask).numpy()
    W, m = problem.W.numpy(), mask.numpy()
    for r in range(problem.d_out):
        S = np.flatnonzero(m[r])
        best = np.linalg.lstsq(Xt[:, S], X @ W[r], rcond=None)[0] if S.size else np.zeros(0)
        v = np.zeros(problem.d_in)
        v[S] = best
        want = _explicit_error(Xt, X, W[r], v)
        got = _explicit_error(Xt, X, W[r], V[r])
        assert got <= want + rel_tol(want, 1e-7, 1e-10, problem.scale)
        assert float(problem.row_errors(mask)[r]) == pytest.approx(want, rel=1e-7, abs=1e-10 * problem.scale)


def _all_masks(problem):
    """Every feasible mask of a per-row problem (tiny: d_in ≤ 5, d_out ≤ 2)."""
    k, d = problem.pattern.keep, problem.d_in
    rows = []
    for comb in itertools.combinations(range(d), k):
        m = np.zeros(d, bool)
        m[list(comb)] = True
        rows.append(m)
    for choice in itertools.product(rows, repeat=problem.d_out):
        yield np.stack(choice)


@pytest.mark.parametrize("objective", ["mask", "reconstruct"])
@pytest.mark.parametrize("seed", range(4))
def test_brute_force_is_the_optimum_of_the_explicit_error(objective, seed):
    Xt, X = _inputs(d_in=5, n=4 if seed % 2 else 30, seed=seed)  # n < d_in: singular G
    W = np.random.default_rng(seed + 10).standard_normal((2, 5))
    problem = _target_problem(W, Xt, X, pattern="per-row:2", objective=objective)
    res = make_solver("brute").solve(problem)
    assert res.status == Status.OPTIMAL
    best = math.inf
    for m in _all_masks(problem):
        if objective == "mask":
            V = W * m
        else:
            V = np.zeros_like(W)
            for r in range(2):
                S = np.flatnonzero(m[r])
                V[r, S] = np.linalg.lstsq(Xt[:, S], X @ W[r], rcond=None)[0]
        best = min(best, sum(_explicit_error(Xt, X, W[r], V[r]) for r in range(2)))
    assert res.objective == pytest.approx(best, rel=1e-8)
    assert res.lower_bound == pytest.approx(best, rel=1e-8)


# ------------------------------------------------------------------ every backend
TAKERS = {(n, o) for n in INSTALLED for o in ("mask", "reconstruct")
          if get_solver_class(n).why_not_kind("per-row", o, target=True) is None and n != "brute"}


@settings(max_examples=examples(0.6))
@given(tiny_target_problems(max_d_in=6, max_d_out=2, coupled=False))
def test_backends_with_targets_never_beat_brute_force_and_bound_below_it(case):
    problem, _, _ = case
    best = make_solver("brute").solve(problem)
    slack = rel_tol(best.objective, 1e-6, scale=problem.scale)
    for name in INSTALLED:
        solver = make_solver(name)
        if name == "brute" or solver.why_not(problem):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = solver.propose(problem, Params(time_limit=30, threads=1)).lower_bound
            res = solver.solve(problem, params=Params(time_limit=30, threads=1))
        assert problem.is_feasible(res.mask), name
        assert res.objective >= best.objective - slack, (name, res.objective, best.objective)
        if raw is not None and not math.isnan(raw):
            assert raw <= best.objective + slack, (name, raw, best.objective)
        if get_solver_class(name).exact and res.status == Status.OPTIMAL:
            assert res.objective == pytest.approx(best.objective, rel=1e-6, abs=slack), name


def test_who_takes_targets():
    """Reconstruct: every backend (the standard view). Mask: the ones that ignore the objective
    or model the linear term; the others refuse in one line."""
    takes_mask = {n for n in INSTALLED if get_solver_class(n).why_not_kind(_kind(n), "mask", target=True) is None}
    assert {"brute", "magnitude", "wanda", "ria", "sparseswaps"} <= takes_mask
    for name in set(INSTALLED) - takes_mask:
        why = get_solver_class(name).why_not_kind(_kind(name), "mask", target=True)
        assert "\n" not in why and "cannot take objective" in why
    for name in INSTALLED:
        cls = get_solver_class(name)
        if "reconstruct" in cls.objectives:
            assert cls.why_not_kind(_kind(name), "reconstruct", target=True) is None, name


def _kind(name):
    """``per-row``, or the first pattern kind of a backend that does not take it (``alternating``: columns)."""
    patterns = get_solver_class(name).patterns
    return "per-row" if "per-row" in patterns else sorted(patterns)[0]


@pytest.mark.parametrize("seed", range(3))
def test_sparseswaps_ends_1_swap_optimal_for_the_target_error(seed):
    Xt, X = _inputs(d_in=8, n=40, seed=seed, drift=0.8)
    W = np.random.default_rng(seed).standard_normal((3, 8))
    problem = _target_problem(W, Xt, X, pattern="per-row:4", objective="mask")
    res = make_solver("sparseswaps").solve(problem, params=Params(dtype=torch.float64))
    start = make_solver("wanda").solve(problem).objective
    assert res.objective <= start + 1e-12 * problem.scale
    base = problem.row_errors(res.mask)
    for r in range(3):
        kept, pruned = res.mask[r].nonzero().flatten(), (~res.mask[r]).nonzero().flatten()
        for i in kept.tolist():
            for j in pruned.tolist():
                m = res.mask.clone()
                m[r, i], m[r, j] = False, True
                assert float(problem.row_errors(m)[r]) >= float(base[r]) - 1e-9 * problem.scale, (r, i, j)


def test_the_reconstruct_optimum_shifts_by_the_offsets():
    Xt, X = _inputs(d_in=6, n=50, seed=3)
    W = np.random.default_rng(3).standard_normal((2, 6))
    problem = _target_problem(W, Xt, X, pattern="per-row:3", objective="reconstruct")
    view = problem.standard_view()
    assert not view.has_target and problem.target_offset >= 0.0
    a, b = make_solver("brute").solve(problem), make_solver("brute").solve(view)
    assert torch.equal(a.mask, b.mask)
    assert a.objective == pytest.approx(b.objective + problem.target_offset, rel=1e-10)
    # the offset is ‖(I − P_X̃) X w‖²: what no weights on X̃ can reach
    P = Xt @ np.linalg.pinv(Xt)
    want = sum(float(np.sum(((np.eye(50) - P) @ X @ W[r]) ** 2)) for r in range(2)) / 50
    assert problem.target_offset == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------ today's problem
@pytest.mark.parametrize("objective", ["mask", "reconstruct"])
def test_c_equal_g0_equal_g_is_todays_problem(objective):
    W, G = make_arrays(3, 8, seed=5)
    plain = LayerProblem.create(W, G, pattern="per-row:4", objective=objective)
    same = LayerProblem.create(W, G, C=G.copy(), G0=G.copy(), pattern="per-row:4", objective=objective)
    assert not same.has_target and same.C is None
    # forced through the target formulas: the same values up to round-off
    forced = LayerProblem(plain.W, plain.G, plain.pattern, objective, plain.G.clone(), plain.G.clone())
    G64 = plain.G  # T = G⁺Gw is w projected on range(G): the same outputs X̃t = Xw
    assert torch.allclose(forced.target.T @ G64, plain.W @ G64, rtol=1e-8, atol=1e-10 * float(G64.abs().max()))
    assert float(forced.target.offsets.abs().max()) <= 1e-12 * plain.scale
    for name in ["brute", "wanda", "sparsegpt", "sparseswaps", "admm", "alps", "bnb"]:
        solver = make_solver(name)
        if solver.why_not(plain):
            continue
        a = solver.solve(plain, params=Params(dtype=torch.float64))
        b = solver.solve(same, params=Params(dtype=torch.float64))
        assert torch.equal(a.mask, b.mask) and a.objective == b.objective, name
        assert forced.objective(a.mask) == pytest.approx(a.objective, rel=1e-8, abs=1e-12 * plain.scale), name


def test_scaling_keeps_the_target_objective():
    Xt, X = _inputs(d_in=6, n=30, seed=7)
    W = np.random.default_rng(7).standard_normal((2, 6))
    for objective in ("mask", "reconstruct"):
        p = _target_problem(W, Xt, X, pattern="nm:2:3", objective=objective)
        ps, _ = p.scaled()
        m = p.round(torch.as_tensor(np.random.default_rng(0).random(p.shape)))
        assert ps.objective(m) == pytest.approx(p.objective(m), rel=1e-10)


# ------------------------------------------------------------------ bad targets
def _bad_cases():
    Xt, X = _inputs(d_in=3, n=10)
    G, C, G0 = Xt.T @ Xt, Xt.T @ X, X.T @ X
    nan = C.copy()
    nan[0, 1] = np.nan
    return {
        "C without G0": (dict(C=C), "C is given without G0"),
        "G0 without C": (dict(G0=G0), "G0 is given without C"),
        "C shape": (dict(C=C[:2], G0=G0), "C must be d_in × d_in"),
        "G0 shape": (dict(C=C, G0=np.eye(4)), "G0 must be d_in × d_in"),
        "C NaN": (dict(C=nan, G0=G0), "C contains NaN"),
        "G0 inf": (dict(C=C, G0=np.full((3, 3), np.inf)), "G0 contains NaN or inf"),
        "G0 not symmetric": (dict(C=C, G0=G0 + np.triu(np.ones((3, 3)))), "G0 is not symmetric"),
        "C too large": (dict(C=-C * 1e20, G0=G0), "do not fit G"),
        "C integer strings": (dict(C=np.array([["a"] * 3] * 3), G0=G0), "C is not a numeric array"),
    }, G


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_targets_one_problem_error(case):
    cases, G = _bad_cases()
    extra, match = cases[case]
    with pytest.raises(ProblemError, match=match) as info:
        LayerProblem.create(np.ones((2, 3)), G, **extra)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ files and the CLI
def test_solve_on_a_file_with_targets(tmp_path, capsys):
    Xt, X = _inputs(d_in=6, n=40, seed=2)
    W = np.random.default_rng(2).standard_normal((3, 6))
    n = X.shape[0]
    save_instance(tmp_path / "t.npz", W, Xt.T @ Xt / n, C=Xt.T @ X / n, G0=X.T @ X / n)
    problem = load_instance(tmp_path / "t.npz", pattern="per-row:3", objective="reconstruct")
    assert problem.has_target
    code = main(["solve", str(tmp_path / "t.npz"), "--solver", "sparsegpt", "--pattern", "per-row:3",
                 "--objective", "reconstruct", "--json", "--save-weights", str(tmp_path / "v.npy")])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"solver", "status", "limit", "objective", "lower_bound", "gap", "seconds", "iterations"}
    V = np.load(tmp_path / "v.npy")
    want = sum(_explicit_error(Xt, X, W[r], V[r]) for r in range(3))
    assert record["objective"] == pytest.approx(want, rel=1e-9)
    code = main(["solve", str(tmp_path / "t.npz"), "--solver", "scip", "--pattern", "per-row:3",
                 "--objective", "mask", "--json"])
    err = capsys.readouterr().err
    if get_solver_class("scip").is_installed():
        assert code == 2 and "dense target" in err and err.count("\n") == 1


def test_cg_refit_fits_the_dense_target():
    """Under targets the CG refit converges to the exact (target) refit, not to W's."""
    from layerprune.problems.refit import refit_weights

    gen = torch.Generator().manual_seed(5)
    Xt, X = torch.randn(200, 24, generator=gen, dtype=torch.float64), torch.randn(200, 24, generator=gen, dtype=torch.float64)
    X = 0.7 * Xt + 0.3 * X
    W = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    p = LayerProblem.create(W, Xt.T @ Xt, C=Xt.T @ X, G0=X.T @ X, pattern="per-row:12", objective="reconstruct")
    mask = p.round(torch.rand(6, 24, generator=gen, dtype=torch.float64))
    exact = p.refit(mask)
    cg = refit_weights(p, mask, method="cg", tol=1e-10, max_iter=500, dtype=torch.float64)
    assert torch.allclose(cg.weights, exact, atol=1e-6 * float(exact.abs().max()))
    assert p.objective(mask, weights=cg.weights) <= p.objective(mask) * (1 + 1e-9)
