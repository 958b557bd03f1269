"""One conformance suite, run over every registered backend.

For each backend and every (pattern, objective) it declares: the mask is feasible, the
reported objective is the problem's own re-score, the weights vanish off the mask, the
status is honest, a lower bound never exceeds the brute-force optimum, no feasible result
beats it, exact backends reach it, and an unsupported problem raises SolverError.
"""
import subprocess
import sys

import pytest
import torch

from layerprune.problems import make_instance
from layerprune.solvers import Params, SolverError, Status, get_solver_class, make_solver, solver_names

from conftest import rel_tol

PATTERNS = ["per-row:4", "nm:2:4", "unstructured:0.5", "columns:5"]
OBJECTIVES = ["mask", "reconstruct"]
NAMES = solver_names()
_OPT = {}


def optimum(pattern, objective, seed=0):
    key = (pattern, objective, seed)
    if key not in _OPT:
        problem = make_instance(3, 8, pattern=pattern, objective=objective, seed=seed)
        _OPT[key] = (problem, make_solver("brute").solve(problem).objective)
    return _OPT[key]


def cases():
    for name in NAMES:
        cls = get_solver_class(name)
        for pattern in PATTERNS:
            for objective in OBJECTIVES:
                supported = pattern.split(":")[0] in cls.patterns and objective in cls.objectives
                yield pytest.param(name, pattern, objective, supported, id=f"{name}-{pattern}-{objective}")


@pytest.mark.parametrize("name, pattern, objective, supported", list(cases()))
def test_backend_conforms(name, pattern, objective, supported):
    cls = get_solver_class(name)
    if not cls.is_installed():
        pytest.skip(f"{name}: {cls.missing_packages()} not installed")
    problem, best = optimum(pattern, objective)
    solver = make_solver(name)
    if not supported:
        with pytest.raises(SolverError, match="cannot take"):
            solver.solve(problem)
        return
    res = solver.solve(problem, params=Params(time_limit=60, seed=0))
    assert res.solver == name
    assert res.status in (Status.OPTIMAL, Status.FEASIBLE), res
    assert problem.is_feasible(res.mask)
    assert res.mask.dtype == torch.bool and tuple(res.mask.shape) == problem.shape
    # objective is the problem's own re-score; weights vanish off the mask
    assert res.objective == pytest.approx(problem.objective(res.mask), rel=1e-12, abs=1e-15)
    assert not bool(res.weights[~res.mask].any())
    assert res.objective == pytest.approx(problem.objective(res.mask, weights=res.weights), rel=1e-9, abs=1e-15)
    # nothing beats the optimum; no bound exceeds it
    slack = rel_tol(best, 1e-6, scale=problem.scale)
    assert res.objective >= best - slack
    if res.lower_bound is not None:
        assert cls.certifies, "only certifying backends report bounds"
        assert res.lower_bound <= best + slack, (res.lower_bound, best)
        assert res.info.get("raw_lower_bound", res.lower_bound) <= best + slack
        assert res.bound_source
    if res.status == Status.OPTIMAL:
        assert res.lower_bound is not None
        assert res.gap <= 1e-4 or res.objective - res.lower_bound <= 1e-12 * problem.scale
    if cls.exact:
        assert res.status == Status.OPTIMAL, res
        assert res.objective == pytest.approx(best, rel=1e-6, abs=1e-12 * problem.scale)
    json = res.to_json()
    assert set(json) == {"solver", "status", "limit", "objective", "lower_bound", "gap", "seconds", "iterations"}


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_declared(name):
    cls = get_solver_class(name)
    caps = cls.capabilities()
    assert caps["name"] == name
    assert set(caps["patterns"]) <= {"per-row", "nm", "unstructured", "columns"} and caps["patterns"]
    assert set(caps["objectives"]) <= {"mask", "reconstruct"} and caps["objectives"]
    assert caps["description"]
    assert not cls.exact or cls.certifies


@pytest.mark.parametrize("name", NAMES)
def test_scaling_w_scales_objective_quadratically(name):
    cls = get_solver_class(name)
    if not cls.is_installed() or "per-row" not in cls.patterns:
        pytest.skip("not applicable")
    objective = "mask" if "mask" in cls.objectives else "reconstruct"
    problem = make_instance(2, 8, pattern="per-row:4", objective=objective, seed=3)
    c = 3.0
    scaled = problem.replace(W=problem.W * c)
    a = make_solver(name).solve(problem, params=Params(time_limit=60))
    b = make_solver(name).solve(scaled, params=Params(time_limit=60))
    if cls.exact or not cls.certifies:
        # exact: the optimum scales; heuristics here are scale-invariant rules
        assert b.objective == pytest.approx(c * c * a.objective, rel=1e-6)
    else:  # relaxations: the bound scales (solver tolerances allow a little slack)
        assert b.lower_bound == pytest.approx(c * c * a.lower_bound, rel=1e-3, abs=1e-12)


def test_import_layerprune_imports_no_solver_package():
    code = ("import sys, layerprune, layerprune.solvers as s; s.list_solvers(); "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('pyscipopt','ortools','cvxpy','transformers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
