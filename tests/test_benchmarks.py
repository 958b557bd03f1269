"""benchmarks/prune_model.py: configurations, results file, table, resume (no bundled model)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("prune_model_bench", ROOT / "benchmarks" / "prune_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


CAPS = {
    "magnitude": {"patterns": ["columns", "nm", "per-row", "unstructured"], "objectives": ["mask", "reconstruct"]},
    "wanda": {"patterns": ["columns", "nm", "per-row", "unstructured"], "objectives": ["mask", "reconstruct"]},
    "sparsegpt": {"patterns": ["nm", "per-row", "unstructured"], "objectives": ["mask", "reconstruct"]},
    "admm": {"patterns": ["columns", "nm", "per-row", "unstructured"], "objectives": ["reconstruct"]},
    "broken": {"patterns": ["per-row"], "objectives": ["mask"], "installed": False},
}

SETTINGS = {"model": "smollm2", "nsamples": 8, "seqlen": 256, "eval_tokens": 2048, "calib": None,
            "eval": None, "seed": 0, "device": None, "dtype": "float32", "prune_args": ""}


def fake_report(ppl: dict, ratio: float, dense=None) -> dict:
    """A ``--report`` JSON as the pipeline writes it (two layers)."""
    layers = [{"name": f"l{i}", "objective": ratio * w, "wanda_objective": w, "status": "feasible"}
              for i, w in enumerate((2.0, 4.0))]
    return {"dense_perplexity": dense or {"persuasion": 37.0, "mobydick": 42.5}, "perplexity": ppl,
            "sparsity": 0.5, "seconds": 12.0, "peak_memory_bytes": 900 * 2 ** 20,
            "peak_device_memory_bytes": None, "model_size_bytes": 513 * 2 ** 20,
            "median_reduction_vs_wanda": 1.0 - ratio, "timings": {"prune": 3.5},
            "settings": {"calib": "austen-calib", "calibration_tokens": 2048,
                         "eval_tokens_used": {"persuasion": 2048, "mobydick": 2048}}, "layers": layers}


def test_solver_specs(bench):
    assert bench.parse_solver_spec("sparsegpt:reconstruct", CAPS) == ("sparsegpt", "reconstruct")
    assert bench.parse_solver_spec("wanda", CAPS) == ("wanda", "mask")
    assert bench.parse_solver_spec("admm", CAPS) == ("admm", "reconstruct")  # its only objective
    for bad in ("wanda:oops", ":mask", ""):
        with pytest.raises(bench.BenchmarkError):
            bench.parse_solver_spec(bad, CAPS)


def test_plan_skips_patterns_and_rejects_bad_solvers(bench):
    runs, skipped = bench.plan_runs(["per-row:0.5", "columns:0.3"], ["wanda", "sparsegpt:reconstruct", "wanda:mask"], CAPS)
    assert [r.key for r in runs] == ["per-row:0.5 wanda:mask", "per-row:0.5 sparsegpt:reconstruct",
                                     "columns:0.3 wanda:mask"]
    assert skipped == [{"key": "columns:0.3 sparsegpt:reconstruct", "reason": "sparsegpt cannot take columns patterns"}]
    for solvers, err in ((["nosuch"], "unknown solver"), (["broken"], "not installed"),
                         (["admm:mask"], "cannot take objective")):
        with pytest.raises(bench.BenchmarkError, match=err):
            bench.plan_runs(["per-row:0.5"], solvers, CAPS)
    with pytest.raises(bench.BenchmarkError, match="bad pattern"):
        bench.plan_runs(["per-row:x"], ["wanda"], CAPS)


def test_prune_command_uses_real_cli_flags(bench, tmp_path):
    """Every flag the benchmark passes is one ``layerprune prune`` parses, with the values asked."""
    import argparse

    from layerprune.prune_cli import add_subcommands, config_from_args

    settings = dict(SETTINGS, calib="emma", eval=["persuasion", "mobydick"], device="cpu",
                    prune_args="--time-limit-per-layer 5")
    cmd = bench.prune_command(bench.RunSpec("nm:2:4", "sparsegpt", "reconstruct"), settings, tmp_path / "r.json")
    assert cmd[1:4] == ["-m", "layerprune", "prune"]
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(cmd[3:]))
    assert (cfg.solver, cfg.objective, cfg.pattern, cfg.nsamples, cfg.seqlen, cfg.eval_tokens) == \
        ("sparsegpt", "reconstruct", "nm:2:4", 8, 256, 2048)
    assert (cfg.calib, cfg.eval, cfg.device, cfg.time_limit_per_layer, cfg.report, cfg.progress) == \
        ("emma", ["persuasion", "mobydick"], "cpu", 5.0, str(tmp_path / "r.json"), False)


def test_structure_entries_run_with_the_structure_flag(bench, tmp_path):
    """An ``mlp:F`` grid entry is ``--structure mlp:F`` (solvers must take columns); a bad one
    is one line."""
    import argparse

    from layerprune.prune_cli import add_subcommands, config_from_args

    runs, skipped = bench.plan_runs(["mlp:0.3"], ["wanda:reconstruct", "sparsegpt:reconstruct"], CAPS)
    assert [r.key for r in runs] == ["mlp:0.3 wanda:reconstruct"]
    assert skipped[0]["reason"] == "sparsegpt cannot take columns patterns"
    cmd = bench.prune_command(runs[0], SETTINGS, tmp_path / "r.json")
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(cmd[3:]))
    assert (cfg.structure, cfg.pattern, cfg.solver, cfg.objective) == ("mlp:0.3", "per-row:0.5", "wanda", "reconstruct")
    with pytest.raises(bench.BenchmarkError, match="bad pattern 'mlp:2'"):
        bench.plan_runs(["mlp:2"], ["wanda"], CAPS)
    summary = bench.summarise_report({"structure": {"kind": "mlp", "fraction": 0.3, "intermediate_size": [64, 45],
                                                    "decoder_parameters": [1000, 800], "kept_channels": {"x": [1]}}})
    assert summary["structure"] == {"kind": "mlp", "fraction": 0.3, "intermediate_size": [64, 45],
                                    "decoder_parameters": [1000, 800]}
    assert summary["block_tuning"] is None
    blocks = [{"block": 0, "error_before": 2.0, "error_after": 1.0, "steps": 8, "seconds": 3.0},
              {"block": 1, "error_before": 4.0, "error_after": 3.0, "steps": 8, "seconds": 5.0}]
    tuned = bench.summarise_report({"block_tuning": {"epochs": 1, "lr": 1e-3, "seed": 0, "blocks": blocks}})
    assert tuned["block_tuning"]["median_error_change"] == pytest.approx(-0.375)
    assert tuned["block_tuning"]["seconds"] == 8.0 and tuned["block_tuning"]["blocks"] == blocks
    lines = bench._block_tuning_lines([dict(tuned, pattern="per-row:0.5", solver="admm", objective="reconstruct")])
    assert lines[1] == ("- per-row:0.5 admm:reconstruct: 1 epochs, lr 0.001, target block; block output error "
                        "median -37.5% over 2 blocks; tuning 8 s")
    dense = bench.summarise_report({"block_tuning": {"epochs": 1, "lr": 1e-3, "seed": 0, "target": "dense",
                                                     "blocks": blocks}})
    assert dense["block_tuning"]["target"] == "dense"


def test_elsa_entries_run_elsa_its_warm_start_and_its_control(bench, tmp_path):
    """``elsa``, ``elsa+INIT:OBJECTIVE`` and ``elsa-control`` become the flags ``layerprune prune``
    takes; the table notes each Elsa run's steps, tokens, loss and residual."""
    import argparse

    from layerprune.prune_cli import add_subcommands, config_from_args

    caps = bench.with_elsa(CAPS)
    runs, skipped = bench.plan_runs(["per-row:0.7"], ["elsa", "elsa+sparsegpt:reconstruct", "elsa-control",
                                                      "elsa+dense"], caps)
    assert [r.key for r in runs] == ["per-row:0.7 elsa:loss", "per-row:0.7 elsa+sparsegpt:reconstruct",
                                     "per-row:0.7 elsa-control:loss", "per-row:0.7 elsa+dense:loss"] and not skipped
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    settings = dict(SETTINGS, prune_args="--solver-option steps=4")
    cfgs = [config_from_args(parser.parse_args(bench.prune_command(r, settings, tmp_path / "r.json")[3:]))
            for r in runs]
    assert [(c.solver, c.init, c.objective, c.solver_options) for c in cfgs] == [
        ("elsa", None, None, {"steps": 4}), ("elsa", "sparsegpt", "reconstruct", {"steps": 4}),
        ("elsa", None, None, {"constrained": "false", "steps": 4}), ("elsa", "dense", None, {"steps": 4})]
    with pytest.raises(bench.BenchmarkError, match="cannot take objective"):
        bench.plan_runs(["per-row:0.7"], ["elsa+admm:mask"], caps)
    report = fake_report({"persuasion": 60.0}, 1.0)
    report["timings"] = {"prune": 3.0, "elsa": 40.0}
    report["elsa"] = {"steps_done": 4, "tokens": 8192, "seconds": 40.0, "interrupted": False, "final_residual": 0.01,
                      "history": [{"loss": 3.5}, {"loss": 3.1}], "options": {"batch": 8, "lr": 2e-4, "lmda": 0.01,
                                                                              "interval": 8}}
    rec = dict(bench.summarise_report(report), pattern="per-row:0.7", solver="elsa", objective="loss", status="ok",
               wall_s=50.0, peak_rss_bytes=2 ** 30)
    assert rec["prune_s"] == 43.0 and rec["elsa"]["loss_last"] == 3.1
    table = bench.markdown({"settings": SETTINGS, "runs": [rec], "dense_perplexity": {"persuasion": 40.0}})
    assert "- per-row:0.7 elsa: 4 steps × 8 windows (8192 tokens)" in table and "3.500 → 3.100" in table
    assert "λ 0.01, interval 8" in table and "residual before the final projection 0.010" in table
    assert rec["mean_error_vs_wanda"] is None            # the layer records are the warm start's
    control = dict(rec, solver="elsa-control", elsa=dict(rec["elsa"], options=dict(rec["elsa"]["options"],
                                                                                   constrained=False)))
    table = bench.markdown({"settings": SETTINGS, "runs": [control], "dense_perplexity": {"persuasion": 40.0}})
    assert "lr 0.0002 (no constraint); training loss 3.500 → 3.100\n" in table + "\n" and "λ" not in table


