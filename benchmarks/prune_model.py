"""Model benchmark: prune SmolLM2 with several solvers and patterns (issue 4, item 8).

Every configuration (pattern × solver:objective) runs ``python -m layerprune prune`` in its
own subprocess with the same calibration (source, nsamples, seqlen, seed), so the peak memory
is that run's own (``ru_maxrss`` of the child, read with ``os.wait4``). Recorded per run:
perplexity on each evaluation text, the mean per-layer error relative to Wanda (mean of
``objective / wanda_objective`` over layers, from the report), wall time of the whole
subprocess and of its pruning step, and peak memory. The dense perplexity is the same in every
run (checked) and shown once.

Usage::

    python benchmarks/prune_model.py                          # the full default grid (long)
    python benchmarks/prune_model.py --solvers wanda:mask sparsegpt:reconstruct \\
        sparseswaps:mask admm:reconstruct --resume
    python benchmarks/prune_model.py --nsamples 8 --eval-tokens 2048 \\
        --solvers magnitude wanda --patterns per-row:0.5 --out /tmp/quick.json   # quick check

A solver is ``NAME`` or ``NAME:OBJECTIVE``; a bare name takes the solver's only objective, or
``mask`` when it has both. Whole-model ADMM: ``elsa`` (its default warm start, ADMM's prune;
Wanda's in runs at commit 98a276d and before), ``elsa+dense`` (from the dense model, as
published), ``elsa+INIT:OBJECTIVE`` (warm-started from a layer-wise prune by INIT) and
``elsa-control`` (the same loop without the constraint: the dense model fine-tuned); their
options go in ``--prune-args "--solver-option …"`` (so such a grid holds
Elsa runs only). Results are written atomically after every run to ``--out``
(JSON) and the markdown table next to it (``.md``); ``--resume`` keeps the runs of an existing
results file made with the same settings and runs only the missing or failed ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

DEFAULT_SOLVERS = ("magnitude:mask", "wanda:mask", "ria:mask", "sparsegpt:reconstruct")
DEFAULT_PATTERNS = ("per-row:0.5", "per-row:0.6", "nm:2:4")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "prune_model.json"
#: settings that must match for ``--resume`` to reuse a run
SETTING_KEYS = ("model", "nsamples", "seqlen", "eval_tokens", "calib", "eval", "seed", "device",
                "dtype", "prune_args")


class BenchmarkError(RuntimeError):
    """Bad command line or an unusable results file (one clear line, exit 2)."""


@dataclass(frozen=True)
class RunSpec:
    """One configuration: a pattern and a solver with its objective."""

    pattern: str
    solver: str
    objective: str

    @property
    def key(self) -> str:
        return f"{self.pattern} {self.solver}:{self.objective}"


# --------------------------------------------------------------------------- configurations
def parse_solver_spec(spec: str, capabilities: Optional[dict] = None) -> tuple[str, str]:
    """``"sparsegpt:reconstruct"`` → ``("sparsegpt", "reconstruct")``.

    A bare name takes the solver's only objective, or ``mask`` when it takes both
    (``capabilities``: name → capability dict of :func:`layerprune.solvers.list_solvers`;
    without it a bare name means ``mask``).
    """
    name, sep, objective = spec.strip().partition(":")
    name, objective = name.strip(), objective.strip()
    if not name or (sep and objective not in ("mask", "reconstruct", "loss")):
        raise BenchmarkError(f"solver spec must be NAME or NAME:mask or NAME:reconstruct, got {spec!r}")
    if not sep:
        objs = (capabilities or {}).get(name, {}).get("objectives", ["mask"])
        objective = "mask" if "mask" in objs else sorted(objs)[0]
    return name, objective


def _capabilities() -> dict:
    from layerprune.solvers import list_solvers

    return with_elsa({c["name"]: c for c in list_solvers()})


def with_elsa(capabilities: dict) -> dict:
    """The registry's capabilities and Elsa's grid entries: ``elsa``, ``elsa+dense`` and
    ``elsa-control`` (every pattern kind, objective ``loss``) and ``elsa+INIT`` (INIT's objectives
    and patterns)."""
    caps = dict(capabilities)
    for name, cap in capabilities.items():
        caps[f"elsa+{name}"] = dict(cap, name=f"elsa+{name}")
    kinds = ["per-row", "nm", "unstructured", "columns"]
    caps.update({name: {"name": name, "objectives": ["loss"], "patterns": kinds, "installed": True}
                 for name in ("elsa", "elsa+dense", "elsa-control")})
    return caps


def _solver_flags(spec: "RunSpec") -> list[str]:
    """``--solver`` and what goes with it: ``--objective``, or for Elsa its warm start
    (``--init``) or the control's ``constrained=false``."""
    if not spec.solver.startswith("elsa"):
        return ["--solver", spec.solver, "--objective", spec.objective]
    base, _, init = spec.solver.partition("+")
    flags = ["--solver", "elsa"] + (["--init", init] if init else [])
    if init and init != "dense":
        flags += ["--objective", spec.objective]
    if base == "elsa-control":
        flags += ["--solver-option", "constrained=false"]
    return flags


