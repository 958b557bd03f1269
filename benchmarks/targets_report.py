"""Issue 16's perplexity targets on the bundled model: for each sparsity, the bar the issue sets,
the best measured run on each text, and its distance to the bar.

Usage::

    python benchmarks/targets_report.py --runs A.json B.json … --out benchmarks/results/issue16_targets.json

Every ``--runs`` file is a ``benchmarks/prune_model.py`` results file (or a file merged from them)
with the model benchmark's settings (checked); ``--prune-args`` may differ and name the run. A
later file replaces an earlier file's run of the same configuration (pattern, solver, objective,
prune arguments, Elsa options), so give them oldest first.

The bars (issue 16, "Targets"), per text:

- 50% and 60% (per-row or unstructured runs of that fraction) and 2:4: at most today's ADMM at
  that pattern less 10% (:data:`FIXED_BARS`, the issue's figures), lower where an unstructured anchor of
  that fraction — SparseGPT or ADMM on ``reconstruct``, their published form — measured better:
  0.9 × that anchor. Anchors not yet measured are listed: the bar may fall when they are;
- 70% per-row: 0.75 × the best of Wanda, SparseGPT and ADMM at 70% per-row;
- the moonshot: 50% per-row on Persuasion at most 1.15 × the dense perplexity.

Two more of the issue's targets are read from the same files (:func:`other_targets`): the default
prune (``layerprune prune`` with no flags: :data:`DEFAULT_RUN`) within 15 minutes and below the
previous default's perplexity on both texts, and each reconstruct backend's job within 1.5 ×
Wanda's at 50% per-row, both runs from one results file (one machine, one sitting).

Every run of that sparsity is a candidate. Elsa runs train on the calibration text: they are
marked, the best run that never trains on the text's loss (layer-wise, or block-wise with
``--block-tune``: "without loss training") is given beside, and the control (the dense model fine-tuned
by the same loop and tokens) shows how much of a gain plain fine-tuning gives.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from elsa_report import _budget, _kind, _met, _num, _pct, warm_start_flags
from layerprune.pipeline.block_tune import DEFAULT_BLOCK_TUNE_EPOCHS, DEFAULT_PRUNE_BLOCK_TUNE_TARGET
from layerprune.pipeline.elsa import _BOOKKEEPING, ELSA_OPTIONS
from layerprune.pipeline.plan import DEFAULT_OBJECTIVE, DEFAULT_SOLVER
from structured_report import PER_RUN, read_results, report_parser, write

#: today's ADMM (per-row; N:M at 2:4) less 10%, the issue's figures, by sparsity level and text
FIXED_BARS = {"0.5": {"persuasion": 48.9, "mobydick": 77.9}, "0.6": {"persuasion": 62.9, "mobydick": 113.5},
              "2:4": {"persuasion": 69.8, "mobydick": 133.5}}
#: the anchors that can lower a fixed bar, and that factor
FIXED_ANCHORS, FIXED_FACTOR = ("sparsegpt:reconstruct", "admm:reconstruct"), 0.9
#: the 70% per-row bar: this factor times the best of these anchors
RELATIVE_ANCHORS, RELATIVE_FACTOR = ("wanda:mask", "sparsegpt:reconstruct", "admm:reconstruct"), 0.75
#: the moonshot: 50% per-row on this text within this factor of the dense model
MOONSHOT_TEXT, MOONSHOT_FACTOR = "persuasion", 1.15
#: prune arguments an anchor may have (they change no measurement of the published method)
ANCHOR_ARGS = ("", "--no-reference")
#: Elsa's defaults (a run's label names the options it sets otherwise)
ELSA_DEFAULTS = {o.name: o.default for o in ELSA_OPTIONS}
#: the default prune as the model benchmark runs it: pattern, method, prune arguments
DEFAULT_RUN = ("per-row:0.5", f"{DEFAULT_SOLVER}:{DEFAULT_OBJECTIVE}",
               f"--block-tune {DEFAULT_BLOCK_TUNE_EPOCHS} --block-tune-target {DEFAULT_PRUNE_BLOCK_TUNE_TARGET}")
#: its budget (seconds for the whole job on 2 cores) and the perplexity of the default it replaced
DEFAULT_WALL_S, DEFAULT_BEFORE = 900.0, {"persuasion": 60.05, "mobydick": 96.66}
#: every reconstruct backend's job at most this × Wanda's (50% per-row, the same results file)
WALL_PATTERN, WALL_FACTOR = "per-row:0.5", 1.5
#: settings every file must share (its --prune-args aside)
SAME = ("model", "nsamples", "seqlen", "eval_tokens", "calib", "eval", "seed", "dtype")


def level(pattern: str) -> Optional[str]:
    """The sparsity a pattern is judged at: ``"0.5"`` for ``per-row:0.5`` and ``unstructured:0.5``,
    ``"2:4"`` for ``nm:2:4``; None for other kinds (columns, MLP channels)."""
    kind, _, value = pattern.partition(":")
    if kind in ("per-row", "unstructured"):
        return f"{float(value):g}"
    return value if kind == "nm" else None


def load(files: list[Path]) -> dict:
    """The runs of every file (``ok`` only), each tagged with its file's ``prune_args``; a later
    file's run of the same configuration replaces an earlier one in ``runs`` (every one stays in
    ``timed_runs``: a wall ratio is measured within its own file)."""
    runs, every, settings, dense = {}, [], None, {}
    for f in files:
        d = read_results(f, "targets_report")
        these = {k: d["settings"].get(k) for k in SAME}
        if settings is None:
            settings = these
        elif these != settings:
            raise SystemExit(f"targets_report: {f} was run with other settings: {d['settings']}")
        args = d["settings"].get("prune_args") or ""
        for r in d["runs"]:
            if r.get("status") != "ok":
                continue
            r = dict(r, prune_args=r.get("prune_args", "") if args == PER_RUN else args, source=str(f))
            runs[_key(r)] = r
            every.append(r)
            dense = r.get("dense_perplexity") or dense
    return {"settings": settings, "runs": list(runs.values()), "timed_runs": every, "dense_perplexity": dense,
            "sources": [str(f) for f in files]}


def _key(run: dict) -> str:
    """One configuration: pattern, method, the prune arguments that change a measurement, Elsa's options."""
    return f"{label(run)} {json.dumps(_options(run), sort_keys=True)}"


