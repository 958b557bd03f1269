"""Structured pruning of MLP channels (``--structure mlp:F``) on tiny random models."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from layerprune.pipeline import PruningInterrupted, find_blocks
from layerprune.pipeline.channels import Structure, check_structured_model, parse_structure, prune_mlp_channels
from layerprune.problems import LayerProblem, ProblemError
from layerprune.settings import SettingError
from layerprune.solvers import SolverError
from test_pipeline import _config, _one_thread, assert_prune_refused, calib, tiny_llama, tiny_opt, tiny_qwen2  # noqa: F401
from test_pipeline import tiny_job  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")


def test_parse_structure_and_kept_count():
    assert parse_structure("mlp:0.3") == Structure("mlp", 0.3)
    assert str(parse_structure("mlp:0.25")) == "mlp:0.25"
    assert Structure("mlp", 0.3).kept(1536) == 1075  # 461 removed
    for bad, why in (("mlp", "expected mlp:F"), ("mlp:x", "not a number"), ("mlp:1.5", "(0, 1)"),
                     ("mlp:0", "(0, 1)"), ("heads:0.25", "not supported"), ("attn:0.2", "expected mlp:F")):
        with pytest.raises(SettingError, match=f".*{bad}.*" if bad != "mlp" else "expected"):
            parse_structure(bad)
        try:
            parse_structure(bad)
        except SettingError as exc:
            assert why in str(exc) and "\n" not in str(exc)
    with pytest.raises(ProblemError, match="at least one"):
        Structure("mlp", 0.001).kept(64)


def _zeroed_copy(dense, kept: dict[str, list[int]]):
    """The dense model with the down_proj columns of the removed channels zeroed."""
    model = copy.deepcopy(dense)
    for name, channels in kept.items():
        down = model.get_submodule(name)
        drop = torch.ones(down.in_features, dtype=torch.bool)
        drop[channels] = False
        down.weight.data[:, drop] = 0.0
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_mask_objective_equals_the_dense_model_with_those_columns_zeroed(make):
    dense = make()
    model = copy.deepcopy(dense)
    result = prune_mlp_channels(model, calib(), "mlp:0.25", solver="wanda", objective="mask", progress=False)
    assert result.intermediate_size == (64, 48) and model.config.intermediate_size == 48
    blocks, _ = find_blocks(model)
    for block in blocks:
        mlp = block.mlp
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (48, 32)
        assert mlp.down_proj.weight.shape == (32, 48) and mlp.down_proj.in_features == 48
    assert [r.pattern for r in result.records] == ["columns:48"] * 2
    assert all(len(k) == 48 and k == sorted(k) for k in result.kept.values())
    ids = calib(2, 16, seed=5)
    with torch.no_grad():
        got = model(ids).logits
        want = _zeroed_copy(dense, result.kept)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before, after = result.decoder_parameters
    assert before - after == 2 * 16 * 3 * 32  # 16 channels × (gate row + up row + down column) × 32 wide, 2 blocks


def test_reconstruct_refits_down_proj_on_the_kept_channels():
    dense = tiny_llama(layers=1)
    model = copy.deepcopy(dense)
    ids = calib()
    result = prune_mlp_channels(model, ids, "mlp:0.5", solver="magnitude", objective="reconstruct", progress=False)
    kept = result.kept["model.layers.0.mlp.down_proj"]
    # block 0 sees the embeddings in both models: its down_proj inputs are the dense model's
    inputs = []
    handle = dense.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        dense(ids)
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
    W = dense.model.layers[0].mlp.down_proj.weight.detach().double()
    G = X.T @ X
    S = torch.tensor(kept)
    want = torch.linalg.solve(G[S][:, S], (W @ G[:, S]).T).T
    got = model.model.layers[0].mlp.down_proj.weight.detach().double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    # and the recorded objective is the problem's objective of those weights
    problem = LayerProblem.create(W, G / X.shape[0], pattern="columns:32", objective="reconstruct")
    full = torch.zeros_like(W)
    full[:, S] = got
    assert result.records[0].objective == pytest.approx(float(problem.weight_errors(full).sum()), rel=1e-3)


def test_models_without_a_gated_mlp_or_with_uneven_sizes_are_refused_before_any_change():
    with pytest.raises(ProblemError, match="no gated MLP"):
        check_structured_model(tiny_opt(), Structure("mlp", 0.3))
    model = tiny_llama()
    model.config.intermediate_size = 60
    with pytest.raises(ProblemError, match="intermediate_size 60"):
        prune_mlp_channels(model, calib(), "mlp:0.3", solver="wanda", progress=False)
    assert model.model.layers[0].mlp.gate_proj.out_features == 64  # unchanged
    with pytest.raises(SolverError):
        prune_mlp_channels(tiny_llama(), calib(), "mlp:0.3", solver="sparseswaps", progress=False)


def test_the_default_alternating_solver_never_loses_to_wanda_sp_on_the_first_block():
    """Block 0 sees the same inputs in both runs: the default (alternating, reconstruct) solves
    the same columns problem as Wanda's column rule refitted, and its polish from Wanda's start
    never ends above it."""
    ids = calib()
    default = prune_mlp_channels(tiny_llama(layers=1), ids, "mlp:0.5", progress=False)
    wanda = prune_mlp_channels(tiny_llama(layers=1), ids, "mlp:0.5", solver="wanda", objective="reconstruct",
                               progress=False)
    assert default.records[0].solver == "alternating" and default.records[0].objective_kind == "reconstruct"
    assert default.records[0].objective <= wanda.records[0].objective * (1 + 1e-9)
    assert default.records[0].wanda_objective == pytest.approx(wanda.records[0].objective, rel=1e-9)


def test_interrupt_says_how_many_blocks_were_shrunk():
    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(PruningInterrupted) as info:
        prune_mlp_channels(tiny_llama(), calib(), "mlp:0.25", solver="wanda", progress=False, callback=stop)
    assert len(info.value.records) == 1 and info.value.total == 2


# ---------------------------------------------------------------------------- the job
def test_run_structure_saves_a_smaller_standard_checkpoint(tiny_job, tmp_path):  # noqa: F811
    pytest.importorskip("layerprune.models")
    from layerprune.pipeline import run
    from layerprune.prune_cli import evaluate

    out, rep = tmp_path / "small", tmp_path / "report.json"
    report = run(_config(tiny_job, structure="mlp:0.25", solver="wanda", out=str(out), report=str(rep)),
                 log=lambda s: None)
    assert report.settings["objective"] == "reconstruct" and report.settings["solver"] == "wanda"
    data = json.loads(rep.read_text())
    assert data["structure"]["intermediate_size"] == [64, 48]
    assert set(data["structure"]["kept_channels"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert [r["pattern"] for r in data["layers"]] == ["columns:48"] * 2
    assert "64 → 48 channels per block" in report.format()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    assert not (out / "masks.safetensors").exists()
    dense_bytes = (tiny_job / "model" / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < dense_bytes
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)  # no custom code
    assert plain.model.layers[1].mlp.up_proj.weight.shape == (48, 32)
    again = evaluate(str(out), [str(tiny_job / "heldout.txt")], seqlen=16, eval_tokens=256, device="cpu")
    assert again["perplexity"]["heldout"] == pytest.approx(report.perplexity["heldout"], rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--structure", "heads:0.25"], "attention heads are not supported"),
    (["--structure", "mlp:1.2"], "(0, 1)"),
    (["--structure", "mlp:0.3", "--pattern", "nm:2:4"], "--pattern does not apply with --structure"),
    (["--structure", "mlp:0.3", "--allocate", "owl"], "--allocate does not apply"),
    (["--structure", "mlp:0.3", "--target", "dense"], "--target dense does not apply"),
    (["--structure", "mlp:0.3", "--solver", "sparseswaps"], "sparseswaps"),
    (["--structure", "mlp:0.001", "--solver", "wanda"], "at least one"),
])
def test_structure_bad_input_is_one_line_exit_2_nothing_written(tiny_job, tmp_path, capsys, flags,  # noqa: F811
                                                                message):
    assert_prune_refused(tiny_job, tmp_path, capsys, flags, message)
