"""Structured pruning results (issue 18 item 4): the model benchmark's ``mlp:F`` runs from
several driver files, each fraction's best structured baseline against ``alternating``, and the
saved checkpoints' size and speed from one ``layerprune speed --json`` run.

Usage::

    python benchmarks/structured_report.py --runs A.json B.json … --speed speed.json \\
        --speed-names 0.1=alternating … --out benchmarks/results/structured_model.json

Every ``--runs`` file is a ``benchmarks/prune_model.py`` results file with the same settings
(checked); a configuration in several files takes the last one's run. ``--speed`` is a
``layerprune speed --json`` file whose first checkpoint is the dense model; ``--speed-names``
labels the others in order (``FRACTION=METHOD``). Writes the JSON and a markdown file next to
it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
#: the merged file's ``prune_args`` (each run's own are in its command)
PER_RUN = "(per run: see each run's command)"
METHOD_ORDER = ("magnitude:mask", "magnitude:reconstruct", "wanda:mask", "wanda:reconstruct",
                "alternating:reconstruct")
METHOD_NAMES = {"magnitude:mask": "channel magnitude, no refit", "magnitude:reconstruct": "channel magnitude, refitted",
                "wanda:mask": "Wanda-sp, no refit", "wanda:reconstruct": "Wanda-sp, refitted",
                "alternating:reconstruct": "**alternating**"}


def _bench():
    spec = importlib.util.spec_from_file_location("prune_model_bench", ROOT / "prune_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def merge(files: list[Path], *, args_ok=None, order_key=None, key=None, who: str = "structured_report") -> dict:
    """One results dict from several driver files with the same settings (``prune_args`` aside:
    ``args_ok(text)`` says which a file may have, by default only output flags); runs ordered by
    ``order_key(run)`` (default: fraction, then :data:`METHOD_ORDER`). Runs with the same
    ``key(run)`` (default: pattern, solver, objective) are one configuration: the last file's
    run stands."""
    bench = _bench()
    args_ok = args_ok or _only_output_args
    order_key = order_key or (lambda r: (float(r["pattern"].split(":")[1]),
                                         METHOD_ORDER.index(f"{r['solver']}:{r['objective']}")))
    key = key or (lambda r: f"{r['pattern']} {r['solver']}:{r['objective']}")
    loaded = [read_results(f, who) for f in files]
    def same(settings: dict) -> dict:   # a run's --out (in prune_args) changes no measurement
        return {k: v for k, v in settings.items() if k != "prune_args"}

    settings = dict(loaded[0]["settings"], prune_args=PER_RUN)
    for f, d in zip(files, loaded):
        if same(d["settings"]) != same(settings) or not args_ok(d["settings"].get("prune_args") or ""):
            raise SystemExit(f"{who}: {f} was run with other settings: {d['settings']}")
    runs = {}
    for d in loaded:
        for r in d["runs"]:
            if r.get("status") == "ok":
                runs[key(r)] = r
    order = sorted(runs.values(), key=order_key)
    results = {"benchmark": "prune_model", "settings": settings, "environment": loaded[-1].get("environment") or {},
               "skipped": [], "runs": order, "sources": [str(f) for f in files]}
    results["dense_perplexity"], results["dense_mismatch"] = bench.dense_perplexity(order)
    return results


def read_results(path: Path, who: str) -> dict:
    """A driver's results file (``settings`` and ``runs``), or one line saying why it is not one."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{who}: error: cannot read {path}: {exc}") from None
    if not isinstance(d, dict) or not {"settings", "runs"} <= d.keys():
        raise SystemExit(f"{who}: error: {path} is not a prune_model results file (no settings and runs)")
    return d


def _only_output_args(text: str) -> bool:
    """``prune_args`` that only save the model (``--out DIR``, ``--force``), or a merged file's."""
    if text == PER_RUN:
        return True
    words = text.split()
    while words:
        if words[0] == "--force":
            words = words[1:]
        elif words[0] == "--out" and len(words) > 1:
            words = words[2:]
        else:
            return False
    return True


def against_baselines(results: dict) -> list[dict]:
    """Per fraction and text: alternating, the best baseline, and the relative difference."""
    rows = []
    fractions = sorted({float(r["pattern"].split(":")[1]) for r in results["runs"]})
    texts = list(results["dense_perplexity"])
    for f in fractions:
        runs = [r for r in results["runs"] if float(r["pattern"].split(":")[1]) == f]
        alt = next((r for r in runs if r["solver"] == "alternating"), None)
        base = [r for r in runs if r["solver"] != "alternating"]
        if alt is None or not base:
            continue
        for t in texts:
            best = min(base, key=lambda r: r["perplexity"][t])
            rows.append({"fraction": f, "text": t, "alternating": alt["perplexity"][t],
                         "best_baseline": best["perplexity"][t],
                         "best_baseline_method": f"{best['solver']}:{best['objective']}",
                         "baselines_measured": sorted(f"{r['solver']}:{r['objective']}" for r in base),
                         "change": alt["perplexity"][t] / best["perplexity"][t] - 1.0})
    return rows


