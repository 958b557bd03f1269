"""The scalable torch solvers: SparseSwaps (mask) and ADMM (reconstruct).

SparseSwaps: the swap gain formula equals the objective's change, the search never worsens
its warm start, and it stops at a true 1-swap local optimum (checked by enumerating every
swap in float64). ADMM: the cubic schedule, feasibility even when stopped early, and it
improves on the magnitude mask's exact refit.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.problems import make_instance
from layerprune.problems.strategies import tiny_problems
from layerprune.solvers import Params, make_solver
from layerprune.solvers.admm import schedule_fraction
from layerprune.solvers.sparseswaps import best_block_pairs, best_pairs, swap_terms

from conftest import examples, rel_tol


def _swap_neighbours(problem, mask):
    """Every mask one feasible swap away (in-row; in-block for nm)."""
    m = getattr(problem.pattern, "m", problem.d_in)
    for r in range(problem.d_out):
        for i, j in itertools.product(range(problem.d_in), repeat=2):
            if mask[r, i] and not mask[r, j] and i // m == j // m:
                other = mask.clone()
                other[r, i], other[r, j] = False, True
                yield other


def test_swap_gain_equals_objective_change():
    problem = make_instance(3, 12, pattern="per-row:6", objective="mask", seed=4).to(dtype=torch.float64)
    mask = problem.round(torch.rand(3, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    W, G = problem.W, problem.G
    C = (W * ~mask) @ G
    a, b = swap_terms(W, C, torch.diagonal(G), mask)
    base = problem.row_errors(mask)
    for r in range(3):
        I = mask[r].nonzero()[:, 0][None, :]
        J = (~mask[r]).nonzero()[:, 0][None, :]
        delta, i, j = best_pairs(a[r:r + 1], b[r:r + 1], W[r:r + 1], G, I, J)
        other = mask.clone()
        other[r, i], other[r, j] = False, True
        assert float(delta) == pytest.approx(float(problem.row_errors(other)[r] - base[r]), rel=1e-9, abs=1e-12)
        # it is the best single swap of the row
        best = min(float(problem.row_errors(o)[r]) for o in _swap_neighbours(problem, mask) if not (o[r] == mask[r]).all())
        assert float(base[r] + delta) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_block_pairs_stay_in_blocks():
    problem = make_instance(4, 16, pattern="nm:2:4", objective="mask", seed=2).to(dtype=torch.float64)
    mask = problem.round(problem.W.abs())
    W, G = problem.W, problem.G
    a, b = swap_terms(W, (W * ~mask) @ G, torch.diagonal(G), mask)
    blocks = torch.stack([G[s:s + 4, s:s + 4] for s in range(0, 16, 4)])
    delta, i, j = best_block_pairs(a, b, W, blocks)
    assert bool((i // 4 == j // 4).all())
    assert bool(mask[torch.arange(4), i].all()) and not bool(mask[torch.arange(4), j].any())


@settings(deadline=None)
@given(tiny_problems(max_d_in=8, max_d_out=3, objectives=("mask",), coupled=False), st.integers(0, 1000))
def test_sparseswaps_never_worse_and_locally_optimal(problem, seed):
    start = problem.round(torch.rand(problem.shape, generator=torch.Generator().manual_seed(seed)))
    res = make_solver("sparseswaps", candidates=2).solve(problem, init=start, params=Params(dtype=torch.float64))
    assert res.objective <= problem.objective(start) + rel_tol(problem.objective(start), 1e-12, scale=problem.scale)
    assert res.limit is None
    slack = rel_tol(res.objective, 1e-9, scale=problem.scale)
    for other in _swap_neighbours(problem, res.mask):
        assert problem.objective(other) >= res.objective - slack


def test_sparseswaps_improves_wanda_on_a_layer():
    problem = make_instance(32, 64, pattern="per-row:0.5", objective="mask", seed=7)
    wanda = make_solver("wanda").solve(problem)
    res = make_solver("sparseswaps").solve(problem)
    assert res.objective < 0.9 * wanda.objective
    assert res.info["start_objective"] == pytest.approx(wanda.objective, rel=1e-12)
    assert res.info["swaps"] > 0 and res.history


def test_sparseswaps_respects_iteration_limit():
    problem = make_instance(8, 32, pattern="nm:2:4", objective="mask", seed=1)
    res = make_solver("sparseswaps").solve(problem, params=Params(max_iter=1))
    assert res.iterations == 1 and res.limit == "iterations"
    assert problem.is_feasible(res.mask)


def test_schedule_fraction_is_cubic_and_reaches_target():
    values = [schedule_fraction(t, 0.5, 15) for t in range(20)]
    assert values[14] == values[19] == 0.5
    assert all(a < b for a, b in zip(values[:14], values[1:15]))
    assert values[0] == pytest.approx(0.5 * (1 - (14 / 15) ** 3))


@pytest.mark.parametrize("start", ["sparsegpt", "none"])
@pytest.mark.parametrize("pattern", ["per-row:0.5", "nm:2:4", "unstructured:0.5", "columns:0.25"])
def test_admm_is_feasible_and_beats_magnitude_refit(pattern, start):
    problem = make_instance(16, 32, pattern=pattern, objective="reconstruct", seed=5)
    res = make_solver("admm", init_solver=start).solve(problem)
    assert problem.is_feasible(res.mask) and res.iterations == 20
    assert res.objective <= make_solver("magnitude").solve(problem).objective
    assert res.objective <= res.info["own_weights_objective"] * (1 + 1e-9)


def test_admm_stopped_early_still_returns_the_final_pattern():
    problem = make_instance(8, 32, pattern="per-row:0.5", objective="reconstruct", seed=5)
    res = make_solver("admm").solve(problem, params=Params(max_iter=2))
    assert res.iterations == 2 and res.limit == "iterations" and problem.is_feasible(res.mask)


@settings(max_examples=examples(0.8), deadline=None)
@given(tiny_problems(max_d_in=6, max_d_out=2, objectives=("mask",)), st.integers(0, 1000))
def test_fw_certificate_is_valid_at_any_hull_point(problem, seed):
    """L(M) + min_S ⟨∇L(M), S − M⟩ never exceeds the brute-force optimum, for M in the hull."""
    from layerprune.solvers.sparsefw import fw_certificate
    gen = torch.Generator().manual_seed(seed)
    masks = [problem.round(torch.rand(problem.shape, generator=gen)) for _ in range(3)]
    weights = torch.rand(3, generator=gen, dtype=torch.float64)
    M = sum(w * m.to(torch.float64) for w, m in zip(weights / weights.sum(), masks))
    best = make_solver("brute").solve(problem).objective
    bound = float(fw_certificate(problem, M).sum())
    assert bound <= best + rel_tol(best, 1e-9, scale=problem.scale)


def test_fw_line_search_minimises_along_the_direction():
    from layerprune.solvers.sparsefw import line_search
    problem = make_instance(3, 8, pattern="per-row:4", objective="mask", seed=0).to(dtype=torch.float64)
    W, G = problem.W, problem.G
    M = problem.round(W.abs()).to(torch.float64)
    D = problem.round(torch.rand(3, 8, generator=torch.Generator().manual_seed(1))).to(torch.float64) - M
    C = (W * (1 - M)) @ G
    gamma = line_search(W * D, (W * D) @ G, C, per_row=True)

    def loss(g):
        U = W * (1 - (M + g * D))
        return ((U @ G) * U).sum(dim=1)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)[:, None]
    at_gamma = loss(gamma)
    for g in grid:
        assert bool((at_gamma <= loss(g.expand(3, 1)) + 1e-12).all())


def test_sparsefw_improves_wanda_and_reports_a_valid_bound():
    problem = make_instance(4, 16, pattern="per-row:0.5", objective="mask", seed=3)
    wanda = make_solver("wanda").solve(problem)
    res = make_solver("sparsefw", alpha=0.0).solve(problem, params=Params(max_iter=200))
    assert res.objective <= wanda.objective
    assert 0.0 < res.lower_bound <= res.objective
    exact = make_solver("brute").solve(problem)
    assert res.lower_bound <= exact.objective * (1 + 1e-9)
    assert res.limit == "iterations" and res.history[-1]["iteration"] == 200


@pytest.mark.parametrize("solver, objective, pattern", [
    ("sparseswaps", "mask", "per-row:0.5"), ("sparseswaps", "mask", "nm:2:4"),
    ("sparsefw", "mask", "per-row:0.5"), ("admm", "reconstruct", "nm:2:4")])
def test_scalable_solvers_prune_a_tiny_model(solver, objective, pattern):
    """End to end through the pipeline; SparseSwaps (started from Wanda) never loses to Wanda."""
    transformers = pytest.importorskip("transformers")
    from layerprune.pipeline import prune_model, sparsity
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    records = prune_model(model, ids, solver=solver, pattern=pattern, objective=objective, progress=False,
                          params=Params(max_iter=50) if solver == "sparsefw" else None)
    assert len(records) == 14 and sparsity(model) == pytest.approx(0.5)
    for rec in records:
        assert rec.solver == solver
        if solver == "sparseswaps":
            assert rec.objective <= rec.wanda_objective * (1 + 1e-6) + 1e-9
