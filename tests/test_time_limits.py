"""Time limits hold: every time-limited backend returns within ``1.1·limit + 2`` seconds.

On a mid-size synthetic row (256 inputs) the set-up work that cannot be interrupted — the
mixing-method and log-det diagonals, SDPs, factorisations, probing, polishing, node convexity
shifts — outlasted a 2 s limit by tens of seconds before it was predicted and skipped or bounded
(``bnb`` and ``relax-perspective``: the log-det barrier alone took ~50 s at n = 256; ``scip``
reconstruct ~30 s). ``benchmarks/time_limits.py`` measures the same on whole real rows.
"""
from __future__ import annotations

import pytest

from layerprune.problems import make_instance
from layerprune.solvers import Params, Status, get_solver_class, make_solver, solver_names

LIMIT = 2.0
#: the backends that take a time limit; relax-sdp takes at most 128 inputs
CASES = [("bnb", 256), ("scip", 256), ("ortools", 256), ("relax-qp", 256), ("relax-sdp", 128),
         ("relax-perspective", 256), ("sparsefw", 256), ("sparseswaps", 256), ("admm", 256),
         ("alps", 256)]


def allowed(limit: float) -> float:
    return 1.1 * limit + 2.0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mask", "reconstruct"])
@pytest.mark.parametrize("name,d_in", CASES)
def test_a_time_limit_holds_on_a_mid_size_row(name, d_in, objective):
    if name not in solver_names() or not get_solver_class(name).is_installed():
        pytest.skip(f"{name} not installed")
    problem = make_instance(1, d_in, pattern="per-row:0.5", objective=objective, seed=0)
    solver = make_solver(name)
    if solver.why_not(problem):
        pytest.skip(solver.why_not(problem))
    res = solver.solve(problem, params=Params(time_limit=LIMIT))
    assert res.seconds <= allowed(LIMIT), (name, objective, res.seconds, res.info)
    assert res.mask is not None and res.status in (Status.OPTIMAL, Status.FEASIBLE)
    if res.lower_bound is not None:
        assert res.lower_bound <= res.objective * (1 + 1e-9) + 1e-12 * problem.scale
