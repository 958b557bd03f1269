"""``layerprune.speed`` and ``layerprune speed`` on two tiny saved Llama checkpoints (no timing thresholds)."""
import json
from dataclasses import replace

import pytest
import torch

from layerprune import speed
from layerprune.cli import main
from layerprune.speed import SpeedError, SpeedSettings, Task

transformers = pytest.importorskip("transformers")

#: tiny settings: every task runs in milliseconds
TINY = SpeedSettings(runs=2, warmup=1, prefill_batch=2, prefill_len=16, generate_batches=(1, 2),
                     prompt_len=4, new_tokens=3, device="cpu", memory=False)
TINY_FLAGS = ["--prefill", "2x16", "--generate-batches", "1,2", "--prompt-len", "4", "--new-tokens", "3",
              "--device", "cpu"]


def _save_llama(directory, intermediate: int, dtype=torch.float32) -> int:
    """Save a tiny Llama with ``intermediate`` MLP channels; return its decoder blocks' parameter count."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.model.layers.parameters())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(dense dir, pruned dir, their decoder parameter counts)``: intermediate 128 and 64."""
    root = tmp_path_factory.mktemp("speed")
    dense, pruned = root / "dense", root / "pruned"
    counts = (_save_llama(dense, 128), _save_llama(pruned, 64))
    return dense, pruned, counts


def test_sizes_on_disk_match_parameter_counts(checkpoints, tmp_path):
    dense, pruned, (n_dense, n_pruned) = checkpoints
    a = speed.checkpoint_size(dense, "model.layers")
    b = speed.checkpoint_size(pruned, "model.layers")
    assert (a.decoder_params, a.decoder_bytes) == (n_dense, 4 * n_dense)
    assert (b.decoder_params, b.decoder_bytes) == (n_pruned, 4 * n_pruned)
    assert a.safetensors_bytes == (dense / "model.safetensors").stat().st_size
    assert b.decoder_bytes < a.decoder_bytes and b.safetensors_bytes < a.safetensors_bytes
    # the embeddings and the final norm are in the file, not in the decoder blocks
    assert a.safetensors_bytes - a.decoder_bytes > 256 * 64 * 4
    n_half = _save_llama(tmp_path / "half", 128, torch.bfloat16)
    assert speed.checkpoint_size(tmp_path / "half", "model.layers").decoder_bytes == 2 * n_half
    with pytest.raises(SpeedError, match="no tensor named"):
        speed.checkpoint_size(dense, "transformer.h")


def test_schedule_alternates_models_run_by_run():
    order = speed.schedule(n_models=2, runs=2, n_tasks=2)
    assert order == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert [m for _, _, m in speed.schedule(3, 2, 1)] == [0, 1, 2, 0, 1, 2]


def test_measure_runs_in_schedule_order_and_reports_ratios(checkpoints, monkeypatch):
    """With a fake clock (model 0 takes 2 s, model 1 takes 1 s) the arithmetic is exact."""
    dense, pruned, _ = checkpoints
    calls = []

    def fake_time(model, task, ids):
        m = 0 if model.config.intermediate_size == 128 else 1
        calls.append((task.name, m))
        assert ids.shape == (task.batch, task.length)
        return 2.0 if m == 0 else 1.0

    monkeypatch.setattr(speed, "time_task", fake_time)
    report = speed.measure([dense, pruned], TINY)
    tasks = TINY.tasks()
    assert calls == [(tasks[t].name, m) for _, t, m in speed.schedule(2, TINY.runs, len(tasks))]
    assert report.runs_done == 2 and not report.interrupted
    assert [c.shape["intermediate_size"] for c in report.checkpoints] == [128, 64]
    for result in report.tasks:
        assert result.seconds == [[2.0, 2.0], [1.0, 1.0]]
        assert result.tokens_per_s(0) == [result.task.tokens / 2.0] * 2
        assert result.speedups(1) == [2.0, 2.0]
    assert [t.task.tokens for t in report.tasks] == [2 * 16, 1 * 3, 2 * 3]
    data = json.loads(json.dumps(report.to_json()))
    assert data["tasks"][0]["models"][1]["speedup_spread"] == {"median": 2.0, "low": 2.0, "high": 2.0}
    assert data["settings"]["device"] == "cpu"


