"""Whole-model ADMM (``--solver elsa``) on tiny random models (no download)."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import pytest
import torch

from layerprune import data
from layerprune.pipeline import find_blocks, find_linears
from layerprune.pipeline.elsa import (ElsaLayer, ElsaOptions, global_admm, parse_elsa_options, project,
                                      training_windows)
from layerprune.problems import parse_pattern
from layerprune.settings import SettingError

from test_pipeline import VOCAB, _config, _one_thread, assert_prune_refused, tiny_llama  # noqa: F401
from test_pipeline import tiny_job  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")


def chain(n: int, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    """Windows a tiny model can learn: each token is the previous plus 7 (mod the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + 7 * torch.arange(seqlen)[None, :]) % VOCAB


def layers_of(model, pattern: str) -> list[ElsaLayer]:
    blocks, path = find_blocks(model)
    return [ElsaLayer(f"{path}.{i}.{name}", lin, pattern) for i, block in enumerate(blocks)
            for name, lin in find_linears(block).items()]


def loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def residual(layers) -> float:
    """‖w − Proj(w)‖/‖w‖ over the layers."""
    diff = norm = 0.0
    for layer in layers:
        w = layer.linear.weight.detach()
        diff += float((w - project(w, layer.pattern)[0]).square().sum())
        norm += float(w.square().sum())
    return math.sqrt(diff / norm)


@pytest.fixture(scope="module")
def trained():
    """A tiny LLaMA fitted to :func:`chain` by the control loop (dense fine-tuning)."""
    model = tiny_llama()
    result = global_admm(model, chain(400), layers_of(model, "per-row:0.7"),
                         ElsaOptions(steps=100, batch=4, lr=1e-2, constrained=False), progress=False)
    return model, result


# ---------------------------------------------------------------------------- projection
@pytest.mark.parametrize("pattern", ["per-row:0.7", "per-row:5", "nm:2:4", "unstructured:0.6", "columns:0.5"])
def test_projection_keeps_the_pattern_exactly_and_is_the_nearest_point(pattern):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 8, generator=g)
    z, mask = project(v, pattern)
    pat = parse_pattern(pattern)
    assert pat.violation(mask) is None
    assert torch.equal(z, v * mask)
    # nearest point of the pattern: no other feasible mask keeps more of ‖v‖²
    best = float((v * mask).square().sum())
    for _ in range(200):
        other = pat.round(torch.rand(4, 8, generator=g))
        assert float((v * other).square().sum()) <= best + 1e-9


def test_second_moment_projection_keeps_what_the_metric_weighs():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert project(v, "per-row:2")[1].tolist() == [[False, False, True, True]]
    metric = torch.tensor([[100.0, 100.0, 1.0, 1.0]])
    assert project(v, "per-row:2", metric)[1].tolist() == [[True, True, False, False]]


# ---------------------------------------------------------------------------- options
def test_options_published_defaults_and_one_line_refusals():
    o = parse_elsa_options({})
    assert (o.lr, o.lmda, o.beta1, o.beta2, o.clip, o.projection) == (2e-4, 0.01, 0.9, 0.95, 1.0, "magnitude")
    assert parse_elsa_options({"steps": "12", "lmda_schedule": "cosine"}).steps == 12
    for bad, words in (({"stpes": 3}, "no such option"), ({"lr": -1}, "lr"), ({"projection": "fisher"}, "projection"),
                       ({"steps": 4, "warmup": 4}, "warmup"), ({"lmda_schedule": "exponential", "lmda": 0}, "lmda")):
        with pytest.raises(SettingError, match=words) as exc:
            parse_elsa_options(bad)
        assert "\n" not in str(exc.value)


def test_lambda_schedules_and_learning_rate():
    for mode in ("linear", "cosine", "exponential"):
        o = ElsaOptions(steps=10, lmda=1.0, lmda_init=0.01, lmda_schedule=mode)
        values = [o.lmda_at(t) for t in range(11)]
        assert values[0] == pytest.approx(0.01) and values[-1] == pytest.approx(1.0)
        assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
    assert ElsaOptions(lmda=0.3).lmda_at(5) == 0.3
    o = ElsaOptions(steps=10, warmup=2)
    assert [o.lr_factor(t) for t in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.125]


