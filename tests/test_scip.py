"""The SCIP exact backend: agrees with brute force, bounds stay valid, limits stay honest."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pyscipopt")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from layerprune.problems import LayerProblem, make_arrays, make_instance  # noqa: E402
from layerprune.problems.strategies import tiny_problems  # noqa: E402
from layerprune.solvers import Params, Status, make_solver  # noqa: E402
from layerprune.solvers.scip import max_diagonal, psd_factor  # noqa: E402

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


@pytest.mark.parametrize("objective", ["mask", "reconstruct"])
@pytest.mark.parametrize("pattern", ["per-row:3", "nm:2:4", "unstructured:0.5", "columns:3"])
def test_explicit_cases_match_brute(pattern, objective):
    W, G = make_arrays(2, 8 if pattern.startswith("nm") else 6, seed=3, rank=None)
    p = LayerProblem.create(W, G, pattern=pattern, objective=objective)
    brute, res = _check_against_brute(p)
    assert res.status == Status.OPTIMAL, res.info
    assert res.objective == pytest.approx(brute.objective, rel=REL)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems(max_d_in=6, max_d_out=2))
def test_hypothesis_matches_brute(p):
    _check_against_brute(p)


def test_rank_deficient_reconstruct():
    W, G = make_arrays(1, 8, seed=1, rank=6)
    p = LayerProblem.create(W, G, pattern="per-row:3", objective="reconstruct")
    brute, res = _check_against_brute(p)
    assert res.status == Status.OPTIMAL
    assert res.objective == pytest.approx(brute.objective, rel=REL)


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
    for method in ("sdp", "eig"):
        for nonneg in (False, True):
            d = max_diagonal(G, method, nonneg=nonneg)
            lam = np.linalg.eigvalsh(G - np.diag(d))[0]
            assert lam >= min(lam0, 0) - 1e-12 * np.abs(G).max()
            if nonneg:
                assert (d >= 0).all()
    Q = np.diag(W[0]) @ G @ np.diag(W[0])
    assert max_diagonal(Q, "sdp").sum() > 0  # the SDP moves something out of the quadratic


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
