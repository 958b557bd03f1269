"""The ``alternating`` backend (solvers/alternating.py): its steps, schedule, polish, limits, CLI."""
import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.cli import main
from layerprune.problems import LayerProblem, make_arrays, make_instance, save_instance
from layerprune.solvers import Params, SolverError, Status, make_solver
from layerprune.solvers.alternating import (ExchangeState, columns_objective, penalised_objective,
                                            selection_step, weight_step)

from conftest import examples, rel_tol


def _scaled(d_out=4, d_in=10, seed=0):
    p = make_instance(d_out, d_in, pattern="columns:4", objective="reconstruct", seed=seed)
    sp, _ = p.scaled()
    W, G = sp.W.to(torch.float64), sp.G.to(torch.float64)
    return p, W, G


def test_the_weight_step_solves_its_stationarity_equation():
    _, W, G = _scaled()
    pruned = torch.tensor([True, False] * 5)
    B = W @ G
    V, eps = weight_step(B, G, pruned, 0.7)
    assert eps == 0.0
    grad = (V - W) @ G + 0.7 * V * pruned.to(V.dtype)[None, :]  # ½ ∇F_ρ
    assert float(grad.abs().max()) < 1e-10 * float(B.abs().max())
    # F_ρ at the minimiser is ⟨W̃ − Ṽ, B⟩
    R = W - V
    direct = float(((R @ G) * R).sum() + 0.7 * (V[:, pruned] ** 2).sum())
    assert penalised_objective(W, B, V) == pytest.approx(direct, rel=1e-10)


def test_the_weight_step_adds_a_ridge_only_where_the_kept_block_is_singular():
    X = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = X.T @ X  # rank 3: any 4 kept columns are singular
    B = torch.randn(2, 6, dtype=torch.float64)
    pruned = torch.tensor([True, True, False, False, False, False])
    V, eps = weight_step(B, G, pruned, 1.0)
    assert eps > 0 and bool(torch.isfinite(V).all())


def test_the_selection_step_minimises_the_penalty_over_the_budget():
    V = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    norms = (V ** 2).sum(dim=0)
    kept = selection_step(V, 3)
    assert int(kept.sum()) == 3
    best = min(float(norms.sum() - norms[list(c)].sum()) for c in itertools.combinations(range(7), 3))
    assert float(norms[~kept].sum()) == pytest.approx(best, rel=1e-12)
    weights = torch.rand(7, dtype=torch.float64)
    obs = selection_step(V, 3, weights)
    assert torch.equal(obs, torch.zeros(7, dtype=torch.bool).index_fill(0, torch.topk(norms / weights, 3).indices, True))


def test_columns_objective_is_the_problems_own():
    p = make_instance(5, 9, pattern="columns:4", objective="reconstruct", seed=3)
    kept = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    W, G = p.W.to(torch.float64), p.G.to(torch.float64)
    assert columns_objective(W, G, kept) == pytest.approx(p.objective(kept.expand(5, 9)), rel=1e-9)


def test_each_exchange_move_changes_the_objective_by_its_predicted_amount():
    p, W, G = _scaled(d_out=3, d_in=9, seed=5)
    kept = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    state = ExchangeState.start(W, G, kept)
    value = columns_objective(W, G, kept)
    cost = float(state.drop_costs()[2])
    state.drop(2)
    after = columns_objective(W, G, state.kept)
    assert after == pytest.approx(value + cost, rel=1e-9)
    gain = float(state.add_gains()[6])
    state.add(6)
    assert columns_objective(W, G, state.kept) == pytest.approx(after - gain, rel=1e-9)
    fresh = ExchangeState.start(W, G, state.kept)
    for name in ("P", "V", "R", "S"):
        assert torch.allclose(getattr(state, name), getattr(fresh, name), rtol=1e-8, atol=1e-10), name
    assert torch.isinf(state.drop_costs()[~state.kept]).all() and torch.isinf(state.add_gains()[state.kept]).all()


