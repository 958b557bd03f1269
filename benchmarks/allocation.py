"""Sparsity across layers on the bundled model: the table of runs of ``layerprune prune``
with ``--allocate uniform | owl | knapsack`` (issue 16, item 4).

The runs themselves are plain ``layerprune prune`` commands, one at a time, each into its own
directory holding ``report.json`` and what the run recorded beside it: ``command`` (the
exact command line), ``commit`` (the code measured), ``load_start`` / ``load_end``
(``/proc/loadavg``) and ``wall`` (seconds, when recorded). This script reads those
directories and writes the results JSON and its markdown table::

    python benchmarks/allocation.py /tmp/alloc/uniform-0.5 /tmp/alloc/owl-0.5 ... \\
        --out benchmarks/results/allocation.json

Per run: the pattern, the allocation, perplexity on each evaluation text (dense and pruned),
the measured model-wide sparsity, the range of the layers' sparsities, the pruning and total
seconds, and the run's command, commit and load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "allocation.json"


def _read(path: Path) -> Optional[str]:
    return path.read_text().strip() if path.is_file() else None


def _load(text: Optional[str]) -> Optional[list]:
    return [float(x) for x in text.split()[:3]] if text else None


def collect(run_dir: Path) -> dict:
    """One run's record from its directory."""
    report = json.loads((run_dir / "report.json").read_text())
    s = report["settings"]
    alloc = report.get("allocation") or {}
    layer_sparsity = [r["sparsity"] for r in report["layers"] if r.get("sparsity") is not None]
    wall = _read(run_dir / "wall")
    rec = {
        "run": run_dir.name, "pattern": s["pattern"], "solver": s["solver"], "objective": s["objective"],
        "allocate": s.get("allocate", "uniform"), "dense_perplexity": report["dense_perplexity"],
        "perplexity": report["perplexity"], "sparsity": report["sparsity"],
        "layer_sparsity_min": min(layer_sparsity) if layer_sparsity else None,
        "layer_sparsity_max": max(layer_sparsity) if layer_sparsity else None,
        "prune_seconds": report["timings"].get("prune"), "allocate_seconds": report["timings"].get("allocate"),
        "seconds": report["seconds"], "wall_seconds": float(wall) if wall else None,
        "peak_memory_bytes": report["peak_memory_bytes"],
        "command": _read(run_dir / "command"), "commit": _read(run_dir / "commit"),
        "load_start": _load(_read(run_dir / "load_start")), "load_end": _load(_read(run_dir / "load_end")),
        "settings": {k: s.get(k) for k in ("model", "nsamples", "seqlen", "eval_tokens", "calib", "eval", "seed",
                                           "dtype", "device", "owl_m", "owl_lambda", "knapsack_norm")},
    }
    if alloc.get("blocks"):
        rec["owl_blocks"] = alloc["blocks"]
    if alloc.get("method") == "knapsack":
        rec["knapsack"] = {k: alloc[k] for k in ("norm", "levels", "budget_kept", "kept", "cost", "uniform_cost")}
    return rec


def markdown(runs: list[dict], note: str = "") -> str:
    texts = list(runs[0]["perplexity"]) if runs else []
    first = runs[0]["settings"] if runs else {}
    lines = ["# Sparsity across layers on SmolLM2: uniform, OWL, knapsack (Wanda masks)", "",
             f"Model `{first.get('model')}`; calibration {first.get('calib')}: {first.get('nsamples')} × "
             f"{first.get('seqlen')} tokens, seed {first.get('seed')}; evaluation: the first "
             f"{first.get('eval_tokens')} tokens of each text in {first.get('seqlen')}-token windows; "
             f"dtype {first.get('dtype')}, device {first.get('device')}. Every run is one `layerprune prune` "
             f"command (below), one at a time, under `nice` on a 2-core machine shared with other work.", "",
             "| pattern | allocate | " + " | ".join(f"ppl {t}" for t in texts)
             + " | sparsity | layer sparsity | prune s | total s | commit | load (1 min) start → end |",
             "|---|---|" + "---:|" * len(texts) + "---:|---|---:|---:|---|---|"]
    dense = runs[0]["dense_perplexity"] if runs else {}
    lines.insert(len(lines), "| dense | – | " + " | ".join(f"{dense[t]:.2f}" for t in texts)
                 + " | – | – | – | – | – | – |")
    for r in sorted(runs, key=lambda r: (r["pattern"], r["allocate"] != "uniform", r["allocate"])):
        ls = (f"{100 * r['layer_sparsity_min']:.1f}–{100 * r['layer_sparsity_max']:.1f}%"
              if r["layer_sparsity_min"] is not None else "–")
        load = (f"{r['load_start'][0]:.1f} → {r['load_end'][0]:.1f}" if r["load_start"] and r["load_end"] else "–")
        lines.append(f"| {r['pattern']} | {r['allocate']} | " + " | ".join(f"{r['perplexity'][t]:.2f}" for t in texts)
                     + f" | {100 * r['sparsity']:.2f}% | {ls} | {r['prune_seconds']:.0f} | {r['seconds']:.0f} "
                     f"| {r['commit']} | {load} |")
    mismatch = [r["run"] for r in runs if any(abs(r["dense_perplexity"][t] - dense[t]) > 1e-6 * dense[t]
                                              for t in texts)]
    if mismatch:
        lines += ["", f"Warning: dense perplexity differs in {', '.join(mismatch)}."]
    if note:
        lines += ["", note]
    lines += ["", "Commands:", ""]
    lines += [f"- `{r['command']}`" for r in runs]
    owl = [r for r in runs if r.get("owl_blocks")]
    for r in owl:
        bl = r["owl_blocks"]
        lines += ["", f"OWL at {r['pattern']} (M {r['settings']['owl_m']}, λ {r['settings']['owl_lambda']}): "
                  f"block sparsity by block, " + ", ".join(f"{100 * b['sparsity']:.1f}" for b in bl)
                  + " (%); LOD " + ", ".join(f"{100 * b['lod']:.2f}" for b in bl) + " (%)."]
    return "\n".join(lines) + "\n"


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (report.json, command, commit, load_*)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--note", default="", help="a paragraph to print under the table (how the runs were made)")
    args = p.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / "report.json").is_file()]
    if missing:
        print(f"allocation: error: no report.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = [collect(d) for d in args.runs]
    _atomic_text(args.out, json.dumps({"benchmark": "allocation", "note": args.note, "runs": runs}, indent=2) + "\n")
    text = markdown(runs, args.note)
    _atomic_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
