"""--block-tune: each block's kept weights tuned toward the dense block's outputs (EBFT), on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from layerprune.pipeline import find_blocks, find_linears, prune_model
from layerprune.pipeline.block_tune import DEFAULT_BLOCK_TUNE_EPOCHS, BlockTuning
from layerprune.report import unpack_mask

from test_pipeline import _config, _one_thread, assert_prune_refused, calib, tiny_llama  # noqa: F401
from test_pipeline import tiny_job  # noqa: F401 (fixture)


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": lin.weight.detach().clone() for i, b in enumerate(find_blocks(model)[0])
            for n, lin in find_linears(b).items()}


def test_tuning_lowers_each_blocks_output_error_and_keeps_every_mask():
    ids = calib()
    plain = tiny_llama()
    prune_model(plain, ids, solver="wanda", progress=False)
    tuned = tiny_llama()
    tuning = BlockTuning(epochs=4)                                       # lr 1e-3, steps of 2 sequences
    records = prune_model(tuned, ids, solver="wanda", progress=False, block_tuning=tuning)
    assert [b.block for b in tuning.log] == [0, 1]
    for b in tuning.log:
        assert b.error_after < b.error_before and b.steps == 4 * 3       # 6 sequences, steps of 2 (the default)
    after, before = _weights(tuned), _weights(plain)
    for r in records:
        block, name = r.name.split(".")[2], ".".join(r.name.split(".")[3:])
        w, mask = after[f"{block}.{name}"], unpack_mask(r.packed_mask)
        assert bool((w[~mask] == 0).all())                                # the mask holds exactly
        assert r.sparsity == pytest.approx(0.5)
    assert any(not torch.equal(after[k], before[k]) for k in after)       # the kept weights moved
    assert all(p.requires_grad for p in tuned.parameters())               # as they were before the prune


def test_block_tuning_settings_are_checked():
    with pytest.raises(ValueError, match="epochs ≥ 1"):
        BlockTuning(epochs=0)
    with pytest.raises(ValueError, match="learning rate"):
        BlockTuning(epochs=1, lr=float("nan"))
    with pytest.raises(ValueError, match="batch of ≥ 1 sequences"):
        BlockTuning(epochs=1, batch=0)


def _last_block_outputs(model, ids) -> torch.Tensor:
    """The last decoder block's outputs on ``ids`` (a forward hook), (n, T, H)."""
    blocks = find_blocks(model)[0]
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def test_the_dense_target_tunes_toward_the_dense_models_own_outputs():
    ids = calib()
    dense = _last_block_outputs(tiny_llama(), ids)
    by_block, by_dense = BlockTuning(epochs=2), BlockTuning(epochs=2, target="dense")
    models = {}
    for tuning in (by_block, by_dense):
        models[tuning.target] = tiny_llama()
        prune_model(models[tuning.target], ids, solver="wanda", progress=False, block_tuning=tuning)
    # block 0 sees the same inputs in both models: the same targets, the same tuning
    assert by_dense.log[0].error_before == pytest.approx(by_block.log[0].error_before, rel=1e-6)
    assert by_dense.log[0].error_after == pytest.approx(by_block.log[0].error_after, rel=1e-6)
    # the last block's error after tuning is the pruned model's distance from the dense model's outputs
    err = float((_last_block_outputs(models["dense"], ids) - dense).pow(2).mean())
    assert by_dense.log[-1].error_after == pytest.approx(err, rel=1e-4)
    assert by_block.log[-1].error_after != pytest.approx(err, rel=1e-2)  # the block target measures another thing
    assert all(b.error_after < b.error_before for b in by_dense.log)
    with pytest.raises(ValueError, match="target is one of block, dense"):
        BlockTuning(epochs=1, target="model")


def test_smaller_batches_take_more_steps_over_the_same_sequences():
    tuning = BlockTuning(epochs=3, lr=1e-3, batch=4)
    prune_model(tiny_llama(), calib(), solver="wanda", progress=False, block_tuning=tuning)
    assert [b.steps for b in tuning.log] == [3 * 2, 3 * 2]                # 6 sequences: steps of 4 and 2
    assert all(b.error_after < b.error_before for b in tuning.log)


def test_job_reports_each_tuned_block(tiny_job, tmp_path):  # noqa: F811
    from layerprune.pipeline import run

    rep = tmp_path / "report.json"
    report = run(_config(tiny_job, solver="wanda", report=str(rep), block_tune=2, block_tune_lr=1e-3),
                 log=lambda s: None)
    data = json.loads(rep.read_text())
    tuning = data["block_tuning"]
    assert (tuning["epochs"], tuning["lr"], len(tuning["blocks"])) == (2, 1e-3, 2)
    assert all(b["error_after"] < b["error_before"] for b in tuning["blocks"])
    assert data["settings"]["block_tune"] == 2 and report.sparsity == 0.5
    assert "block tuning       2 blocks × 2 epochs, lr 0.001, block output error median -" in report.format()
    assert tuning["target"] == "block"