def test_training_windows_are_seeded_windows_of_the_text():
    ids = torch.arange(100)
    a, b = training_windows(ids, 30, 8, seed=3), training_windows(ids, 30, 8, seed=3)
    assert torch.equal(a, b) and a.shape == (30, 8)
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())        # consecutive tokens
    assert not torch.equal(a, data.random_windows(ids, 30, 8, seed=3))  # not the calibration set's windows
    with pytest.raises(data.DataError, match="too short for one window of 8"):
        training_windows(torch.arange(8), 1, 8, seed=0)


# ---------------------------------------------------------------------------- the loop
def test_control_fits_the_data_and_stays_dense(trained):
    model, result = trained
    assert result.history[-1]["loss"] < 0.25 * result.history[0]["loss"]
    assert result.masks == {} and result.final_residual == 0.0
    assert all(float((layer.linear.weight == 0).float().mean()) == 0.0 for layer in layers_of(model, "per-row:0.7"))


@pytest.mark.parametrize("pattern", ["per-row:0.7", "nm:2:4", "unstructured:0.6"])
def test_run_ends_on_the_pattern_with_residual_fallen_and_loss_below_the_warm_start(trained, pattern):
    model = copy.deepcopy(trained[0])
    layers = layers_of(model, pattern)
    start = copy.deepcopy(model)
    for layer in layers_of(start, pattern):
        layer.linear.weight.data = project(layer.linear.weight.data, layer.pattern)[0]
    before = residual(layers)
    result = global_admm(model, chain(400), layers, ElsaOptions(steps=100, batch=4, lr=5e-3, lmda=1.0, interval=4),
                         progress=False)
    assert result.steps_done == 100 and result.tokens == 100 * 4 * 16 and not result.interrupted
    for layer in layers:
        mask = layer.linear.weight != 0
        assert parse_pattern(layer.pattern).violation(mask) is None
        assert torch.equal(mask, torch.as_tensor(_unpack(result.masks[layer.name])))
    assert result.final_residual < 0.5 * before
    test = chain(16, seed=5)
    assert loss(model, test) < loss(start, test)


def _unpack(packed):
    from layerprune.report import unpack_mask
    return unpack_mask(packed)


def test_second_moment_projection_schedule_and_micro_batches_run(trained):
    model = copy.deepcopy(trained[0])
    layers = layers_of(model, "per-row:0.5")
    options = ElsaOptions(steps=12, batch=4, micro_batch=3, lr=5e-3, lmda=1.0, lmda_init=0.1,
                          lmda_schedule="linear", interval=4, projection="second-moment")
    result = global_admm(model, chain(48), layers, options, progress=False)
    lmdas = [h["lmda"] for h in result.history]
    assert lmdas[0] == pytest.approx(0.1) and lmdas[-1] > lmdas[0]
    assert [h["step"] for h in result.history if "residual" in h] == [1, 5, 9]
    assert all(parse_pattern("per-row:0.5").violation(layer.linear.weight != 0) is None for layer in layers)


