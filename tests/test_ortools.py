"""The ortools (MathOpt/GSCIP) exact backend against brute force."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ortools")

from hypothesis import given, settings, HealthCheck  # noqa: E402

from layerprune.problems import make_instance  # noqa: E402
from layerprune.problems.strategies import tiny_problems  # noqa: E402
from layerprune.solvers.base import Params, Status  # noqa: E402
from layerprune.solvers.registry import make_solver  # noqa: E402

REL = 1e-9


def _agree(problem, init=None):
    res = make_solver("ortools").solve(problem, params=Params(time_limit=30), init=init)
    ref = make_solver("brute").solve(problem)
    opt = ref.objective
    assert problem.is_feasible(res.mask)
    assert res.status == Status.OPTIMAL, (res.status, res.limit)
    assert res.objective == pytest.approx(opt, rel=1e-6, abs=1e-12 * problem.scale)
    assert res.lower_bound is not None
    assert res.lower_bound <= opt * (1 + REL) + 1e-300
    # the backend's own bound (before the contract clamps it) never exceeds the optimum
    assert res.info.get("raw_lower_bound", res.lower_bound) <= opt * (1 + REL) + 1e-300
    return res, ref


@pytest.mark.parametrize("pattern, shape", [
    ("per-row:0.5", (3, 8)), ("per-row:3", (2, 7)), ("nm:2:4", (2, 8)), ("nm:1:2", (2, 6)),
    ("unstructured:0.5", (2, 6)), ("unstructured:0.75", (3, 4)),
    ("columns:3", (3, 6)), ("columns:0.5", (2, 8)),
])
def test_matches_brute(pattern, shape):
    _agree(make_instance(*shape, pattern=pattern, seed=7))


@pytest.mark.parametrize("rank", [2, None])
def test_rank_deficient_and_init(rank):
    problem = make_instance(2, 8, pattern="per-row:4", seed=3, rank=rank)
    worst = problem.round(-problem.W.abs())  # a poor but feasible warm start
    _agree(problem, init=worst)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems(objectives=("mask",)))
def test_matches_brute_hypothesis(problem):
    _agree(problem)


def test_time_limit_is_honest():
    problem = make_instance(2, 96, pattern="per-row:0.5", seed=0)
    res = make_solver("ortools").solve(problem, params=Params(time_limit=1))
    assert res.status == Status.FEASIBLE and res.limit == "time"
    assert problem.is_feasible(res.mask)
    assert res.lower_bound is not None and 0.0 <= res.lower_bound <= res.objective
    assert res.seconds < 10


def test_rejects_reconstruct():
    from layerprune.solvers.base import SolverError
    problem = make_instance(1, 8, pattern="per-row:4", objective="reconstruct")
    with pytest.raises(SolverError):
        make_solver("ortools").solve(problem)


def test_callback_stops_and_worker_recovers():
    problem = make_instance(3, 8, pattern="per-row:4", seed=5)
    calls = []

    def stop_after_first(event):
        calls.append(event)
        return True

    res = make_solver("ortools").solve(problem, callback=stop_after_first)
    assert len(calls) == 1 and res.status == Status.FEASIBLE and res.limit == "interrupted"
    assert problem.is_feasible(res.mask)
    assert res.lower_bound <= make_solver("brute").solve(problem).objective * (1 + REL)
    _agree(problem)  # the killed worker is replaced on the next solve


def test_coexists_with_cvxpy():
    pytest.importorskip("cvxpy")
    import cvxpy  # noqa: F401  (loads highspy, whose libhighs clashes with OR-Tools' in-process)

    _agree(make_instance(2, 8, pattern="nm:2:4", seed=11))


def test_in_process_mode():
    code = (
        "from layerprune.problems import make_instance\n"
        "from layerprune.solvers.registry import make_solver\n"
        "p = make_instance(2, 8, pattern='unstructured:0.5', seed=2)\n"
        "r = make_solver('ortools', isolate=False).solve(p)\n"
        "b = make_solver('brute').solve(p)\n"
        "assert r.status.value == 'optimal', r\n"
        "assert abs(r.objective - b.objective) <= 1e-9 * b.objective, (r.objective, b.objective)\n"
        "assert r.lower_bound <= b.objective\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