def test_job_tunes_toward_the_dense_model_when_asked(tiny_job, tmp_path):  # noqa: F811
    from layerprune.pipeline import run

    rep = tmp_path / "report.json"
    report = run(_config(tiny_job, solver="wanda", report=str(rep), block_tune=1, block_tune_target="dense"),
                 log=lambda s: None)
    tuning = json.loads(rep.read_text())["block_tuning"]
    assert tuning["target"] == "dense" and len(tuning["blocks"]) == 2
    assert "1 epochs, lr 0.001, toward the dense model's outputs, block output error median" in report.format()


@pytest.mark.parametrize("flags, message", [
    (["--solver", "wanda", "--block-tune-lr", "0.001"], "--block-tune-lr applies with block tuning only"),
    (["--block-tune", "0", "--block-tune-batch", "2"], "--block-tune-batch applies with block tuning only"),
    (["--objective", "mask", "--block-tune-batch", "2"], "--block-tune-batch applies with block tuning only"),
    (["--block-tune", "1", "--block-tune-batch", "0"], "--block-tune-batch"),
    (["--solver", "wanda", "--block-tune-target", "dense"], "--block-tune-target applies with block tuning only"),
    (["--block-tune", "1", "--block-tune-target", "model"], "--block-tune-target"),
    (["--block-tune", "2", "--structure", "mlp:0.25"], "--structure does not apply with --block-tune"),
    (["--block-tune", "2", "--solver", "elsa", "--init", "dense"], "--block-tune shapes a layer-wise warm start"),
    (["--block-tune", "2", "--solver", "elsa", "--solver-option", "constrained=false"],
     "--block-tune shapes a layer-wise warm start"),
    (["--block-tune", "2", "--target", "dense", "--solver", "sparsegpt", "--objective", "reconstruct"],
     "--target dense does not apply with --block-tune"),
    (["--block-tune", "2", "--dtype", "float16"], "--dtype float16: --block-tune trains float32 weights"),
    (["--block-tune", "-1"], "--block-tune"),
])
def test_block_tune_refusals_are_one_line_and_write_nothing(tiny_job, tmp_path, capsys, flags, message):  # noqa: F811
    assert_prune_refused(tiny_job, tmp_path, capsys, flags, message)


@pytest.mark.parametrize("given, epochs, target", [
    ({}, DEFAULT_BLOCK_TUNE_EPOCHS, "dense"),                         # the default prune
    ({"objective": "reconstruct"}, DEFAULT_BLOCK_TUNE_EPOCHS, "dense"),   # the default solver, named objective
    ({"pattern": "nm:2:4"}, DEFAULT_BLOCK_TUNE_EPOCHS, "dense"),
    ({"block_tune_target": "block"}, DEFAULT_BLOCK_TUNE_EPOCHS, "block"),
    ({"block_tune": 0}, 0, None),
    ({"block_tune": 3}, 3, "dense"),
    ({"solver": "admm"}, 0, None),                                    # a named solver: its own form
    ({"solver": "admm", "block_tune": 2}, 2, "block"),                # ... and EBFT's target
    ({"solver": "wanda", "block_tune": 1, "block_tune_target": "dense"}, 1, "dense"),
    ({"objective": "mask"}, 0, None),                                 # kept weights fixed
    ({"target": "dense"}, 0, None),
    ({"dtype": "bfloat16"}, 0, None),
    ({"structure": "mlp:0.25"}, 0, None),
    ({"solver": "elsa"}, 0, None),
])
def test_the_default_prune_tunes_blocks_and_a_named_solver_does_not(given, epochs, target):
    from layerprune.pipeline import PruneConfig
    from layerprune.pipeline.config import layerwise, with_defaults

    config = with_defaults(PruneConfig(**given))
    assert (config.block_tune, config.block_tune_target) == (epochs, target)
    again = with_defaults(config)                            # resolving twice changes nothing
    assert (again.block_tune, again.block_tune_target) == (epochs, target)
    if given.get("solver") == "elsa":
        assert layerwise(PruneConfig(**given)).block_tune == 0   # Elsa's warm start is not tuned unless asked
        asked = layerwise(PruneConfig(**given, block_tune=3))
        assert (asked.solver, asked.block_tune, asked.block_tune_target) == ("admm", 3, "block")


def test_the_default_job_reports_its_block_tuning(tiny_job, tmp_path):  # noqa: F811
    from layerprune.pipeline import run

    report = run(_config(tiny_job, report=str(tmp_path / "report.json")), log=lambda s: None)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["settings"]["solver"] == "admm" and data["settings"]["block_tune"] == DEFAULT_BLOCK_TUNE_EPOCHS
    assert data["block_tuning"]["epochs"] == DEFAULT_BLOCK_TUNE_EPOCHS and len(data["block_tuning"]["blocks"]) == 2
    assert data["block_tuning"]["target"] == "dense" and data["settings"]["block_tune_target"] == "dense"
    assert report.sparsity == 0.5
