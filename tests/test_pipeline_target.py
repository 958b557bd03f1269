"""``prune_model(target="dense")`` / ``layerprune prune --target dense`` on tiny random models:
each layer's problem carries ``C = X̃ᵀX`` and ``G0 = XᵀX`` with ``X̃`` the pruned model's inputs
and ``X`` the dense model's, and its error is measured against the dense outputs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from layerprune.pipeline import prune_model, sparsity
from layerprune.problems import ProblemError
from layerprune.solvers import SolverError

from test_pipeline import _one_thread, Recording, calib, gram, linear_inputs, tiny_llama  # noqa: F401 (fixture)


def test_dense_target_grams_and_errors_against_the_dense_model():
    model, ids = tiny_llama(), calib()
    dense = copy.deepcopy(model)
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False, target="dense", target_ridge=0.0)
    probs = dict(zip([r.name for r in records], rec.problems))
    # block 0: the pruned and dense streams are the same inputs, so C = G0 = G (dropped: today's problem)
    for name in [r.name for r in records if r.block == 0]:
        assert not probs[name].has_target, name
    # block 1's q,k,v: X̃ from the pruned model (its block 0 pruned), X from the dense model
    dmods, pmods = dict(dense.named_modules()), dict(model.named_modules())
    for local in ("self_attn.q_proj", "self_attn.v_proj"):
        name = f"model.layers.1.{local}"
        prob, record = probs[name], next(r for r in records if r.name == name)
        Xt = linear_inputs(model, ids, pmods[name])
        X = linear_inputs(dense, ids, dmods[name])
        assert prob.has_target
        torch.testing.assert_close(prob.G, gram(Xt), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prob.C, Xt.T @ X / X.shape[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prob.G0, gram(X), rtol=1e-9, atol=1e-12)
        # the record's error is ‖X̃v − Xw‖²/n with v the written weights, w the dense ones
        v = pmods[name].weight.detach().to(torch.float64)
        w = dmods[name].weight.detach().to(torch.float64)
        want = float(((Xt @ v.T - X @ w.T) ** 2).sum()) / X.shape[0]
        assert record.objective == pytest.approx(want, rel=1e-7)
        layer_only = float((((Xt @ (w - v).T)) ** 2).sum()) / X.shape[0]
        assert not math.isclose(record.objective, layer_only, rel_tol=1e-6)  # a different error


@pytest.mark.parametrize("solver, objective", [("sparsegpt", "reconstruct"), ("sparseswaps", "mask")])
def test_dense_target_runs_end_to_end(solver, objective):
    ids = calib()
    runs = {}
    for target in ("layer", "dense"):
        model = tiny_llama(layers=3)
        records = prune_model(model, ids, solver=solver, objective=objective, progress=False, target=target,
                              target_ridge=0.0)
        assert len(records) == 21 and all(math.isfinite(r.objective) for r in records)
        assert sparsity(model) == pytest.approx(0.5, abs=0.02)
        runs[target] = records
    # block 0 solves the same problems either way
    for a, b in zip(runs["layer"][:7], runs["dense"][:7]):
        assert a.objective == pytest.approx(b.objective, rel=1e-9, abs=1e-12), a.name


def test_dense_target_ridge_is_the_stated_objective():
    """``target_ridge=f``: the problem is ``(G + δI, C + δI, G0 + δI)``, δ = f·mean diag G, and
    each record's error is ``‖X̃v − Xw‖²/n + δ‖v − w‖²`` of the written weights."""
    model, ids = tiny_llama(), calib()
    dense = copy.deepcopy(model)
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False, target="dense", target_ridge=0.05)
    probs = dict(zip([r.name for r in records], rec.problems))
    dmods, pmods = dict(dense.named_modules()), dict(model.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):  # inputs as captured
        prob, record = probs[name], next(r for r in records if r.name == name)
        Xt = linear_inputs(model, ids, pmods[name])
        X = linear_inputs(dense, ids, dmods[name])
        delta = 0.05 * float(torch.diagonal(gram(Xt)).mean())
        eye = delta * torch.eye(Xt.shape[1], dtype=torch.float64)
        torch.testing.assert_close(prob.G, gram(Xt) + eye, rtol=1e-9, atol=1e-12)
        if prob.has_target:
            torch.testing.assert_close(prob.C, Xt.T @ X / X.shape[0] + eye, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(prob.G0, gram(X) + eye, rtol=1e-9, atol=1e-12)
        v = pmods[name].weight.detach().to(torch.float64)
        w = dmods[name].weight.detach().to(torch.float64)
        want = float(((Xt @ v.T - X @ w.T) ** 2).sum()) / X.shape[0] + delta * float(((v - w) ** 2).sum())
        assert record.objective == pytest.approx(want, rel=1e-7)
    assert probs["model.layers.1.self_attn.v_proj"].has_target


def test_ridge_targets_keeps_the_target_weights_near_the_dense_ones():
    """On an ill-conditioned G (a direction the inputs barely see) the undamped target ``G⁺CW``
    is large there; the ridge keeps it at the dense weights' scale."""
    from layerprune.problems import LayerProblem, ridge_targets

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64)
    Xt = X + 0.05 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    Xt[:, 7] = Xt[:, 6] + 1e-4 * torch.randn(64, generator=g, dtype=torch.float64)  # near collinear
    W = torch.randn(4, 8, generator=g, dtype=torch.float64)
    G, C, G0 = Xt.T @ Xt / 64, Xt.T @ X / 64, X.T @ X / 64
    raw = LayerProblem.create(W, G, C=C, G0=G0, objective="reconstruct")
    Gr, Cr, G0r = ridge_targets(G, C, G0, 0.01)
    ridged = LayerProblem.create(W, Gr, C=Cr, G0=G0r, objective="reconstruct")
    assert float(raw.target.T.abs().max()) > 20 * float(W.abs().max())
    assert float(ridged.target.T.abs().max()) < 3 * float(W.abs().max())
    assert ridge_targets(G, C, G0, 0.0) == (G, C, G0)
    with pytest.raises(ProblemError, match="ridge fraction"):
        ridge_targets(G, C, G0, -1.0)