def label(run: dict) -> str:
    """How a run is named in the table: pattern, method, and its prune arguments (a layer-wise run)
    or its warm start's block tuning and the options it sets away from the defaults (an Elsa run,
    read from its command and report: files merged by ``elsa_report`` keep no prune arguments)."""
    name = f"{run['pattern']} {run['solver']}:{run['objective']}"
    if _kind(run) == "layerwise":
        extra = [a for a in [run["prune_args"]] if a not in ANCHOR_ARGS]
    else:
        options = _options(run)
        extra = [a for a in [warm_start_flags(run)] if a]
        extra += [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(options.items())
                  if k in ELSA_DEFAULTS and v != ELSA_DEFAULTS[k]]
    return name + (f" ({'; '.join(extra)})" if extra else "")


def _options(run: dict) -> dict:
    """An Elsa run's options, less those that change nothing it computes."""
    options = (run.get("elsa") or {}).get("options") or {}
    return {k: v for k, v in options.items() if k not in _BOOKKEEPING}


def _method(run: dict) -> str:
    return f"{run['solver']}:{run['objective']}"


def bars(results: dict) -> list[dict]:
    """Every target's bar per text: ``target``, ``text``, ``bar``, ``bar_from``, the anchors
    measured and those missing, and the candidates' patterns."""
    runs, dense = results["runs"], results["dense_perplexity"]
    plain = [r for r in runs if _kind(r) == "layerwise" and r["prune_args"] in ANCHOR_ARGS]
    out = []
    for lv, fixed in FIXED_BARS.items():
        patterns = ["nm:2:4"] if lv == "2:4" else [f"per-row:{lv}", f"unstructured:{lv}"]
        lowering = [] if lv == "2:4" else [f"unstructured:{lv}"]
        anchors = [r for r in plain if r["pattern"] in lowering and _method(r) in FIXED_ANCHORS]
        missing = [f"{p} {m}" for p in lowering for m in FIXED_ANCHORS
                   if not any(r["pattern"] == p and _method(r) == m for r in anchors)]
        for text, value in fixed.items():
            bar, source = value, "today's ADMM − 10% (the issue's table)"
            best = min(anchors, key=lambda r: r["perplexity"][text], default=None)
            if best is not None and FIXED_FACTOR * best["perplexity"][text] < bar:
                bar, source = FIXED_FACTOR * best["perplexity"][text], f"{FIXED_FACTOR:g} × {label(best)}"
            out.append({"target": lv, "text": text, "bar": bar, "bar_from": source, "patterns": patterns,
                        "anchors": sorted(label(r) for r in anchors), "anchors_missing": missing})
    anchors = [r for r in plain if r["pattern"] == "per-row:0.7" and _method(r) in RELATIVE_ANCHORS]
    missing = [f"per-row:0.7 {m}" for m in RELATIVE_ANCHORS if not any(_method(r) == m for r in anchors)]
    for text in dense:
        best = min(anchors, key=lambda r: r["perplexity"][text], default=None)
        out.append({"target": "0.7", "text": text,
                    "bar": None if best is None or missing else RELATIVE_FACTOR * best["perplexity"][text],
                    "bar_from": "–" if best is None or missing else f"{RELATIVE_FACTOR:g} × {label(best)}",
                    "patterns": ["per-row:0.7"], "anchors": sorted(label(r) for r in anchors),
                    "anchors_missing": missing})
    if MOONSHOT_TEXT in dense:
        out.append({"target": "0.5 moonshot", "text": MOONSHOT_TEXT, "bar": MOONSHOT_FACTOR * dense[MOONSHOT_TEXT],
                    "bar_from": f"{MOONSHOT_FACTOR:g} × dense", "patterns": ["per-row:0.5"], "anchors": [],
                    "anchors_missing": []})
    return out


