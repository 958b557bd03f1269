"""Convex relaxation backends: valid bounds, feasible masks, SDP ≥ QP."""
from __future__ import annotations

import pytest

pytest.importorskip("cvxpy")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from layerprune.problems import make_instance  # noqa: E402
from layerprune.problems.strategies import tiny_problems  # noqa: E402
from conftest import examples  # noqa: E402
from layerprune.solvers import Params  # noqa: E402
from layerprune.solvers.base import Status  # noqa: E402
from layerprune.solvers.registry import make_solver  # noqa: E402

REL = 1e-7
SETTINGS = dict(max_examples=examples(0.8), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_against_brute(name: str, problem) -> None:
    opt = make_solver("brute").solve(problem).objective
    res = make_solver(name).solve(problem)
    raw = res.info.get("raw_lower_bound", res.lower_bound)
    assert res.lower_bound is not None
    atol = 1e-12 * problem.scale  # float64 round-off is relative to the problem's scale
    assert raw <= opt * (1 + REL) + atol, (raw, opt)
    assert problem.is_feasible(res.mask)
    assert res.objective >= opt * (1 - REL) - atol
    assert res.lower_bound <= res.objective
    if res.status == Status.OPTIMAL:
        assert res.objective - res.lower_bound <= 1e-4 * res.objective + atol


@settings(**SETTINGS)
@given(tiny_problems(objectives=("mask",)))
def test_relax_qp_bound_below_optimum(problem):
    _check_against_brute("relax-qp", problem)


@settings(**SETTINGS)
@given(tiny_problems(objectives=("mask",)))
def test_relax_sdp_bound_below_optimum(problem):
    _check_against_brute("relax-sdp", problem)


@settings(**SETTINGS)
@given(tiny_problems(objectives=("reconstruct",)))
def test_relax_perspective_bound_below_optimum(problem):
    _check_against_brute("relax-perspective", problem)


@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4", "columns:0.5"])
def test_sdp_bound_dominates_qp(pattern):
    """Shor SDP (with squared budgets) ⊇ every convexified QP: its bound is at least as high."""
    problem = make_instance(4, 32, pattern=pattern, seed=3)
    qp = make_solver("relax-qp").solve(problem)
    sdp = make_solver("relax-sdp").solve(problem)
    # both certificates lie within solver tolerance of their exact relaxation values
    assert sdp.lower_bound >= qp.lower_bound - 1e-6 * qp.objective
    assert sdp.lower_bound > 0.0


def test_qp_convexification_helps():
    """The scaled diagonal shift never weakens the plain continuous relaxation here."""
    problem = make_instance(4, 32, seed=1)
    plain = make_solver("relax-qp", mu="none").solve(problem).lower_bound
    shifted = make_solver("relax-qp", mu="scaled").solve(problem).lower_bound
    assert shifted >= plain - 1e-9 * abs(plain)


def test_bounds_are_scale_covariant():
    """W → cW scales every bound by c² (the scaled problem is solved, then mapped back)."""
    p1 = make_instance(2, 16, seed=5)
    p2 = p1.replace(W=3.0 * p1.W)
    for name in ("relax-qp", "relax-sdp"):
        b1 = make_solver(name).solve(p1).lower_bound
        b2 = make_solver(name).solve(p2).lower_bound
        assert b2 == pytest.approx(9.0 * b1, rel=1e-5)


def test_size_limit_and_objective_declared():
    big = make_instance(1, 256)
    assert make_solver("relax-sdp").why_not(big) is not None
    assert make_solver("relax-qp").why_not(make_instance(1, 16, objective="reconstruct")) is not None
    assert make_solver("relax-perspective").why_not(make_instance(1, 16)) is not None


def test_time_limit_is_honest():
    problem = make_instance(8, 32)
    res = make_solver("relax-sdp").solve(problem, params=Params(time_limit=1e-6))
    assert res.status != Status.OPTIMAL
    assert problem.is_feasible(res.mask)
    opt_ub = make_solver("relax-qp").solve(problem).objective
    assert res.lower_bound <= opt_ub