def test_dense_target_sequential_order_targets_partially_pruned_inputs():
    model, ids = tiny_llama(layers=1), calib()
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False, target="dense", sequential_order=True)
    probs = dict(zip([r.name for r in records], rec.problems))
    assert not probs["model.layers.0.self_attn.q_proj"].has_target  # nothing pruned before it
    assert probs["model.layers.0.self_attn.o_proj"].has_target      # its inputs follow pruned q, k, v


def test_dense_target_refusals_before_any_weight_changes():
    ids = calib()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, match in [(dict(solver="sparsefw", objective="mask"), "with a dense target"),
                          (dict(solver="wanda", prune_lm_head=True), "does not cover --prune-lm-head"),
                          (dict(solver="wanda", target="dense", init="sparsefw"), "with a dense target")]:
        kwargs.setdefault("target", "dense")
        with pytest.raises(SolverError, match=match) as info:
            prune_model(model, ids, progress=False, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ProblemError, match="target must be one of"):
        prune_model(model, ids, solver="wanda", progress=False, target="teacher")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prune_flag_target_and_its_check_before_loading(tmp_path):
    from layerprune.pipeline.config import check_solvers
    from layerprune.prune_cli import config_from_args
    from test_pipeline import _parser

    cfg = config_from_args(_parser().parse_args(["prune", "--model", "m", "--target", "dense",
                                                 "--objective", "reconstruct", "--solver", "sparsegpt"]))
    assert cfg.target == "dense"
    check_solvers(cfg)
    assert config_from_args(_parser().parse_args(["prune", "--model", "m"])).target == "layer"
    cfg = config_from_args(_parser().parse_args(["prune", "--model", "m", "--target", "dense", "--solver", "scip"]))
    with pytest.raises(SolverError, match="--target dense: solver 'scip' cannot take objective 'mask' with a dense target"):
        check_solvers(cfg)
    with pytest.raises(SystemExit):
        _parser().parse_args(["prune", "--target", "teacher"])
    from layerprune.pipeline.config import target_ridge
    from layerprune.settings import SettingError

    assert target_ridge(cfg) == 0.01 and target_ridge(config_from_args(_parser().parse_args(["prune"]))) == 0.0
    cfg = config_from_args(_parser().parse_args(["prune", "--target", "dense", "--target-ridge", "0",
                                                 "--objective", "reconstruct", "--solver", "sparsegpt"]))
    assert target_ridge(cfg) == 0.0
    cfg = config_from_args(_parser().parse_args(["prune", "--target-ridge", "0.1"]))
    with pytest.raises(SettingError, match="--target-ridge 0.1 applies to --target dense only"):
        check_solvers(cfg)
    with pytest.raises(SystemExit):
        _parser().parse_args(["prune", "--target", "dense", "--target-ridge", "-1"])