def verdicts(results: dict) -> list[dict]:
    """Per bar: the best candidate overall and the best without loss training (``best_layerwise``:
    layer-wise or block-wise reconstruction), each with ``ppl / bar − 1``
    and whether it meets the bar (None without a bar); the control's change where Elsa is best."""
    runs, dense = results["runs"], results["dense_perplexity"]
    controls = [r for r in runs if _kind(r) == "control"]
    rows = []
    for b in bars(results):
        text = b["text"]
        candidates = [r for r in runs if r["pattern"] in b["patterns"] and _kind(r) != "control"
                      and text in r["perplexity"]]
        row = dict(b)
        for name, pool in (("best", candidates), ("best_layerwise", [r for r in candidates if _kind(r) == "layerwise"])):
            run = min(pool, key=lambda r: r["perplexity"][text], default=None)
            ppl = None if run is None else run["perplexity"][text]
            gap = None if ppl is None or b["bar"] is None else ppl / b["bar"] - 1.0
            row.update({name: None if run is None else label(run), f"{name}_ppl": ppl, f"{name}_vs_bar": gap,
                        f"{name}_met": None if gap is None else gap <= 0.0,
                        f"{name}_code": None if run is None else run.get("code")})
            if name == "best" and run is not None and _kind(run) == "elsa":
                control = next((c for c in controls if _budget(c) == _budget(run)), None)
                row["control_change_vs_dense"] = (None if control is None
                                                  else control["perplexity"][text] / dense[text] - 1.0)
        rows.append(row)
    return rows