def test_summary_table_json_and_resume(bench, tmp_path):
    out = tmp_path / "res" / "prune_model.json"
    specs, _ = bench.plan_runs(["per-row:0.5"], ["magnitude", "wanda", "sparsegpt:reconstruct"], CAPS)
    calls = []

    def runner(spec, settings, workdir, timeout):
        calls.append(spec.key)
        assert settings == SETTINGS and workdir.is_dir()
        if spec.solver == "sparsegpt":
            return {"pattern": spec.pattern, "solver": spec.solver, "objective": spec.objective,
                    "status": "failed", "error": "layerprune: error: boom | bang", "returncode": 2,
                    "wall_s": 1.0, "peak_rss_bytes": 1, "timed_out": False}
        ratio = {"magnitude": 1.5, "wanda": 1.0}[spec.solver]
        rep = fake_report({"persuasion": 60.0 * ratio, "mobydick": 90.0 * ratio}, ratio)
        return {"pattern": spec.pattern, "solver": spec.solver, "objective": spec.objective,
                "status": "ok", "error": None, "returncode": 0, "wall_s": 20.0,
                "peak_rss_bytes": 1000 * 2 ** 20, "timed_out": False, **bench.summarise_report(rep)}

    command = "python benchmarks/prune_model.py --patterns per-row:0.5"
    res = bench.benchmark(SETTINGS, specs, out, runner=runner, log=lambda s: None, command=command)
    assert calls == [s.key for s in specs]
    saved = json.loads(out.read_text())
    assert saved["command"] == command
    assert saved["settings"] == SETTINGS and saved["dense_perplexity"] == {"persuasion": 37.0, "mobydick": 42.5}
    mag = saved["runs"][0]
    assert mag["mean_error_vs_wanda"] == pytest.approx(1.5) and mag["prune_s"] == 3.5
    assert mag["layer_status"] == {"feasible": 2} and mag["calib_name"] == "austen-calib"
    md = out.with_suffix(".md").read_text()
    assert md == bench.markdown(res)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert rows[0].split(" | ")[3:6] == ["ppl persuasion", "ppl mobydick", "layer err / wanda"]
    assert rows[1].startswith("| dense | – | – | 37.00 | 42.50 |")
    assert rows[2] == "| per-row:0.5 | magnitude | mask | 90.00 | 135.00 | 1.500 | 3.5 | 20.0 | 1000 |"
    assert rows[4].startswith("| per-row:0.5 | sparsegpt | reconstruct | failed: layerprune: error: boom / bang |")
    assert "austen-calib: 8 × 256 tokens" in md and f"Command: `{command}`" in md
    assert not list(out.parent.glob(".*tmp"))  # atomic writes leave no temporaries

    # --resume reruns only the failed configuration, keeping the others as they were
    calls.clear()
    bench.benchmark(SETTINGS, specs, out, resume=True, runner=runner, log=lambda s: None)
    assert calls == ["per-row:0.5 sparsegpt:reconstruct"]
    again = json.loads(out.read_text())
    assert again["runs"][:2] == saved["runs"][:2]
    # --redo runs a kept configuration again; a key outside the grid is an error
    calls.clear()
    bench.benchmark(SETTINGS, specs, out, resume=True, runner=runner, log=lambda s: None,
                    redo=("per-row:0.5 wanda:mask",))
    assert calls == ["per-row:0.5 wanda:mask", "per-row:0.5 sparsegpt:reconstruct"]
    with pytest.raises(bench.BenchmarkError, match="--redo names no run"):
        bench.benchmark(SETTINGS, specs, out, resume=True, runner=runner, log=lambda s: None,
                        redo=("nm:2:4 wanda:mask",))
    # other settings: refuse to mix results
    with pytest.raises(bench.BenchmarkError, match="nsamples: 8 → 16"):
        bench.benchmark(dict(SETTINGS, nsamples=16), specs, out, resume=True, runner=runner, log=lambda s: None)