def test_micro_batches_give_the_batch_gradient(trained):
    """Accumulating micro-batches is the same step as one batch (float32 round-off)."""
    a, b = copy.deepcopy(trained[0]), copy.deepcopy(trained[0])
    ids = chain(8, seed=3)
    for model, micro in ((a, None), (b, 2)):
        global_admm(model, ids, layers_of(model, "per-row:0.5"),
                    ElsaOptions(steps=2, batch=4, micro_batch=micro, lr=1e-3), progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_interrupt_keeps_a_projected_model_and_restores_training_state():
    model = tiny_llama()
    model.requires_grad_(False)
    layers = layers_of(model, "per-row:0.5")

    def stop(entry):
        if entry["step"] == 3:
            raise KeyboardInterrupt

    result = global_admm(model, chain(40), layers, ElsaOptions(steps=10, batch=4, lr=1e-3), progress=False,
                         callback=stop)
    assert result.interrupted and result.steps_done == 3 and len(result.history) == 3
    assert all(parse_pattern("per-row:0.5").violation(layer.linear.weight != 0) is None for layer in layers)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_a_checkpointed_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(trained, tmp_path):
    from layerprune.pipeline.elsa import check_checkpoint

    path = tmp_path / "state.pt"
    options = ElsaOptions(steps=10, batch=4, lr=5e-3, lmda=1.0, interval=3, checkpoint=str(path), checkpoint_every=4)
    ids = chain(40)
    whole = copy.deepcopy(trained[0])
    global_admm(whole, ids, layers_of(whole, "per-row:0.5"), dataclasses.replace(options, checkpoint=None),
                progress=False)

    def stop(entry):
        if entry["step"] == 6:
            raise KeyboardInterrupt

    first = copy.deepcopy(trained[0])
    cut = global_admm(first, ids, layers_of(first, "per-row:0.5"), options, progress=False, callback=stop)
    assert cut.interrupted and cut.steps_done == 6 and path.is_file()
    assert check_checkpoint(options, layers_of(first, "per-row:0.5"), ids) == 6
    with pytest.raises(SettingError, match="written by another run"):
        check_checkpoint(dataclasses.replace(options, lr=1e-3), layers_of(first, "per-row:0.5"), ids)
    with pytest.raises(SettingError, match="written by another run"):
        check_checkpoint(options, layers_of(first, "per-row:0.5"), chain(40, seed=9))
    # the checkpoint's own fields may change between the runs
    second = copy.deepcopy(trained[0])
    rest = global_admm(second, ids, layers_of(second, "per-row:0.5"),
                       dataclasses.replace(options, checkpoint_every=100), progress=False)
    assert rest.resumed_at == 6 and rest.steps_done == 10 and len(rest.history) == 10 and not path.exists()
    for a, b in zip(whole.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_too_few_windows_is_refused():
    model = tiny_llama()
    with pytest.raises(SettingError, match="40 training windows needed"):
        global_admm(model, chain(8), layers_of(model, "per-row:0.5"), ElsaOptions(steps=10, batch=4),
                    progress=False)


# ---------------------------------------------------------------------------- the job
def test_run_elsa_from_dense_saves_a_model_on_the_pattern(tiny_job, tmp_path):  # noqa: F811
    from layerprune.pipeline import run
    from layerprune.prune_cli import evaluate

    out, rep = tmp_path / "pruned", tmp_path / "report.json"
    report = run(_config(tiny_job, solver="elsa", init="dense", pattern="per-row:0.75", out=str(out),
                         report=str(rep), solver_options={"steps": 4, "batch": 2}), log=lambda s: None)
    assert report.sparsity == 0.75 and report.layers == []
    data = json.loads(rep.read_text())
    assert data["elsa"]["steps_done"] == 4 and data["elsa"]["tokens"] == 4 * 2 * 16
    assert len(data["elsa"]["history"]) == 4 and "masks" not in data["elsa"]
    assert "elsa" in data["timings"]
    assert (out / "masks.safetensors").exists()
    again = evaluate(str(out), [str(tiny_job / "heldout.txt")], seqlen=16, eval_tokens=256, device="cpu")
    assert again["sparsity"] == 0.75
    assert again["perplexity"]["heldout"] == pytest.approx(report.perplexity["heldout"], rel=1e-5)
    text = report.format()
    assert "elsa               4/4 steps" in text and "warm start the dense model" in text


def test_run_elsa_starts_from_a_layerwise_prune_by_default(tiny_job, tmp_path):  # noqa: F811
    from layerprune.pipeline import run

    report = run(_config(tiny_job, solver="elsa", pattern="nm:2:4",
                         solver_options={"steps": 3, "batch": 2, "projection": "second-moment"}), log=lambda s: None)
    assert report.sparsity == 0.5 and len(report.layers) == 14
    assert {r.solver for r in report.layers} == {"admm"}
    text = report.format()
    assert report.elsa["steps_done"] == 3 and "admm (layer-wise)" in text
    assert report.settings["init"] == "admm" and report.settings["objective"] == "reconstruct"
    # the layer records are the warm start's: no layer-error line, the training's time and memory said
    assert "error vs Wanda" not in text and "elsa " in text.split("time")[-1].splitlines()[0]
    assert "Elsa trains" in text and "target" not in text.split("peak memory")[-1]


def test_run_elsa_from_a_block_tuned_prune(tiny_job, tmp_path):  # noqa: F811
    from layerprune.pipeline import run

    report = run(_config(tiny_job, solver="elsa", init="wanda", block_tune=1,
                         solver_options={"steps": 2, "batch": 2}), log=lambda s: None)
    assert report.sparsity == 0.5 and {r.solver for r in report.layers} == {"wanda"}
    assert report.block_tuning["epochs"] == 1 and len(report.block_tuning["blocks"]) == 2
    assert report.elsa["steps_done"] == 2 and "block tuning       2 blocks × 1 epochs" in report.format()


def test_run_elsa_interrupted_saves_a_projected_model_and_the_same_command_resumes(tiny_job, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    from layerprune.pipeline import elsa, run

    state, out = tmp_path / "state.pt", tmp_path / "pruned"
    step, calls = elsa._step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    config = _config(tiny_job, solver="elsa", pattern="per-row:0.75", out=str(out), force=True,
                     solver_options={"steps": 5, "batch": 2, "checkpoint": str(state)})
    monkeypatch.setattr(elsa, "_step", interrupted_step)
    logged = []
    report = run(config, log=logged.append)
    assert report.elsa["interrupted"] and report.elsa["steps_done"] == 2 and report.sparsity == 0.75
    assert (out / "masks.safetensors").exists() and state.is_file()
    assert any("the same command resumes" in line for line in logged)
    monkeypatch.setattr(elsa, "_step", step)
    logged = []
    again = run(config, log=logged.append)
    assert any("resumes from" in line and "at step 2 of 5" in line for line in logged)
    assert again.elsa["resumed_at"] == 2 and again.elsa["steps_done"] == 5 and not again.elsa["interrupted"]
    assert not state.exists() and again.sparsity == 0.75


def test_run_elsa_control_is_dense(tiny_job):  # noqa: F811
    from layerprune.pipeline import run

    report = run(_config(tiny_job, solver="elsa", solver_options={"steps": 3, "batch": 2, "constrained": "false"}),
                 log=lambda s: None)
    assert report.sparsity == 0.0 and "control" in report.format()
    assert report.settings["init"] == "dense" and report.layers == []


@pytest.mark.parametrize("flags, message", [
    (["--solver-option", "stpes=3"], "no such option"),
    (["--solver-option", "lr=0"], "--solver-option lr"),
    (["--init", "dense", "--objective", "reconstruct"], "--objective shapes a layer-wise warm start"),
    (["--init", "dense", "--target", "dense"], "--target dense shapes a layer-wise warm start"),
    (["--init", "dense", "--max-iter", "3"], "--max-iter shapes"),
    (["--solver-option", "constrained=false", "--override", "q_proj=wanda"], "--override shapes"),
    (["--dtype", "bfloat16"], "elsa trains float32 weights"),
    (["--structure", "mlp:0.3"], "--structure does not apply with --solver elsa"),
    (["--prune-lm-head"], "--prune-lm-head does not apply"),
    (["--init", "elsa"], "--init elsa"),
    (["--init", "wanda", "--solver-option", "constrained=false"], "takes no layer-wise --init"),
    (["--init", "sparsegpt", "--pattern", "columns:0.5"], "sparsegpt"),
    (["--pattern", "nm:2:5"], "does not fit layer"),
    (["--solver-option", "checkpoint=."], "is a directory"),
])
def test_elsa_bad_input_is_one_line_exit_2_nothing_written(tiny_job, tmp_path, capsys, flags, message):  # noqa: F811
    assert_prune_refused(tiny_job, tmp_path, capsys, ["--solver", "elsa", *flags], message)


@pytest.mark.slow
def test_elsa_steps_on_the_bundled_model_with_checkpointing():
    """Two steps of Elsa on SmolLM2-135M (gradient checkpointing on): the model ends on the
    pattern, the loss is finite, and every parameter is as trainable as it was."""
    from layerprune import data, models

    model, tok = models.load_model("smollm2")
    ids = data.tokenize(tok, data.load_text("austen-calib"))
    windows = training_windows(ids, 4, 64, seed=0)
    layers = layers_of(model, "per-row:0.7")
    assert len(layers) == 30 * 7
    result = global_admm(model, windows, layers, ElsaOptions(steps=2, batch=2, micro_batch=1, checkpointing=True),
                         progress=False)
    assert result.steps_done == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[0]["loss"] < 6.0            # the real weights (a random model: log 49152 ≈ 10.8)
    for layer in layers:
        assert parse_pattern("per-row:0.7").violation(layer.linear.weight != 0) is None
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