def other_targets(results: dict) -> list[dict]:
    """The default prune's budget and perplexity, and each reconstruct backend's wall time against
    Wanda's from the same file: ``rows`` of ``target``, ``run``, ``measured``, ``bar``, ``value``,
    ``met`` (``value`` ≤ ``bar``; below it for the perplexities), one wall row per file that timed
    a reconstruct backend beside Wanda, and ``missing``: the reconstruct backends at 50% per-row
    never timed beside Wanda in their file."""
    runs, rows = results["runs"], []
    default = next((r for r in runs if (r["pattern"], _method(r), r["prune_args"]) == DEFAULT_RUN), None)
    if default is not None:
        rows.append(_row("default prune", default, "job wall s", DEFAULT_WALL_S, default.get("wall_s"), strict=False))
        for text, before in DEFAULT_BEFORE.items():
            rows.append(_row("default prune", default, f"ppl {text} (default before)", before,
                             default["perplexity"].get(text), strict=True))
    plain = [r for r in results.get("timed_runs", runs)
             if r["pattern"] == WALL_PATTERN and _kind(r) == "layerwise" and r["prune_args"] in ANCHOR_ARGS]
    wanda = {(r["source"], r["prune_args"]): r for r in plain if _method(r) == "wanda:mask"}
    missing = []
    order = {src: i for i, src in enumerate(results.get("sources") or [])}   # oldest file first
    for r in sorted((r for r in plain if r["objective"] == "reconstruct"),
                    key=lambda r: (_method(r), order.get(r["source"], len(order)))):
        ref = wanda.get((r["source"], r["prune_args"]))
        if ref is None or not r.get("wall_s") or not ref.get("wall_s"):
            missing.append(label(r))
            continue
        rows.append(_row(f"reconstruct wall ≤ {WALL_FACTOR:g} × Wanda", r, "job / Wanda's job", WALL_FACTOR,
                         r["wall_s"] / ref["wall_s"], strict=False, digits=3))
    timed = {r["run"] for r in rows}
    return {"rows": rows, "missing": sorted(set(missing) - timed)}


def _row(target: str, run: dict, measured: str, bar: float, value: Optional[float], strict: bool,
         digits: int = 2) -> dict:
    """One row of :func:`other_targets` (``digits``: decimals the table shows bar and value with)."""
    met = None if value is None else (value < bar if strict else value <= bar)
    return {"target": target, "run": label(run), "measured": measured, "bar": bar, "value": value, "met": met,
            "code": run.get("code"), "source": Path(run["source"]).name, "digits": digits}


def _gap(x: Optional[float]) -> str:
    """A distance to a bar, to a hundredth of a percent (a run 0.03% over it is not met)."""
    return "–" if x is None else f"{100 * x:+.2f}%"