def plan_runs(patterns, solver_specs, capabilities: dict) -> tuple[list[RunSpec], list[dict]]:
    """The runs to make, and the skipped combinations (``{"key", "reason"}``).

    Raises
    ------
    BenchmarkError
        An unknown solver, one whose packages are missing, or one that cannot take the
        objective asked for (a pattern a solver cannot take is skipped, not an error: a
        grid naturally holds some).
    """

    pairs = []
    for spec in solver_specs:
        name, objective = parse_solver_spec(spec, capabilities)
        cap = capabilities.get(name)
        if cap is None:
            raise BenchmarkError(f"unknown solver {name!r}; known: {', '.join(capabilities)}")
        if not cap.get("installed", True):
            raise BenchmarkError(f"solver {name!r} is not installed (layerprune solvers)")
        if objective not in cap["objectives"]:
            raise BenchmarkError(f"solver {name!r} cannot take objective {objective!r} "
                                 f"(takes {', '.join(cap['objectives'])})")
        if (name, objective) not in pairs:
            pairs.append((name, objective))
    runs, skipped = [], []
    for pattern in patterns:
        kind = _pattern_kind(pattern)
        for name, objective in pairs:
            spec = RunSpec(pattern, name, objective)
            if kind not in capabilities[name]["patterns"]:
                skipped.append({"key": spec.key, "reason": f"{name} cannot take {kind} patterns"})
            else:
                runs.append(spec)
    return runs, skipped


def is_structure(pattern: str) -> bool:
    """A grid entry ``mlp:F`` is structured pruning (``--structure mlp:F``), not a pattern."""
    return pattern.startswith("mlp:")


def _pattern_kind(pattern: str) -> str:
    """The pattern kind a solver must take for this grid entry (``columns`` for ``mlp:F``)."""
    from layerprune.problems import PatternError, parse_pattern

    try:
        if is_structure(pattern):
            from layerprune.pipeline.channels import parse_structure
            parse_structure(pattern)
            return "columns"
        return parse_pattern(pattern).name
    except (PatternError, ValueError) as exc:
        raise BenchmarkError(f"bad pattern {pattern!r}: {exc}") from None


def prune_command(spec: RunSpec, settings: dict, report: Path) -> list[str]:
    """The ``python -m layerprune prune`` command line of one run (``--structure`` for an
    ``mlp:F`` entry)."""
    what = "--structure" if is_structure(spec.pattern) else "--pattern"
    cmd = [sys.executable, "-m", "layerprune", "prune", "--model", settings["model"],
           *_solver_flags(spec), what, spec.pattern,
           "--nsamples", str(settings["nsamples"]), "--seqlen", str(settings["seqlen"]),
           "--eval-tokens", str(settings["eval_tokens"]), "--seed", str(settings["seed"]),
           "--dtype", settings["dtype"], "--report", str(report), "--no-progress"]
    if settings.get("calib"):
        cmd += ["--calib", settings["calib"]]
    for src in settings.get("eval") or []:
        cmd += ["--eval", src]
    if settings.get("device"):
        cmd += ["--device", settings["device"]]
    cmd += shlex.split(settings.get("prune_args") or "")
    return cmd


# --------------------------------------------------------------------------- one run
def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["no output"])[-1][:500]


