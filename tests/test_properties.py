"""Hypothesis properties tying the backends together on tiny instances.

brute = every exact backend; every lower bound ≤ optimum ≤ every feasible result;
W→cW scales the optimum by c²; keeping more never hurts (``reconstruct``; for ``mask`` it is
false, see the counterexample below); reconstruct ≤ mask.
Tolerances are relative to the objective plus a tiny multiple of ``problem.scale``.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.problems import LayerProblem, make_arrays
from layerprune.problems.strategies import tiny_problems
from layerprune.solvers import Params, Status, get_solver_class, make_solver, solver_names

from conftest import examples, rel_tol


def _installed(pred):
    out = []
    for name in solver_names():
        cls = get_solver_class(name)
        if cls.is_installed() and pred(cls) and name != "brute":
            out.append(name)
    return out


EXACT = _installed(lambda c: c.exact)
ALL = _installed(lambda c: True)


def _takes(name, problem):
    return make_solver(name).why_not(problem) is None


@settings(max_examples=examples(0.8))
@given(tiny_problems(max_d_in=6, max_d_out=2))
def test_bound_le_optimum_le_every_feasible_result(problem):
    best = make_solver("brute").solve(problem)
    assert best.status == Status.OPTIMAL
    for name in ALL:
        if not _takes(name, problem):
            continue
        res = make_solver(name).solve(problem, params=Params(time_limit=30))
        assert problem.is_feasible(res.mask), name
        slack = rel_tol(best.objective, 1e-6, scale=problem.scale)
        assert res.objective >= best.objective - slack, name
        if res.lower_bound is not None:
            raw = res.info.get("raw_lower_bound", res.lower_bound)
            assert raw <= best.objective + slack, (name, raw, best.objective)
        if name in EXACT:
            assert res.status == Status.OPTIMAL, (name, res)
            assert res.objective == pytest.approx(best.objective, rel=1e-6, abs=slack), name


@settings(max_examples=examples(0.6))
@given(tiny_problems(max_d_in=6, max_d_out=2), st.sampled_from([0.125, 4.0]))
def test_scaling_w_scales_the_optimum(problem, c):
    # powers of two: cW is exact in float32 storage too (0.1·W rounded there, and a nearly
    # singular G amplified that to 1.4e-7 relative: a float32 instance failed at c = 0.1)
    a = make_solver("brute").solve(problem).objective
    b = make_solver("brute").solve(problem.replace(W=problem.W * c)).objective
    assert b == pytest.approx(c * c * a, rel=1e-7, abs=1e-12 * c * c * problem.scale)


@settings(max_examples=examples(0.6))
@given(st.integers(3, 7), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_keeping_more_never_hurts_reconstruct(d_in, d_out, seed):
    """A larger support can only lower min_v (w − v)ᵀG(w − v): the optimum is monotone in K."""
    W, G = make_arrays(d_out, d_in, seed=seed)
    problems = [LayerProblem.create(W, G, pattern=f"per-row:{k}", objective="reconstruct") for k in range(d_in + 1)]
    values = [make_solver("brute").solve(p).objective for p in problems]
    for less, more in zip(values, values[1:]):
        assert more <= less + rel_tol(less, scale=problems[0].scale)
    assert values[-1] == pytest.approx(0.0, abs=1e-12 * problems[0].scale)


def test_keeping_more_can_hurt_the_mask_objective():
    """With fixed weights, pruned weights can cancel: w = (1, 1), G = [[1, −1], [−1, 1]] has
    error 0 with both pruned but 1 with one kept, so monotonicity is not a property of `mask`."""
    W, G = [[1.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]]
    keep0 = make_solver("brute").solve(LayerProblem.create(W, G, pattern="per-row:0")).objective
    keep1 = make_solver("brute").solve(LayerProblem.create(W, G, pattern="per-row:1")).objective
    assert keep0 == 0.0 and keep1 == pytest.approx(1.0)


@settings(max_examples=examples(0.6))
@given(tiny_problems(max_d_in=6, max_d_out=2, objectives=("mask",)))
def test_reconstruct_optimum_le_mask_optimum(problem):
    m = make_solver("brute").solve(problem).objective
    r = make_solver("brute").solve(problem.replace(objective="reconstruct")).objective
    assert r <= m + rel_tol(m, scale=problem.scale)