def markdown(results: dict) -> str:
    s = results["settings"]
    calib = next((r["calib_name"] for r in results["runs"] if r.get("calib_name")), s.get("calib") or "default")
    lines = ["# Issue 16: the model targets, met or the distance to them", "",
             f"Model `{s['model']}`; calibration {calib}: {s['nsamples']} × {s['seqlen']} "
             f"tokens, seed {s['seed']}; evaluation: the first {s['eval_tokens']} tokens of each text; dense "
             + ", ".join(f"{t} {v:.2f}" for t, v in results["dense_perplexity"].items()) + ".", "",
             "Bars: 50%, 60% (per-row or unstructured) and 2:4 at most today's ADMM at that pattern − 10%, lower where "
             "unstructured SparseGPT or ADMM of that fraction measured better (0.9 × it); 70% per-row 0.75 × the best of Wanda, "
             "SparseGPT and ADMM; moonshot 50% per-row Persuasion ≤ 1.15 × dense. `vs bar`: perplexity / bar − 1 "
             "(≤ 0 meets it). `elsa` runs train on the calibration text: `control` is the dense model fine-tuned "
             "by the same loop and tokens, against the dense model. `best without loss training`: layer-wise runs "
             "and block-wise reconstruction (`--block-tune`: each block toward the dense block's outputs on the "
             "calibration inputs), which never fit the text's own loss.", "",
             "| target | text | bar | bar from | best run | ppl | vs bar | met | best without loss training | ppl | vs bar | met "
             "| control vs dense |",
             "|---|---|---:|---|---|---:|---:|---|---|---:|---:|---|---:|"]
    for r in results["targets"]:
        lines.append(f"| {r['target']} | {r['text']} | {_num(r['bar'])} | {r['bar_from']} | {r['best'] or '–'} | "
                     f"{_num(r['best_ppl'])} | {_gap(r['best_vs_bar'])} | {_met(r['best_met'])} | "
                     f"{r['best_layerwise'] or '–'} | {_num(r['best_layerwise_ppl'])} | "
                     f"{_gap(r['best_layerwise_vs_bar'])} | {_met(r['best_layerwise_met'])} | "
                     f"{_pct(r.get('control_change_vs_dense'))} |")
    missing = sorted({m for r in results["targets"] for m in r["anchors_missing"]})
    if missing:
        lines += ["", "Anchors not measured (a bar may fall when they are): " + ", ".join(missing) + "."]
    others = results.get("other_targets") or {"rows": [], "missing": []}
    if others["rows"]:
        lines += ["", "| other target | run | measured | bar | value | vs bar | met | commit | source |",
                  "|---|---|---|---:|---:|---:|---|---|---|"]
        for r in others["rows"]:
            gap = None if r["value"] is None else r["value"] / r["bar"] - 1.0
            bar, value = (("–" if x is None else f"{x:.{r['digits']}f}") for x in (r["bar"], r["value"]))
            lines.append(f"| {r['target']} | {r['run']} | {r['measured']} | {bar} | {value} | "
                         f"{_gap(gap)} | {_met(r['met'])} | {r['code'] or '–'} | {r['source']} |")
        lines += ["", "Wall rows: one per file that timed the backend beside Wanda's job, oldest file first; "
                  "each file's ratio holds for its commit and load."]
    if others["missing"]:
        lines += ["", "Reconstruct backends at 50% per-row not timed beside Wanda (no Wanda run in their file): "
                  + ", ".join(others["missing"]) + "."]
    lines += ["", "Sources, oldest first: " + ", ".join(f"`{s}`" for s in results["sources"]) + ".", "",
              "| run | " + " | ".join(f"ppl {t}" for t in results["dense_perplexity"])
              + " | wall s | peak MiB | commit | load (1/5/15 min) at start | source |",
              "|---|" + "---:|" * (len(results["dense_perplexity"]) + 2) + "---|---|---|"]
    for r in sorted(results["runs"], key=lambda r: (level(r["pattern"]) or "", label(r))):
        load = " / ".join(f"{v:.2f}" for v in r.get("load_at_start") or [])
        peak = None if r.get("peak_rss_bytes") is None else r["peak_rss_bytes"] / 2 ** 20
        ppl = " | ".join(_num(r["perplexity"].get(t)) for t in results["dense_perplexity"])
        lines.append(f"| {label(r)} | {ppl} | {_num(r.get('wall_s'))} | {'–' if peak is None else f'{peak:.0f}'} | "
                     f"{r.get('code') or '–'} | {load or '–'} | {Path(r['source']).name} |")
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = report_parser(__doc__).parse_args(argv)
    results = load(args.runs)
    results["note"] = args.note
    results["targets"] = verdicts(results)
    results["other_targets"] = other_targets(results)
    del results["timed_runs"]   # the same runs as the sources' files: the JSON keeps ``runs`` only
    write(results, args.out, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