def run_subprocess(cmd: list[str], *, timeout: Optional[float], log_path: Path) -> dict:
    """Run ``cmd``; its stdout and stderr go to ``log_path``. Returns ``returncode``,
    ``wall_s``, ``peak_rss_bytes`` (the child's own ``ru_maxrss``) and ``timed_out``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        timed_out = False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    timed_out = True
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "peak_rss_bytes": int(usage.ru_maxrss) * 1024, "timed_out": timed_out}


def summarise_report(report: dict) -> dict:
    """The benchmark's fields from one ``--report`` JSON."""
    ratios = [r["objective"] / r["wanda_objective"] for r in report.get("layers", [])
              if r.get("objective") is not None and r.get("wanda_objective")]
    if report.get("elsa"):
        ratios = []  # the layer records are Elsa's warm start's, not the final model's
    statuses: dict[str, int] = {}
    for r in report.get("layers", []):
        statuses[r.get("status")] = statuses.get(r.get("status"), 0) + 1
    return {
        "perplexity": report.get("perplexity", {}),
        "dense_perplexity": report.get("dense_perplexity", {}),
        "sparsity": report.get("sparsity"),
        "prune_s": _prune_seconds(report.get("timings", {})),
        "report_seconds": report.get("seconds"),
        "report_peak_rss_bytes": report.get("peak_memory_bytes"),
        "peak_device_bytes": report.get("peak_device_memory_bytes"),
        "model_size_bytes": report.get("model_size_bytes"),
        "memory_target_bytes": report.get("memory_target_bytes"),
        "memory_base_bytes": report.get("memory_base_bytes"),
        "mean_error_vs_wanda": statistics.fmean(ratios) if ratios else None,
        "median_reduction_vs_wanda": report.get("median_reduction_vs_wanda"),
        "layers": len(report.get("layers", [])),
        "layer_status": statuses,
        "calib_name": report.get("settings", {}).get("calib"),
        "calibration_tokens": report.get("settings", {}).get("calibration_tokens"),
        "eval_tokens_used": report.get("settings", {}).get("eval_tokens_used"),
        "structure": _structure_summary(report.get("structure")),
        "elsa": _elsa_summary(report.get("elsa")),
        "block_tuning": _block_tuning_summary(report.get("block_tuning")),
    }


def _block_tuning_summary(tuning: Optional[dict]) -> Optional[dict]:
    """A ``--block-tune`` run's settings and each block's output error before and after."""
    from layerprune.report import median_block_error_change

    if not tuning:
        return None
    blocks = tuning.get("blocks") or []
    return {"epochs": tuning.get("epochs"), "lr": tuning.get("lr"), "target": tuning.get("target", "block"),
            "blocks": blocks, "median_error_change": median_block_error_change(tuning),
            "seconds": sum(b.get("seconds") or 0.0 for b in blocks)}


def _prune_seconds(timings: dict) -> Optional[float]:
    """The pruning step's seconds: layer-wise pruning plus Elsa's training where it ran."""
    parts = [timings[k] for k in ("prune", "elsa") if timings.get(k) is not None]
    return sum(parts) if parts else None


def _elsa_summary(elsa: Optional[dict]) -> Optional[dict]:
    """An Elsa run's steps, tokens, loss and residual (its history stays in the report)."""
    if not elsa:
        return None
    hist = elsa.get("history") or []
    return {"steps_done": elsa.get("steps_done"), "tokens": elsa.get("tokens"), "seconds": elsa.get("seconds"),
            "interrupted": elsa.get("interrupted"), "final_residual": elsa.get("final_residual"),
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
            "options": elsa.get("options")}


def _structure_summary(structure: Optional[dict]) -> Optional[dict]:
    """A structured run's sizes (its kept channels stay in the report)."""
    if not structure:
        return None
    return {k: structure.get(k) for k in ("kind", "fraction", "intermediate_size", "decoder_parameters")}


def run_one(spec: RunSpec, settings: dict, workdir: Path, timeout: Optional[float]) -> dict:
    """Run one configuration in a subprocess; its result record."""
    report_path = workdir / "report.json"
    log_path = workdir / "prune.log"
    if report_path.exists():
        report_path.unlink()
    cmd = prune_command(spec, settings, report_path)
    code, load = _code_version(), _load()
    proc = run_subprocess(cmd, timeout=timeout, log_path=log_path)
    rec = {"pattern": spec.pattern, "solver": spec.solver, "objective": spec.objective,
           "command": shlex.join(cmd[1:]), "code": code, "load_at_start": load, **proc}
    if proc["timed_out"]:
        rec.update(status="timeout", error=f"killed after {timeout:g} s")
    elif proc["returncode"] != 0 or not report_path.is_file():
        rec.update(status="failed",
                   error=_last_error(log_path.read_text(errors="replace")))
    else:
        rec.update(status="ok", error=None, **summarise_report(json.loads(report_path.read_text())))
    return rec