def test_the_schedule_raises_rho_geometrically_and_settles():
    p = make_instance(16, 48, pattern="columns:0.5", objective="reconstruct", seed=1)
    res = make_solver("alternating", growth=2.0, swaps=0).solve(p)
    rhos = [h["rho"] for h in res.history]
    assert rhos[0] == pytest.approx(1e-3)
    assert all(b == pytest.approx(2.0 * a) for a, b in zip(rhos, rhos[1:]))
    assert [h["support_change"] for h in res.history[-3:]] == [0, 0, 0]
    assert res.history[-1]["pruned_share"] <= 1e-6
    assert res.limit is None and res.info["stopped"] == "settled" and res.status == Status.FEASIBLE
    assert res.lower_bound is None and res.iterations == len(res.history)
    assert {"iteration", "rho", "penalised_objective", "support_change", "pruned_share", "seconds"} <= set(res.history[0])


@pytest.mark.parametrize("seed", range(4))
def test_the_polish_never_hurts_and_the_result_is_the_contracts(seed):
    p = make_instance(8, 32, pattern="columns:0.5", objective="reconstruct", seed=seed)
    plain = make_solver("alternating", swaps=0).solve(p)
    polished = make_solver("alternating").solve(p)
    assert polished.objective <= plain.objective * (1 + 1e-9)
    assert polished.info["polish_stopped"] == "local optimum" and "exchanges" in polished.info
    assert polished.objective == pytest.approx(p.objective(polished.mask), rel=1e-9)


def test_on_tiny_problems_it_mostly_reaches_the_brute_force_optimum():
    """Measured on 160 tiny problems (2–4 × 8–12): the optimum in 150 (without the polish 46,
    Wanda 38, ADMM 45), at most 1.15× it; here 16 of them."""
    hits, total = 0, 0
    for seed in range(4):
        for d_out, d_in, keep in [(2, 8, 3), (3, 8, 5), (4, 10, 4), (2, 12, 6)]:
            p = make_instance(d_out, d_in, pattern=f"columns:{keep}", objective="reconstruct", seed=seed)
            best = make_solver("brute").solve(p).objective
            got = make_solver("alternating").solve(p).objective
            assert got >= best - rel_tol(best, 1e-9, scale=p.scale)
            hits += got <= best * (1 + 1e-9)
            total += 1
    assert hits >= 0.8 * total, (hits, total)


@settings(max_examples=examples(0.4))
@given(st.integers(1, 3), st.integers(3, 7), st.data())
def test_never_below_the_optimum_and_scale_equivariant(d_out, d_in, data):
    keep = data.draw(st.integers(0, d_in))
    seed = data.draw(st.integers(0, 2**31 - 1))
    W, G = make_arrays(d_out, d_in, seed=seed)
    p = LayerProblem.create(W, G, pattern=f"columns:{keep}", objective="reconstruct")
    best = make_solver("brute").solve(p).objective
    res = make_solver("alternating").solve(p)
    assert p.is_feasible(res.mask) and res.objective >= best - rel_tol(best, 1e-7, scale=p.scale)
    scaled = make_solver("alternating").solve(p.replace(W=p.W * 4.0, G=p.G * 0.25))
    assert torch.equal(scaled.mask, res.mask)
    assert scaled.objective == pytest.approx(4.0 * res.objective, rel=1e-6, abs=1e-12 * p.scale)


def test_the_warm_start_is_honoured():
    p = make_instance(6, 20, pattern="columns:8", objective="reconstruct", seed=7)
    start = make_solver("magnitude").propose(p).mask
    # a penalty so large the first V-step zeroes the pruned columns: the start is kept
    locked = make_solver("alternating", rho0=1e6, swaps=0).solve(p, init=start, params=Params(max_iter=1))
    assert torch.equal(locked.mask, start)
    given = make_solver("alternating").solve(p, init=make_solver("wanda").propose(p).mask)
    named = make_solver("alternating").solve(p)  # init_solver defaults to wanda
    assert torch.equal(given.mask, named.mask) and given.history[0]["support_change"] == named.history[0]["support_change"]
    cold = make_solver("alternating", init_solver="none", swaps=0).solve(p)
    assert p.is_feasible(cold.mask)