def test_measure_real_runs(checkpoints):
    dense, pruned, _ = checkpoints
    lines = []
    threads = torch.get_num_threads()
    report = speed.measure([dense, pruned], replace(TINY, threads=1), log=lines.append)
    assert report.environment["threads"] == 1 and torch.get_num_threads() == threads
    assert len(lines) == TINY.runs
    assert [t.task for t in report.tasks] == [Task("prefill", 2, 16), Task("generate", 1, 4, 3),
                                              Task("generate", 2, 4, 3)]
    for result in report.tasks:
        assert len(result.seconds) == 2 and all(len(s) == 2 and min(s) > 0 for s in result.seconds)
        assert len(result.speedups(1)) == 2


def test_interrupt_keeps_the_finished_runs(checkpoints, monkeypatch):
    dense, pruned, _ = checkpoints
    calls = []

    def interrupted_in_run_2(model, task, ids):
        calls.append(task)
        if len(calls) > 2 * len(TINY.tasks()):  # the first measurement of the second run
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(speed, "time_task", interrupted_in_run_2)
    report = speed.measure([dense, pruned], TINY)
    assert report.interrupted and report.runs_done == 1
    assert all(r.seconds == [[1.0], [1.0]] for r in report.tasks)


def test_peak_memory_in_a_child_process(checkpoints):
    dense, _, _ = checkpoints
    memory = speed.peak_memory(dense, TINY)
    assert memory.peak_rss >= memory.import_rss > 0
    assert memory.device_peak is None


def test_generation_gives_exactly_the_new_tokens(checkpoints):
    dense, _, _ = checkpoints
    model = speed.load_checkpoint(dense, torch.float32, torch.device("cpu"))
    task = Task("generate", 2, 4, 5)
    speed.run_task(model, task, speed.make_inputs(task, 256, 0, torch.device("cpu")))  # raises otherwise
    a, b = (speed.make_inputs(task, 256, 7, torch.device("cpu")) for _ in range(2))
    assert torch.equal(a, b)


def test_cli_prints_and_writes_json(checkpoints, tmp_path, capsys):
    dense, pruned, _ = checkpoints
    out = tmp_path / "new" / "speed.json"
    code = main(["speed", str(dense), str(pruned), "--runs", "1", "--no-memory", "--json", str(out), *TINY_FLAGS])
    stdout = capsys.readouterr().out
    assert code == 0
    assert str(dense) in stdout and str(pruned) in stdout and "prefill 2x16" in stdout
    data = json.loads(out.read_text())
    assert data["runs_done"] == 1 and len(data["checkpoints"]) == 2
    assert [m["tokens_per_s"][0] > 0 for m in data["tasks"][0]["models"]] == [True, True]


@pytest.mark.parametrize("case", ["missing", "not_a_model", "no_weights", "runs_0", "json_dir", "bad_prefill",
                                  "bad_dtype", "too_long", "threads_0"])
def test_bad_input_one_line_exit_2_nothing_written(checkpoints, tmp_path, capsys, case):
    dense, _, _ = checkpoints
    out = tmp_path / "out.json"
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    args = {
        "missing": [str(tmp_path / "nope")],
        "not_a_model": [str(tmp_path / "empty")],
        "no_weights": [str(tmp_path / "config_only")],
        "runs_0": [str(dense), "--runs", "0"],
        "json_dir": [str(dense), "--json", str(tmp_path)],
        "bad_prefill": [str(dense), "--prefill", "8"],
        "bad_dtype": [str(dense), "--dtype", "int8"],
        "too_long": [str(dense), "--prefill", "1x4096"],
        "threads_0": [str(dense), "--threads", "0"],
    }[case]
    if case != "json_dir":
        args += ["--json", str(out)]
    code = main(["speed", *args, "--no-memory", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not out.exists()