# --------------------------------------------------------------------------- results
def dense_perplexity(runs: list[dict]) -> tuple[dict, list[str]]:
    """The dense perplexity (first successful run) and the keys of runs disagreeing with it
    by more than 1e-6 relative (they all evaluate the same dense model)."""
    ok = [r for r in runs if r.get("status") == "ok" and r.get("dense_perplexity")]
    if not ok:
        return {}, []
    ref = ok[0]["dense_perplexity"]
    bad = []
    for r in ok[1:]:
        d = r["dense_perplexity"]
        if set(d) != set(ref) or any(
                not math.isclose(d[k], ref[k], rel_tol=1e-6) for k in ref if d[k] is not None and ref[k] is not None):
            bad.append(f"{r['pattern']} {r['solver']}:{r['objective']}")
    return ref, bad


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _memory_target_lines(runs: list) -> list:
    """The memory target(s) the runs' reports state: runs recorded before the target counted
    the process's base at load stated 3 × the model plus one block's hidden states."""
    lines = []
    old = next((r for r in runs if r.get("memory_target_bytes") and r.get("memory_base_bytes") is None), None)
    new = next((r for r in runs if r.get("memory_target_bytes") and r.get("memory_base_bytes") is not None), None)
    if new:
        lines.append(f"Memory target: {new['memory_target_bytes'] / 2 ** 20:.0f} MiB (the process's memory "
                     f"just after loading less the weights, {new['memory_base_bytes'] / 2 ** 20:.0f} MiB, plus "
                     "2 × the model plus one block's input and output hidden states for the calibration set).")
    if old:
        lines.append(f"{'Runs recorded before that target: ' if new else 'Memory target: '}"
                     f"{old['memory_target_bytes'] / 2 ** 20:.0f} MiB (3 × the model plus one block's input and "
                     "output hidden states for the calibration set).")
    return lines + [""] if lines else lines


def markdown(results: dict) -> str:
    """The results as a markdown table (plus a header with the settings)."""
    s = results["settings"]
    runs = results["runs"]
    texts = list(results.get("dense_perplexity") or {})
    for r in runs:
        texts += [t for t in r.get("perplexity", {}) if t not in texts]
    calib = next((r["calib_name"] for r in runs if r.get("calib_name")), s.get("calib") or "default")
    lines = [
        "# Pruning SmolLM2: perplexity, time and memory per solver",
        "",
        f"Model `{s['model']}`; calibration {calib}: {s['nsamples']} × {s['seqlen']} tokens, "
        f"seed {s['seed']} (the same for every run); evaluation: the first {s['eval_tokens']} tokens "
        f"of each text in non-overlapping {s['seqlen']}-token windows; dtype {s['dtype']}, device "
        f"{s.get('device') or 'default'}" + (f"; extra `{s['prune_args']}`" if s.get("prune_args") else "") + ".",
        f"Machine: {results.get('environment', {}).get('machine', '?')}.",
        "",
    ]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += _memory_target_lines(runs)
    lines += [
        "`layer err / wanda`: mean over layers of the layer objective divided by Wanda's on the "
        "same problem (below 1 = better than Wanda). `wall s`: the whole `layerprune prune` "
        "subprocess (load, calibration, dense and pruned evaluation, pruning); `prune s`: the "
        "pruning step alone. `peak MiB`: the subprocess's peak resident memory.",
        "",
    ]
    head = ["pattern", "solver", "objective"] + [f"ppl {t}" for t in texts] + \
        ["layer err / wanda", "prune s", "wall s", "peak MiB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|")
    dense = results.get("dense_perplexity") or {}
    if dense:
        lines.append("| " + " | ".join(["dense", "–", "–"] + [_fmt(dense.get(t)) for t in texts]
                                       + ["–"] * 4) + " |")
    for r in runs:
        if r.get("status") == "ok":
            cells = [_fmt(r["perplexity"].get(t)) for t in texts] + [
                _fmt(r.get("mean_error_vs_wanda"), 3), _fmt(r.get("prune_s"), 1),
                _fmt(r.get("wall_s"), 1),
                _fmt(None if r.get("peak_rss_bytes") is None else r["peak_rss_bytes"] / 2 ** 20, 0)]
        else:
            cells = [f"{r.get('status')}: {r.get('error') or ''}".replace("|", "/")] + \
                ["–"] * (len(texts) + 3)
        lines.append("| " + " | ".join([r["pattern"], r["solver"], r["objective"]] + cells) + " |")
    structured = next((r["structure"] for r in runs if r.get("structure")), None)
    if structured:
        lines.append("\n`mlp:F` rows: `layerprune prune --structure mlp:F` removes that fraction of every "
                     "block's MLP channels (the model gets smaller, no zeros).")
        for r in runs:
            st = r.get("structure")
            if st and st.get("decoder_parameters"):
                before, after = st["decoder_parameters"]
                lines.append(f"- {r['pattern']} {r['solver']}:{r['objective']}: intermediate size "
                             f"{st['intermediate_size'][0]} → {st['intermediate_size'][1]}, decoder parameters "
                             f"{before / 1e6:.2f}M → {after / 1e6:.2f}M ({100 * (after / before - 1):+.1f}%)")
    lines += _elsa_lines(runs)
    lines += _block_tuning_lines(runs)
    for sk in results.get("skipped", []):
        lines.append(f"\nSkipped {sk['key']}: {sk['reason']}.")
    if results.get("dense_mismatch"):
        lines.append(f"\nWarning: dense perplexity differs in {', '.join(results['dense_mismatch'])}.")
    return "\n".join(lines) + "\n"