def speed_rows(speed: dict, names: list[str]) -> list[dict]:
    """Each pruned checkpoint against the dense one (the first): sizes, memory, speed-ups."""
    cps = speed["checkpoints"]
    if len(names) != len(cps) - 1:
        raise SystemExit(f"structured_report: {len(cps) - 1} pruned checkpoints in --speed, {len(names)} names")
    out = []
    for i, (cp, name) in enumerate(zip(cps[1:], names), start=1):
        row = {"name": name, "path": cp["path"], "intermediate_size": cp["shape"]["intermediate_size"],
               "decoder_bytes": cp["size"]["decoder_bytes"], "dense_decoder_bytes": cps[0]["size"]["decoder_bytes"],
               "safetensors_bytes": cp["size"]["safetensors_bytes"],
               "peak_rss": (cp.get("memory") or {}).get("peak_rss"),
               "dense_peak_rss": (cps[0].get("memory") or {}).get("peak_rss")}
        for task in speed["tasks"]:
            ratios = task["models"][i]["speedup_per_run"]
            row[task["task"]] = {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
                                 "tokens_per_s": task["models"][i]["tokens_per_s_spread"]["median"],
                                 "dense_tokens_per_s": task["models"][0]["tokens_per_s_spread"]["median"]}
        out.append(row)
    return out


def runs_lines(results: dict) -> list[str]:
    """The markdown lines of each run's commit and load, then the note."""
    lines = ["", "## Runs: commit, load", "", "| run | commit | load (1/5/15 min) at start |", "|---|---|---|"]
    for r in results["runs"]:
        load = " / ".join(f"{v:.2f}" for v in r.get("load_at_start") or [])
        lines.append(f"| {r['pattern']} {r['solver']}:{r['objective']} | {r.get('code')} | {load} |")
    if results.get("note"):
        lines += ["", results["note"]]
    return lines


def report_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every report shares: ``--runs`` (driver files), ``--note``, ``--out``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path, required=True)
    return p


def write(results: dict, out: Path, text: str) -> None:
    """``out`` (JSON) and its ``.md`` (``text``), each atomically; ``text`` printed."""
    bench = _bench()
    bench._atomic_text(out, json.dumps(results, indent=1) + "\n")
    bench._atomic_text(out.with_suffix(".md"), text)
    print(text)


def markdown(results: dict) -> str:
    bench = _bench()
    lines = [bench.markdown(results).rstrip(), "", "## Against the best structured baseline", "",
             "| fraction | text | alternating | best baseline | its method | change |", "|---:|---|---:|---:|---|---:|"]
    for r in results["against_baselines"]:
        lines.append(f"| {r['fraction']:g} | {r['text']} | {r['alternating']:.2f} | {r['best_baseline']:.2f} | "
                     f"{METHOD_NAMES[r['best_baseline_method']].strip('*')} | {100 * r['change']:+.1f}% |")
    lines += runs_lines(results)
    if results.get("speed"):
        s = results["speed_settings"]
        lines += ["", "## Size and speed of the saved `alternating` checkpoints against the dense one", "",
                  f"`{results['speed_command']}` ({s['runs']} interleaved runs, {s['threads']} thread(s), load "
                  f"{results['speed_load'][0]:.2f} → {results['speed_load'][1]:.2f}). Ratios are per run (both "
                  "models timed back to back) and their median [min, max].", "",
                  "| checkpoint | intermediate size | decoder MiB | files MiB | peak RSS MiB | prefill 8×256 | "
                  "generation b1 | generation b8 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["speed"]:
            def cell(task):
                v = r.get(task)
                return "–" if v is None else f"{v['median']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
            lines.append(f"| {r['name']} | {r['intermediate_size']} | {r['decoder_bytes'] / 2 ** 20:.2f} "
                         f"({100 * (r['decoder_bytes'] / r['dense_decoder_bytes'] - 1):+.1f}%) | "
                         f"{r['safetensors_bytes'] / 2 ** 20:.2f} | "
                         f"{(r['peak_rss'] or 0) / 2 ** 20:.0f} (dense {(r['dense_peak_rss'] or 0) / 2 ** 20:.0f}) | "
                         f"{cell('prefill 8x256')} | {cell('generate b1 32 new')} | {cell('generate b8 32 new')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = report_parser(__doc__)
    p.add_argument("--speed", type=Path)
    p.add_argument("--speed-names", nargs="*", default=[])
    p.add_argument("--speed-command", default="")
    args = p.parse_args(argv)
    results = merge(args.runs)
    results["note"] = args.note
    results["against_baselines"] = against_baselines(results)
    if args.speed:
        speed = json.loads(args.speed.read_text())
        results["speed"] = speed_rows(speed, args.speed_names)
        results["speed_settings"] = speed["settings"]
        results["speed_load"] = [speed["environment"]["loadavg_start"][0], speed["environment"]["loadavg_end"][0]]
        results["speed_command"] = args.speed_command
    write(results, args.out, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
