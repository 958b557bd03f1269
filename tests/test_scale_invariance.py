"""Every exact backend is scale-invariant: ``W → cW`` scales the optimum by c², ``G → cG`` by c,
and the backend proves it at every scale (SCIP's absolute tolerances once made tiny weights
void its perspective cones: "optimal" masks 1.2–7× the optimum at c = 1e-6)."""
import pytest

from layerprune.problems import LayerProblem, make_arrays
from layerprune.solvers import Params, Status, get_solver_class, make_solver, solver_names

SCALES = [1e-8, 1e-5, 1e-2, 1e3]
EXACT = [n for n in solver_names() if n != "brute" and get_solver_class(n).exact]
CASES = [(name, objective, pattern) for name in EXACT for objective in ("mask", "reconstruct")
         for pattern in ("per-row:3", "nm:1:2")]


@pytest.mark.parametrize("name, objective, pattern", CASES)
@pytest.mark.parametrize("seed", [0, 4])
def test_exact_backends_prove_the_scaled_optimum(name, objective, pattern, seed):
    W, G = make_arrays(2, 6, seed=seed, n_tokens=24)
    base = LayerProblem.create(W, G, pattern=pattern, objective=objective)
    solver = make_solver(name)
    if not get_solver_class(name).is_installed() or solver.why_not(base):
        pytest.skip(f"{name} cannot take {pattern} / {objective} here")
    opt = make_solver("brute").solve(base).objective
    for target, c in [(t, c) for t in ("W", "G") for c in SCALES]:
        p = base.replace(**{target: (W if target == "W" else G) * c})
        factor = c * c if target == "W" else c
        best = make_solver("brute").solve(p).objective
        assert best == pytest.approx(factor * opt, rel=1e-9)
        res = solver.solve(p, params=Params(time_limit=30, threads=1))
        where = (name, objective, pattern, seed, target, c)
        assert res.status == Status.OPTIMAL, (where, res.status, res.limit, res.lower_bound, res.objective)
        assert res.objective == pytest.approx(best, rel=1e-6), where
        assert res.lower_bound <= best * (1 + 1e-9), where