def test_dense_mismatch_is_flagged(bench):
    runs = [dict(pattern="p", solver=s, objective="mask", status="ok", dense_perplexity={"a": d})
            for s, d in (("x", 10.0), ("y", 10.0 * (1 + 1e-9)), ("z", 11.0))]
    dense, bad = bench.dense_perplexity(runs)
    assert dense == {"a": 10.0} and bad == ["p z:mask"]


def test_subprocess_peak_memory_and_timeout(bench, tmp_path):
    code = "import sys; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); sys.exit(3)"
    r = bench.run_subprocess([sys.executable, "-c", code], timeout=None, log_path=tmp_path / "log")
    assert r["returncode"] == 3 and not r["timed_out"]
    assert r["peak_rss_bytes"] > 300 * 2 ** 20  # the child's own peak, not this process's
    r = bench.run_subprocess([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5,
                             log_path=tmp_path / "log2")
    assert r["timed_out"] and r["wall_s"] < 20


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(bench, tmp_path):
    """The script for real (subprocesses running ``layerprune prune``) on a tiny saved LLaMA."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, trainers

    words = "the of and to a in that was her it he she not be for his as with had you on but at".split()

    def text(seed, n):
        g = torch.Generator().manual_seed(seed)
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist()) + "\n"

    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text(0, 2000)], trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(text(1, 3000))
    (tmp_path / "heldout.txt").write_text(text(2, 3000))
    out = tmp_path / "res.json"
    argv = ["--model", str(tmp_path / "model"), "--calib", str(tmp_path / "calib.txt"),
            "--eval", str(tmp_path / "heldout.txt"), "--nsamples", "4", "--seqlen", "16",
            "--eval-tokens", "256", "--device", "cpu", "--solvers", "magnitude", "wanda:mask",
            "--patterns", "per-row:0.5", "--out", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"], [r.get("error") for r in res["runs"]]
    mag, wanda = res["runs"]
    assert set(res["dense_perplexity"]) == {"heldout"} and res["dense_mismatch"] == []
    assert wanda["mean_error_vs_wanda"] == pytest.approx(1.0)
    assert mag["mean_error_vs_wanda"] > 0 and math.isfinite(mag["mean_error_vs_wanda"])
    for r in (mag, wanda):
        assert r["sparsity"] == 0.5 and r["layers"] == 14 and math.isfinite(r["perplexity"]["heldout"])
        assert r["peak_rss_bytes"] >= r["report_peak_rss_bytes"] > 0
    assert "| per-row:0.5 | wanda | mask |" in out.with_suffix(".md").read_text()
    # resume: nothing left to run
    assert bench.main(argv + ["--resume"]) == 0
    assert json.loads(out.read_text())["runs"] == res["runs"]


# --------------------------------------------------------------------------- exact_reach.py
@pytest.fixture(scope="module")
def reach():
    spec = importlib.util.spec_from_file_location("exact_reach_bench", ROOT / "benchmarks" / "exact_reach.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_exact_reach_table_checks_and_merge(reach, tmp_path, capsys):
    pytest.importorskip("pyscipopt")
    out = tmp_path / "reach.json"
    common = ["--solvers", "scip", "--rows", "1", "--time-limit", "20", "--out", str(out),
              "--objectives", "mask", "--patterns", "per-row:0.5"]
    reach.main(["--sizes", "8"] + common)
    first = json.loads(out.read_text())
    (rec,) = first["records"]
    assert rec["status"] == "optimal" and rec["source"] == "synthetic" and not rec["disagree"]
    assert rec["value"] == pytest.approx(rec["brute"], rel=1e-6)
    # --merge keeps the d=8 cell, adds d=10, and records both invocations
    reach.main(["--sizes", "10", "--merge"] + common)
    merged = json.loads(out.read_text())
    assert [r["d_in"] for r in merged["records"]] == [8, 10] and len(merged["args"]["merged"]) == 2
    rows = [ln for ln in out.with_suffix(".md").read_text().splitlines() if ln.startswith("| synthetic")]
    assert [ln.split(" | ")[4] for ln in rows] == ["8", "10"] and all("| 1/1 |" in ln for ln in rows)


def test_exact_reach_real_row_is_a_principal_block(reach):
    from layerprune.problems import make_instance

    layer = make_instance(3, 24, seed=4)
    cut = reach._real_row(layer, 1, 8, "per-row:0.5", "reconstruct")
    w, G = layer.W[1], layer.G
    idx = torch.topk(w.abs() * torch.diagonal(G).sqrt(), 8).indices.sort().values
    torch.testing.assert_close(cut.W[0], w[idx])
    torch.testing.assert_close(cut.G, G[idx][:, idx])
    assert cut.objective_kind == "reconstruct" and str(cut.pattern) == "per-row:4"


def test_structured_report_merges_runs_and_compares_alternating_with_the_best_baseline(tmp_path):
    spec = importlib.util.spec_from_file_location("structured_report", ROOT / "benchmarks" / "structured_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(pattern, solver, objective, ppl):
        return {"pattern": pattern, "solver": solver, "objective": objective, "status": "ok", "code": "abc",
                "load_at_start": [1.0, 1.0, 1.0], "perplexity": ppl, "dense_perplexity": {"a": 10.0, "b": 20.0},
                "wall_s": 1.0, "peak_rss_bytes": 2 ** 20}

    first = {"settings": dict(SETTINGS), "runs": [run("mlp:0.3", "wanda", "reconstruct", {"a": 12.0, "b": 30.0}),
                                                 run("mlp:0.3", "wanda", "mask", {"a": 13.0, "b": 26.0})]}
    second = {"settings": dict(SETTINGS, prune_args="--out /tmp/x --force"),
              "runs": [run("mlp:0.3", "alternating", "reconstruct", {"a": 11.4, "b": 19.5})]}
    files = [tmp_path / "1.json", tmp_path / "2.json"]
    for f, d in zip(files, (first, second)):
        f.write_text(json.dumps(d))
    results = mod.merge(files)
    assert [r["solver"] + ":" + r["objective"] for r in results["runs"]] == [
        "wanda:mask", "wanda:reconstruct", "alternating:reconstruct"]
    rows = mod.against_baselines(results)
    assert [(r["text"], r["best_baseline_method"], round(r["change"], 4)) for r in rows] == [
        ("a", "wanda:reconstruct", -0.05), ("b", "wanda:mask", -0.25)]
    (tmp_path / "3.json").write_text(json.dumps({"settings": dict(SETTINGS, nsamples=4), "runs": []}))
    with pytest.raises(SystemExit, match="other settings"):
        mod.merge(files + [tmp_path / "3.json"])


def test_elsa_report_compares_each_run_with_the_best_layerwise_and_its_control(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("elsa_report", ROOT / "benchmarks" / "elsa_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    budget = {"steps": 4, "batch": 2, "lr": 2e-4, "warmup": 0, "clip": 1.0, "beta1": 0.9, "beta2": 0.95}

    def run(solver, objective, ppl, options=None):
        elsa = None if options is None else {"steps_done": options["steps"], "tokens": 8 * options["steps"],
                                             "options": options}
        return {"pattern": "per-row:0.7", "solver": solver, "objective": objective, "status": "ok", "code": "abc",
                "load_at_start": [1.0, 1.0, 1.0], "perplexity": ppl, "dense_perplexity": {"a": 10.0, "b": 20.0},
                "wall_s": 1.0, "peak_rss_bytes": 2 ** 20, "elsa": elsa}

    layerwise = {"settings": dict(SETTINGS), "runs": [run("wanda", "mask", {"a": 100.0, "b": 200.0}),
                                                      run("admm", "reconstruct", {"a": 50.0, "b": 250.0})]}
    elsa = {"settings": dict(SETTINGS, prune_args="--solver-option steps=4"),
            "runs": [run("elsa", "loss", {"a": 30.0, "b": 150.0}, budget),
                     run("elsa", "loss", {"a": 20.0, "b": 100.0}, dict(budget, steps=8)),  # no control at 8 steps
                     run("elsa-control", "loss", {"a": 8.0, "b": 19.0}, budget)]}
    tuned = dict(run("elsa+admm", "reconstruct", {"a": 25.0, "b": 140.0}, budget),   # from a block-tuned prune
                 command="-m layerprune prune --solver elsa --init admm --block-tune 4 --solver-option steps=4")
    files = [tmp_path / "1.json", tmp_path / "2.json", tmp_path / "3.json"]
    for f, d in zip(files, (layerwise, elsa, {"settings": dict(SETTINGS, prune_args="--block-tune 4"),
                                              "runs": [tuned, dict(tuned, command="", perplexity={"a": 1.0, "b": 1.0})]})):
        f.write_text(json.dumps(d))
    results = mod.merge(files, args_ok=lambda text: True, order_key=mod._order, key=mod._key)
    assert [r["solver"] for r in results["runs"]] == ["admm", "wanda", "elsa", "elsa", "elsa+admm", "elsa+admm",
                                                      "elsa-control"]
    assert {mod._name(r) for r in results["runs"]} >= {"elsa+admm (--block-tune 4)", "elsa+admm"}
    rows = {(r["steps"], r["text"]): r for r in mod.comparisons(results) if r["solver"] == "elsa"}
    a, b = rows[(4, "a")], rows[(4, "b")]
    assert a["best_layerwise_method"] == "admm:reconstruct" and a["change_vs_best_layerwise"] == pytest.approx(-0.4)
    assert a["control_change_vs_dense"] == pytest.approx(-0.2) and a["meets_target"] is True
    assert b["best_layerwise_method"] == "wanda:mask" and b["change_vs_best_layerwise"] == pytest.approx(-0.25)
    assert b["meets_target"] is False                                   # only 25% below the best
    assert rows[(8, "a")]["control"] is None and rows[(8, "a")]["meets_target"] is None
    text = mod.markdown(dict(results, comparisons=mod.comparisons(results), note=""))
    assert "| per-row:0.7 | elsa | 4 (32) | a | 30.00 | 50.00 | admm:reconstruct | -40.0% | 8.00 | -20.0% | met |" in text
    assert "| per-row:0.7 | elsa+admm (--block-tune 4) | 4 (32) | a | 25.00 | 50.00 |" in text


def test_elsa_report_bar_depends_on_the_pattern(monkeypatch):
    """70/80% per-row: 30% below the best and below the control's change; 50%: not worse than the
    best (no control needed); other patterns (2:4): no bar."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("elsa_report", ROOT / "benchmarks" / "elsa_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.verdict("per-row:0.8", -0.35, -0.1) is True
    assert mod.verdict("per-row:0.7", -0.35, -0.4) is False      # the control gained more
    assert mod.verdict("per-row:0.7", -0.35, None) is None
    assert mod.verdict("per-row:0.5", 0.0, None) is True
    assert mod.verdict("per-row:0.5", 0.01, -0.5) is False
    assert mod.verdict("nm:2:4", -0.5, -0.1) is None
    assert mod.verdict("per-row:0.6", -0.5, -0.1) is None


def test_targets_report_bars_candidates_and_distances(tmp_path, monkeypatch):
    """Issue 16's bars: fixed, lowered by a better unstructured anchor (not by a re-measured per-row
    one), relative at 70%; the best run overall (Elsa, with its control) and the best layer-wise
    one; a later file replaces an earlier file's run; other settings are refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("targets_report", ROOT / "benchmarks" / "targets_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    budget = {"steps": 4, "batch": 2, "lr": 2e-4, "warmup": 0, "clip": 1.0, "beta1": 0.9, "beta2": 0.95}
    dense = {"persuasion": 40.0, "mobydick": 50.0}

    def run(pattern, solver, objective, p, m, options=None):
        elsa = None if options is None else {"steps_done": 4, "tokens": 32, "options": options}
        return {"pattern": pattern, "solver": solver, "objective": objective, "status": "ok", "code": "abc",
                "load_at_start": [1.0, 1.0, 1.0], "perplexity": {"persuasion": p, "mobydick": m},
                "dense_perplexity": dense, "elsa": elsa}

    old = {"settings": dict(SETTINGS), "runs": [
        run("per-row:0.5", "admm", "reconstruct", 60.0, 90.0),        # replaced by the later file's run
        run("per-row:0.6", "admm", "reconstruct", 70.0, 126.0),
        run("per-row:0.7", "wanda", "mask", 500.0, 800.0),
        run("per-row:0.7", "sparsegpt", "reconstruct", 120.0, 300.0),
        run("per-row:0.7", "admm", "reconstruct", 100.0, 240.0)]}
    new = {"settings": dict(SETTINGS, prune_args="--no-reference"), "runs": [
        run("per-row:0.5", "admm", "reconstruct", 54.0, 86.0),        # 0.9 × 86 < 77.9: not a lowering anchor
        run("unstructured:0.5", "sparsegpt", "reconstruct", 50.0, 95.0),   # lowers Persuasion's bar to 45
        run("unstructured:0.5", "admm", "reconstruct", 52.0, 88.0)]}
    elsa = {"settings": dict(SETTINGS, prune_args="--solver-option steps=4"), "runs": [
        run("per-row:0.7", "elsa+admm", "reconstruct", 60.0, 170.0, budget),
        run("per-row:0.5", "elsa+admm", "reconstruct", 40.0, 80.0, dict(budget, lr=1e-3)),
        run("per-row:0.7", "elsa-control", "loss", 30.0, 49.0, budget)]}
    files = [tmp_path / f"{i}.json" for i in range(3)]
    for f, d in zip(files, (old, new, elsa)):
        f.write_text(json.dumps(d))
    results = mod.load(files)
    assert sum(r["pattern"] == "per-row:0.5" and r["solver"] == "admm" for r in results["runs"]) == 1
    rows = {(r["target"], r["text"]): r for r in mod.verdicts(results)}
    p5, m5 = rows[("0.5", "persuasion")], rows[("0.5", "mobydick")]
    assert p5["bar"] == pytest.approx(45.0) and p5["bar_from"] == "0.9 × unstructured:0.5 sparsegpt:reconstruct"
    assert m5["bar"] == 77.9 and m5["anchors_missing"] == []
    assert p5["best"] == "per-row:0.5 elsa+admm:reconstruct (batch 2; lr 0.001; steps 4)" and p5["best_met"] is True
    assert p5["control_change_vs_dense"] is None                     # no control at lr 1e-3
    assert p5["best_layerwise"] == "unstructured:0.5 sparsegpt:reconstruct"
    assert p5["best_layerwise_vs_bar"] == pytest.approx(50.0 / 45.0 - 1.0) and p5["best_layerwise_met"] is False
    assert m5["best_ppl"] == 80.0 and m5["best_met"] is False
    assert rows[("0.6", "mobydick")]["anchors_missing"] == ["unstructured:0.6 sparsegpt:reconstruct",
                                                            "unstructured:0.6 admm:reconstruct"]
    p7, m7 = rows[("0.7", "persuasion")], rows[("0.7", "mobydick")]
    assert p7["bar"] == pytest.approx(75.0) and m7["bar"] == pytest.approx(180.0)
    assert p7["best_met"] is True and m7["best_vs_bar"] == pytest.approx(170.0 / 180.0 - 1.0)
    assert m7["control_change_vs_dense"] == pytest.approx(49.0 / 50.0 - 1.0)
    assert rows[("0.5 moonshot", "persuasion")]["bar"] == pytest.approx(46.0)
    text = mod.markdown(dict(results, targets=mod.verdicts(results), note="n"))
    assert "| 0.7 | mobydick | 180.00 | 0.75 × per-row:0.7 admm:reconstruct | per-row:0.7 elsa+admm:reconstruct " \
           "(batch 2; steps 4) | " \
           "170.00 | -5.56% | met | per-row:0.7 admm:reconstruct | 240.00 | +33.33% | not met | -2.0% |" in text
    tuned = run("per-row:0.7", "elsa+admm", "reconstruct", 55.0, 160.0, budget)   # Elsa from a block-tuned prune
    command = "-m layerprune prune --solver elsa --block-tune 4 --solver-option checkpoint=/tmp/s.pt --solver-option steps=4"
    assert mod.label(dict(tuned, prune_args="", command=command)) == \
        "per-row:0.7 elsa+admm:reconstruct (--block-tune 4; batch 2; steps 4)"     # read from its command
    files[2].write_text(json.dumps(dict(elsa, settings=dict(SETTINGS, nsamples=16))))
    with pytest.raises(SystemExit, match="other settings"):
        mod.load(files)
    files[2].write_text(json.dumps({"benchmark": "allocation", "runs": []}))
    with pytest.raises(SystemExit, match="2.json is not a prune_model results file"):
        mod.load(files)
    with pytest.raises(SystemExit, match="cannot read .*missing.json"):
        mod.load([tmp_path / "missing.json"])


def test_targets_report_reads_the_default_prune_and_the_wall_ratios(tmp_path, monkeypatch):
    """The default prune's run (the default settings with its block tuning) against 15 minutes and
    the previous default's perplexity; each reconstruct job against Wanda's from its own file only."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("targets_report", ROOT / "benchmarks" / "targets_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dense = {"persuasion": 40.0, "mobydick": 50.0}

    def run(solver, objective, p, m, wall):
        return {"pattern": "per-row:0.5", "solver": solver, "objective": objective, "status": "ok", "code": "abc",
                "perplexity": {"persuasion": p, "mobydick": m}, "dense_perplexity": dense, "wall_s": wall}

    timed = {"settings": dict(SETTINGS), "runs": [run("wanda", "mask", 78.0, 112.0, 300.0),
                                                  run("admm", "reconstruct", 55.0, 86.0, 452.0),
                                                  run("sparsegpt", "reconstruct", 57.0, 92.0, 440.0)]}
    alone = {"settings": dict(SETTINGS, prune_args="--no-reference"), "runs": [run("alps", "reconstruct", 53.0, 84.0, 900.0)]}
    default = {"settings": dict(SETTINGS, prune_args=mod.DEFAULT_RUN[2]),
               "runs": [run("admm", "reconstruct", 51.0, 97.0, 690.0)]}
    files = [tmp_path / f"{i}.json" for i in range(3)]
    for f, d in zip(files, (timed, alone, default)):
        f.write_text(json.dumps(d))
    # a later file times ADMM beside Wanda again: both ratios stand, each from its own file
    again = {"settings": dict(SETTINGS), "runs": [run("wanda", "mask", 78.0, 112.0, 400.0),
                                                  run("admm", "reconstruct", 55.0, 86.0, 560.0)]}
    (tmp_path / "3.json").write_text(json.dumps(again))
    both = mod.other_targets(mod.load(files + [tmp_path / "3.json"]))
    admm = sorted((r["source"], r["value"]) for r in both["rows"] if r["run"] == "per-row:0.5 admm:reconstruct")
    assert admm == [("0.json", pytest.approx(452.0 / 300.0)), ("3.json", pytest.approx(560.0 / 400.0))]
    assert any(r["run"] == "per-row:0.5 sparsegpt:reconstruct" for r in both["rows"])   # its Wanda was replaced in runs
    others = mod.other_targets(mod.load(files))
    rows = {(r["target"], r["measured"]): r for r in others["rows"]}
    assert rows[("default prune", "job wall s")]["met"] is True
    assert rows[("default prune", "ppl persuasion (default before)")]["met"] is True
    assert rows[("default prune", "ppl mobydick (default before)")]["met"] is False      # 97 ≥ 96.66
    ratios = {r["run"]: r for r in others["rows"] if r["measured"] == "job / Wanda's job"}
    assert ratios["per-row:0.5 admm:reconstruct"]["value"] == pytest.approx(452.0 / 300.0)
    assert ratios["per-row:0.5 admm:reconstruct"]["met"] is False
    assert ratios["per-row:0.5 sparsegpt:reconstruct"]["met"] is True
    assert others["missing"] == ["per-row:0.5 alps:reconstruct"]                          # no Wanda in its file
    text = mod.markdown(dict(mod.load(files), targets=[], other_targets=others, note=""))
    assert "| job / Wanda's job | 1.500 | 1.507 | +0.44% | not met | abc | 0.json |" in text


def test_refit_benchmark_times_each_backend_whole(tmp_path):
    """benchmarks/refit.py (c): a backend's proposal is split into a fixed and a per-row part and
    extrapolated, its refit added; SparseGPT's backend is its algorithm plus the CG refit."""
    import argparse

    spec = importlib.util.spec_from_file_location("refit_bench", ROOT / "benchmarks" / "refit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 32, generator=g)
    W, G = torch.randn(24, 32, generator=g), X.T @ X
    torch.save((W, G), tmp_path / "layer.pt")
    threads = torch.get_num_threads()
    args = argparse.Namespace(cache=str(tmp_path), rows=8, exact_rows=2, backend_rows=16, tol=1e-4, max_iter=200,
                              dual_iter=24, threads=1)
    try:
        methods = {}
        for child in ("sparsegpt", "cg", "admm", "alps"):
            methods[child] = mod.child(argparse.Namespace(**vars(args), child=child))
    finally:
        torch.set_num_threads(threads)
    cg = methods["cg"]   # the dual start's inverse is timed inside the refit: never more than the refit took
    assert 0.0 < cg["inverse_s"] <= cg["seconds"]
    assert importlib.import_module("layerprune.problems.refit")._damped_inverse.__name__ == "_damped_inverse"
    admm = methods["admm"]
    assert set(admm["propose_timed_s"]) == {4, 16} and admm["propose_fixed_s"] >= 0.0
    assert admm["propose_per_row_s"] >= 0.0
    assert admm["propose_s"] == pytest.approx(admm["propose_fixed_s"] + 24 * admm["propose_per_row_s"])
    assert admm["seconds"] == pytest.approx(admm["propose_s"] + admm["refit_s"])
    assert admm["refit_over_own_objective"] <= 1.0 + 1e-9          # the refit never raises the error
    rows = mod.backend_rows(methods, ["admm", "alps"])
    own = methods["sparsegpt"]["seconds"]
    assert rows["sparsegpt"]["seconds"] == pytest.approx(own + methods["cg"]["seconds"])
    assert rows["alps"]["over_sparsegpt_own"] == pytest.approx(methods["alps"]["seconds"] / own)
    text = "\n".join(mod._backend_lines([{"shape": [24, 32], "backends": rows}]))
    assert "| 24×32 | admm |" in text and "## (c)" in text
    with pytest.raises(SystemExit):
        mod.main(["--backends", "admm,nope"])