def test_limits_and_a_callback_stop_it_feasibly():
    p = make_instance(8, 40, pattern="columns:0.3", objective="reconstruct", seed=2)
    capped = make_solver("alternating").solve(p, params=Params(max_iter=3))
    assert capped.iterations == 3 and capped.limit == "iterations"
    timed = make_solver("alternating").solve(p, params=Params(time_limit=1e-9))
    assert timed.iterations == 1 and timed.limit == "time" and "exchanges" not in timed.info
    events = []
    stopped = make_solver("alternating").solve(p, callback=lambda e: events.append(e) or len(events) == 2)
    assert stopped.iterations == 2 and stopped.limit == "interrupted"
    swap_cap = make_solver("alternating", swaps=1).solve(p)
    assert swap_cap.info["exchanges"] <= 1
    assert swap_cap.limit == ("iterations" if swap_cap.info["polish_stopped"] == "swaps" else None)
    for res in (capped, timed, stopped, swap_cap):
        assert res.status == Status.FEASIBLE and p.is_feasible(res.mask)


def test_float64_and_the_obs_score_work():
    p = make_instance(6, 24, pattern="columns:0.5", objective="reconstruct", seed=4)
    for solver in (make_solver("alternating", score="obs"), make_solver("alternating")):
        res = solver.solve(p, params=Params(dtype=torch.float64))
        assert p.is_feasible(res.mask) and res.objective == pytest.approx(p.objective(res.mask), rel=1e-9)


@pytest.mark.parametrize("pattern, objective", [("per-row:4", "reconstruct"), ("nm:2:4", "reconstruct"),
                                                ("unstructured:0.5", "reconstruct"), ("columns:4", "mask")])
def test_it_refuses_what_it_does_not_take(pattern, objective):
    with pytest.raises(SolverError, match="cannot take"):
        make_solver("alternating").solve(make_instance(4, 8, pattern=pattern, objective=objective))
    with pytest.raises(SolverError, match="score"):
        make_solver("alternating", score="best")


def test_the_cli_solves_an_instance_file(tmp_path, capsys):
    W, G = make_arrays(4, 12, seed=1)
    path = tmp_path / "layer.npz"
    save_instance(path, W, G)
    mask_file = tmp_path / "m.npy"
    code = main(["solve", str(path), "--solver", "alternating", "--pattern", "columns:5", "--objective",
                 "reconstruct", "--save-mask", str(mask_file), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out)
    assert rec["solver"] == "alternating" and rec["status"] == "feasible" and rec["lower_bound"] is None
    mask = np.load(mask_file)
    assert (mask == mask[:1]).all() and int(mask[0].sum()) == 5
    p = LayerProblem.create(W, G, pattern="columns:5", objective="reconstruct")
    assert rec["objective"] == pytest.approx(p.objective(mask), rel=1e-9)


def test_a_dense_target_is_solved_on_the_standard_view():
    gen = np.random.default_rng(3)
    W, X = gen.standard_normal((3, 7)), gen.standard_normal((40, 7))
    Xt = X + 0.3 * gen.standard_normal((40, 7))
    p = LayerProblem.create(W, Xt.T @ Xt, C=Xt.T @ X, G0=X.T @ X, pattern="columns:3", objective="reconstruct")
    best = make_solver("brute").solve(p).objective
    res = make_solver("alternating").solve(p)
    assert p.is_feasible(res.mask) and res.objective >= best - rel_tol(best, 1e-7, scale=p.scale)
    assert res.objective == pytest.approx(p.objective(res.mask), rel=1e-9)


def test_a_time_limit_holds_on_a_mid_size_layer():
    # growth 1.01 needs ~1400 V-steps to make the penalty binding: far more than 0.2 s on any machine
    # (growth 1.05 and a 1 s limit finished in 0.35 s on a quiet one)
    p = make_instance(32, 384, pattern="columns:0.5", objective="reconstruct", seed=0)
    res = make_solver("alternating", growth=1.01, iterations=100_000).solve(p, params=Params(time_limit=0.2))
    assert res.seconds <= 1.1 * 0.2 + 2.0 and res.limit == "time" and p.is_feasible(res.mask)


def test_the_benchmark_refuses_bad_input_before_loading_anything(tmp_path, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location("alternating_layers_bench", bench_dir / "alternating_layers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for bad in (["--solvers", "alternating,nosuch"], ["--sub-channels", "best"], ["--fractions", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            bench.main([*bad, "--out", str(tmp_path / "r")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