def _elsa_lines(runs: list) -> list[str]:
    """Notes on the Elsa rows: steps, tokens, training loss and residual."""
    rows = [r for r in runs if r.get("elsa")]
    if not rows:
        return []
    lines = ["\n`elsa` rows: whole-model ADMM on the calibration text's loss (`layerprune prune --solver elsa`); "
             "`elsa+INIT` starts from INIT's layer-wise prune, `elsa-control` is the same loop with no "
             "constraint (the dense model fine-tuned on the same tokens). `prune s` includes the training."]
    for r in rows:
        e, o = r["elsa"], r["elsa"].get("options") or {}
        if o.get("constrained", True):
            admm = f", λ {o.get('lmda')}, interval {o.get('interval')}"
            residual = f"; residual before the final projection {_fmt(e.get('final_residual'), 3)}"
        else:
            admm, residual = " (no constraint)", ""
        lines.append(f"- {r['pattern']} {r['solver']}: {e['steps_done']} steps × {o.get('batch')} windows "
                     f"({e['tokens']} tokens), lr {o.get('lr')}{admm}; training loss {_fmt(e.get('loss_first'), 3)} → "
                     f"{_fmt(e.get('loss_last'), 3)}{residual}" + (" (interrupted)" if e.get("interrupted") else ""))
    return lines


def _block_tuning_lines(runs: list) -> list[str]:
    """Notes on the ``--block-tune`` rows: epochs, learning rate, the blocks' output error change."""
    rows = [r for r in runs if r.get("block_tuning")]
    if not rows:
        return []
    lines = ["\n`--block-tune` rows: after each block's layer-wise solve its kept weights were tuned toward the "
             "dense block's outputs on the same inputs (target `block`) or toward the dense model's own block "
             "outputs (target `dense`); `layer err / wanda` is the layer-wise solve's, before it."]
    for r in rows:
        t = r["block_tuning"]
        lines.append(f"- {r['pattern']} {r['solver']}:{r['objective']}: {t['epochs']} epochs, lr {t['lr']:g}, "
                     f"target {t.get('target', 'block')}; "
                     f"block output error median {100 * (t['median_error_change'] or 0.0):+.1f}% over "
                     f"{len(t['blocks'])} blocks; tuning {t['seconds']:.0f} s")
    return lines


def _atomic_text(path: Path, text: str) -> None:
    from layerprune.problems import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_results(results: dict, out: Path) -> None:
    """``out`` (JSON) and ``out`` with suffix ``.md``, each written atomically."""
    results["dense_perplexity"], results["dense_mismatch"] = dense_perplexity(results["runs"])
    _atomic_text(out, json.dumps(results, indent=2) + "\n")
    _atomic_text(out.with_suffix(".md"), markdown(results))


def load_previous(out: Path, settings: dict) -> list[dict]:
    """Runs of an existing results file, which must have been made with ``settings``."""
    if not out.is_file():
        return []
    try:
        old = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"cannot resume from {out}: {exc}") from None
    old_settings = {k: old.get("settings", {}).get(k) for k in SETTING_KEYS}
    new_settings = {k: settings.get(k) for k in SETTING_KEYS}
    if old_settings != new_settings:
        diff = [f"{k}: {old_settings[k]!r} → {new_settings[k]!r}" for k in SETTING_KEYS
                if old_settings[k] != new_settings[k]]
        raise BenchmarkError(f"cannot resume from {out}: other settings ({'; '.join(diff)}); "
                             f"drop --resume or choose another --out")
    return list(old.get("runs", []))


def _code_version() -> Optional[str]:
    """The git commit the run measured (``-dirty`` with uncommitted changes other than results
    files), if in a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _load() -> Optional[list]:
    """1/5/15-minute load averages: other work on the machine slows a run down."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _environment() -> dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                       + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
            "load_at_start": load}


def benchmark(settings: dict, runs: list[RunSpec], out: Path, *, resume: bool = False,
              skipped: Optional[list] = None, timeout: Optional[float] = None,
              runner: Callable[..., dict] = run_one, log=print, redo: tuple = (),
              command: Optional[str] = None) -> dict:
    """Run every configuration not already done (or named in ``redo``, keys like
    ``"per-row:0.5 admm:reconstruct"``); write the results after each run. ``command``: the
    benchmark's own command line, recorded in the results (and their markdown header)."""
    previous = load_previous(out, settings) if resume else []
    done = {f"{r['pattern']} {r['solver']}:{r['objective']}": r for r in previous if r.get("status") == "ok"}
    unknown = set(redo) - {spec.key for spec in runs}
    if unknown:
        raise BenchmarkError(f"--redo names no run of this grid: {', '.join(sorted(unknown))}")
    done = {k: r for k, r in done.items() if k not in set(redo)}
    results = {"benchmark": "prune_model", "settings": settings, "environment": _environment(),
               "skipped": list(skipped or []), "runs": []}
    if command is not None:
        results["command"] = command
    # keep earlier results of configurations not in this grid (resume with a different grid)
    wanted = {spec.key for spec in runs}
    results["runs"] = [r for k, r in done.items() if k not in wanted]
    with tempfile.TemporaryDirectory(prefix="prune_model-") as tmp:
        for i, spec in enumerate(runs):
            if spec.key in done:
                log(f"[{i + 1}/{len(runs)}] {spec.key}: kept from {out}")
                results["runs"].append(done[spec.key])
                write_results(results, out)
                continue
            log(f"[{i + 1}/{len(runs)}] {spec.key} ...")
            workdir = Path(tmp) / f"run{i}"
            workdir.mkdir()
            rec = runner(spec, settings, workdir, timeout)
            results["runs"].append(rec)
            write_results(results, out)
            if rec["status"] == "ok":
                ppl = ", ".join(f"{k} {v:.2f}" for k, v in rec["perplexity"].items())
                log(f"    ppl {ppl}; {rec['wall_s']:.1f} s; peak {rec['peak_rss_bytes'] / 2 ** 20:.0f} MiB")
            else:
                log(f"    {rec['status']}: {rec['error']}")
    write_results(results, out)
    return results


# --------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS), metavar="NAME[:OBJECTIVE]")
    p.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS), metavar="PATTERN")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window length")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens per text")
    p.add_argument("--calib", default=None, help="calibration source (default: layerprune's)")
    p.add_argument("--eval", nargs="+", default=None, help="evaluation sources (default: layerprune's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="passed to layerprune prune (default: its own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prune-args", default="", metavar="ARGS",
                   help="extra arguments for every run, e.g. '--time-limit-per-layer 5'")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="per run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (and .md next to it)")
    p.add_argument("--resume", action="store_true",
                   help="keep the successful runs of --out (same settings) and run the rest")
    p.add_argument("--redo", nargs="+", default=[], metavar="'PATTERN SOLVER:OBJECTIVE'",
                   help="with --resume: run these configurations again, e.g. 'per-row:0.5 admm:reconstruct'")
    return p.parse_args(argv)


def _own_command(argv=None) -> str:
    """This benchmark's command line as a user would type it from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "benchmarks/prune_model.py", *args])


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "eval_tokens": args.eval_tokens, "calib": args.calib, "eval": args.eval,
                "seed": args.seed, "device": args.device, "dtype": args.dtype,
                "prune_args": args.prune_args}
    try:
        if min(args.nsamples, args.seqlen, args.eval_tokens) < 1:
            raise BenchmarkError("--nsamples, --seqlen and --eval-tokens must be positive")
        runs, skipped = plan_runs(args.patterns, args.solvers, _capabilities())
        for sk in skipped:
            print(f"skipping {sk['key']}: {sk['reason']}", file=sys.stderr)
        results = benchmark(settings, runs, args.out, resume=args.resume, skipped=skipped,
                            timeout=args.timeout, log=lambda s: print(s, file=sys.stderr, flush=True),
                            redo=tuple(args.redo), command=_own_command(argv))
    except BenchmarkError as exc:
        print(f"prune_model: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(results))
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
