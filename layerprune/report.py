"""What a pruning job measured: per-layer records, the job report, its JSON and its plot.

The JSON written by ``layerprune prune --report FILE.json`` is :meth:`PruneReport.to_json`:

``dense_perplexity`` / ``perplexity``
    mapping evaluation text name → perplexity of the dense / pruned model
``sparsity``
    fraction of zeros counted in the target linears after pruning
``seconds``, ``peak_memory_bytes``
    wall time of the whole job and the process's peak resident memory (plus the peak
    accelerator memory under ``peak_device_memory_bytes`` when one was used, and under
    ``peak_child_memory_bytes`` the peak of the largest child process it ran, if any: the
    one-time conversion of the bundled model, a solver's worker process). ``memory_target_bytes``
    is the budget this toolkit holds itself to: the process's resident memory just after
    loading less the model's weights (``memory_base_bytes``: Python, torch, transformers, the
    tokenizer and texts, the same in every dtype) plus 2 × the model's size plus one block's
    input and output hidden states for the calibration set.
``layers``
    one record per pruned linear (see :class:`LayerRecord`)
``allocation``
    how each layer's sparsity was chosen, for a pattern given as a fraction: ``method``
    (``uniform``, ``owl``, ``map``), ``target``, OWL's ``owl_m``, ``owl_lambda`` and per-block
    ``lod`` / ``sparsity``, and ``fractions`` (layer name → pruned fraction asked for; the file
    ``sparsity_map.json`` written beside the report holds the same). Each layer record's
    ``sparsity`` is what its mask got.
``elsa``
    under ``--solver elsa`` (:mod:`layerprune.pipeline.elsa`): ``options``, ``steps_done``,
    ``tokens``, ``interrupted``, ``seconds``, ``final_residual`` and the per-step ``history``
    (loss, gradient norm, learning rate, λ, and at z-updates the residual and mask change);
    None otherwise
``block_tuning``
    under ``--block-tune`` (:mod:`layerprune.pipeline.block_tune`): ``epochs``, ``lr``, ``seed``,
    ``batch`` (sequences per step; None: each calibration mini-batch) and per block ``error_before`` / ``error_after`` (the block's mean square output error
    against the dense block on the same inputs), ``steps``, ``seconds``. The layer records then
    hold each layer's layer-wise solve (objective, mask) before its block was tuned; the masks
    are the final ones, the weights are not. None otherwise
``structure``
    under ``--structure`` (:mod:`layerprune.pipeline.channels`): ``kind``, ``fraction``,
    ``intermediate_size`` (before, after), ``decoder_parameters`` (the decoder blocks'
    parameter count before, after) and ``kept_channels`` ({``down_proj``'s name: kept channel
    indices of the dense model}); None otherwise
``settings``
    everything needed to reproduce the run (model, solver, pattern, calibration source,
    nsamples, seqlen, seed, …)
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["LayerRecord", "PruneReport", "format_report", "median_block_error_change", "write_json_atomic",
           "plot_layer_errors", "pack_mask", "unpack_mask"]

#: copies of the model's weights the memory target allows beside the base: the model itself and
#: one more for a block's working copies, the solvers' float64 work and saving
MODEL_COPIES = 2


def pack_mask(mask) -> tuple[tuple[int, ...], np.ndarray]:
    """A bool mask packed to bits (8 weights per byte): ``(shape, uint8 array)``.

    Whole-model runs keep one mask per pruned linear until the save; as bool tensors those
    take as many bytes as weights (101 MiB for SmolLM2-135M), packed an eighth of it.
    """
    import torch

    m = torch.as_tensor(mask).detach().to("cpu", torch.bool)
    return tuple(m.shape), np.packbits(m.numpy().reshape(-1))


def unpack_mask(packed: tuple[tuple[int, ...], np.ndarray]):
    """Inverse of :func:`pack_mask`: a (d_out, d_in) bool CPU tensor."""
    import torch

    shape, bits = packed
    n = int(np.prod(shape)) if shape else 1
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(bool).reshape(shape))


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    """JSON has no inf/NaN: map them to None (strict JSON readers reject them)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class LayerRecord:
    """One pruned linear layer.

    Attributes
    ----------
    block : index of the decoder block (-1 for ``lm_head``)
    name : qualified module name in the model (e.g. ``model.layers.3.mlp.down_proj``)
    shape : (d_out, d_in)
    pattern : the pattern bound to this layer (counts, e.g. ``per-row:288``)
    objective_kind : ``mask`` or ``reconstruct``
    solver : backend that produced the mask
    objective : the problem's exact objective of the written weights
    wanda_objective : Wanda's objective on the same problem (reference)
    lower_bound, bound_source, gap : certificate where the backend gives one
    status, limit : the solver's status and why it stopped early
    seconds : solver wall time for this layer (the Wanda reference, and a start reused from it,
        excluded)
    ntokens : calibration tokens in this layer's Gram matrix
    sparsity : pruned fraction of the layer's written mask (what the layer got)
    refit : under ``reconstruct``, how the kept weights were refitted (``problems.refit``'s
        ``RefitResult.describe()``: method, iterations, tolerance, largest relative residual,
        converged; with ``seconds``); a CG refit that did not converge scores its weights' own
        error, an upper bound on the mask's exact objective
    packed_mask : the mask packed to bits (:func:`pack_mask`); the property ``mask`` gives the
        (d_out, d_in) bool CPU tensor (True = kept). Not written to JSON.
    """

    block: int
    name: str
    shape: tuple
    pattern: str
    objective_kind: str
    solver: str
    objective: float
    wanda_objective: Optional[float]
    lower_bound: Optional[float]
    bound_source: Optional[str]
    gap: Optional[float]
    status: str
    limit: Optional[str]
    seconds: float
    ntokens: int
    sparsity: Optional[float] = None
    refit: Optional[dict] = None
    packed_mask: Any = field(default=None, repr=False, compare=False)

    @property
    def mask(self):
        """(d_out, d_in) bool CPU tensor (True = kept), unpacked from ``packed_mask``."""
        return None if self.packed_mask is None else unpack_mask(self.packed_mask)

    @property
    def reduction_vs_wanda(self) -> Optional[float]:
        """``1 − objective / wanda_objective`` (positive = better than Wanda)."""
        if self.wanda_objective is None or self.objective is None:
            return None
        if self.wanda_objective <= 0.0:
            return 0.0 if self.objective <= 0.0 else None
        return 1.0 - self.objective / self.wanda_objective

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "packed_mask"}
        d["shape"] = list(self.shape)
        for k in ("objective", "wanda_objective", "lower_bound", "gap", "seconds"):
            d[k] = _finite_or_none(d[k])
        d["reduction_vs_wanda"] = _finite_or_none(self.reduction_vs_wanda)
        return d


@dataclass
class PruneReport:
    """Everything one pruning job measured; :meth:`to_json` is the ``--report`` file."""

    dense_perplexity: dict
    perplexity: dict
    sparsity: float
    seconds: float
    peak_memory_bytes: int
    layers: list
    settings: dict
    peak_device_memory_bytes: Optional[int] = None
    timings: dict = field(default_factory=dict)
    peak_child_memory_bytes: Optional[int] = None
    model_size_bytes: Optional[int] = None
    memory_target_bytes: Optional[int] = None
    memory_base_bytes: Optional[int] = None
    out_dir: Optional[str] = None
    report_path: Optional[str] = None
    plot_path: Optional[str] = None
    allocation: Optional[dict] = None   # how each layer's sparsity was chosen (pipeline.allocate)
    map_path: Optional[str] = None      # the sparsity map written beside the report
    structure: Optional[dict] = None    # structured pruning (pipeline.channels): what was removed
    elsa: Optional[dict] = None         # whole-model ADMM (pipeline.elsa): its settings, steps and history
    block_tuning: Optional[dict] = None  # --block-tune (pipeline.block_tune): each block's error before, after

    # ------------------------------------------------------------------ views
    def to_json(self) -> dict:
        return {
            "dense_perplexity": {k: _finite_or_none(v) for k, v in self.dense_perplexity.items()},
            "perplexity": {k: _finite_or_none(v) for k, v in self.perplexity.items()},
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_device_memory_bytes": self.peak_device_memory_bytes,
            "peak_child_memory_bytes": self.peak_child_memory_bytes,
            "model_size_bytes": self.model_size_bytes,
            "memory_target_bytes": self.memory_target_bytes,
            "memory_base_bytes": self.memory_base_bytes,
            "median_reduction_vs_wanda": _finite_or_none(self.median_reduction_vs_wanda()),
            "timings": self.timings,
            "settings": self.settings,
            "out_dir": self.out_dir,
            "allocation": self.allocation,
            "structure": self.structure,
            "elsa": self.elsa,
            "block_tuning": self.block_tuning,
            "layers": [r.to_json() for r in self.layers],
        }

    def table(self) -> list[dict]:
        """Per-layer rows (plain dicts; ``pandas.DataFrame(report.table())`` tabulates them)."""
        return [r.to_json() for r in self.layers]

    def median_reduction_vs_wanda(self) -> Optional[float]:
        vals = [r.reduction_vs_wanda for r in self.layers if r.reduction_vs_wanda is not None]
        return statistics.median(vals) if vals else None

    def format(self) -> str:
        return format_report(self)

    # ------------------------------------------------------------------ files
    def write_json(self, path) -> Path:
        path = Path(path)
        write_json_atomic(path, self.to_json())
        return path


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2 ** 20:.0f} MiB"


def format_report(report: PruneReport) -> str:
    """The printed summary: dense vs pruned perplexity per text, sparsity, time, memory."""
    s = report.settings
    what = f"structure {s['structure']}" if s.get("structure") else f"pattern {s.get('pattern')}"
    lines = [
        f"model {s.get('model')}  solver {s.get('solver')}  {what}"
        + (f"  objective {s['objective']}" if s.get("objective") else ""),
        f"calibration {s.get('calib')}: {s.get('nsamples')} × {s.get('seqlen')} tokens, seed {s.get('seed')}",
        "",
        f"{'text':<20} {'dense ppl':>12} {'pruned ppl':>12}",
    ]
    for name in report.perplexity:
        d = report.dense_perplexity.get(name)
        p = report.perplexity[name]
        lines.append(f"{name:<20} {_num(d):>12} {_num(p):>12}")
    lines.append("")
    med = report.median_reduction_vs_wanda()
    if report.structure:
        lines.append(_structure_line(report.structure))
    elif report.elsa:
        lines.extend(_elsa_lines(report))
    else:
        lines.append(f"sparsity reached   {100 * report.sparsity:.2f}% of target linear weights "
                     f"({len(report.layers)} layers)")
    if med is not None and not report.elsa:  # under Elsa the layer records are the warm start's
        lines.append(f"error vs Wanda     median {100 * med:+.1f}% reduction per layer")
    certified = [r for r in report.layers if r.gap is not None]
    if certified:
        gaps = sorted(r.gap for r in certified)
        lines.append(f"certified layers   {len(certified)}, median gap {100 * statistics.median(gaps):.2f}%")
    refit = _refit_line(report.layers)
    if refit and not report.elsa:
        lines.append(refit)
    if report.block_tuning and report.block_tuning.get("blocks"):
        lines.append(_block_tuning_line(report.block_tuning))
    alloc = report.allocation
    if alloc and alloc.get("method") != "uniform" and alloc.get("fractions"):
        values = list(alloc["fractions"].values())
        lines.append(f"allocation         {alloc['method']}: layer sparsity {100 * min(values):.2f}% … "
                     f"{100 * max(values):.2f}%")
    steps = [f"{label} {report.timings[key]:.1f} s" for key, label in (("prune", "pruning"), ("elsa", "elsa"))
             if key in report.timings]
    lines.append(f"time               {report.seconds:.1f} s" + (f" ({', '.join(steps)})" if steps else ""))
    mem = f"peak memory        {_fmt_bytes(report.peak_memory_bytes)} RSS"
    if report.peak_device_memory_bytes:
        mem += f", {_fmt_bytes(report.peak_device_memory_bytes)} on the device"
    if report.model_size_bytes:
        mem += f" (model {_fmt_bytes(report.model_size_bytes)}"
        if report.elsa:
            mem += "; Elsa trains: weights, gradients, Adam's moments, z, u and the activations"
        elif report.memory_target_bytes:
            mem += (f"; target {_fmt_bytes(report.memory_target_bytes)} = base at load "
                    f"{_fmt_bytes(report.memory_base_bytes)} + {MODEL_COPIES} × model + one block's hidden states")
        mem += ")"
    if report.peak_child_memory_bytes:
        mem += f"; largest child process {_fmt_bytes(report.peak_child_memory_bytes)}"
    lines.append(mem)
    for label, path in (("saved model", report.out_dir), ("report", report.report_path),
                        ("plot", report.plot_path), ("sparsity map", report.map_path)):
        if path:
            lines.append(f"{label:<18} {path}")
    return "\n".join(lines)


def median_block_error_change(tuning: dict) -> Optional[float]:
    """The median over tuned blocks of ``error_after / error_before − 1`` (a report's
    ``block_tuning``; blocks with no error before are left out), or None."""
    changes = [b["error_after"] / b["error_before"] - 1.0 for b in tuning.get("blocks") or [] if b.get("error_before")]
    return statistics.median(changes) if changes else None


def _refit_line(layers: list) -> Optional[str]:
    """How ``reconstruct`` layers' kept weights were refitted: layers per method, CG's tolerance,
    and the layers whose CG stopped short (their objectives are upper bounds); None without refits."""
    fits = [r.refit for r in layers if r.refit]
    if not fits:
        return None
    exact = sum(f["method"] == "exact" for f in fits)
    cg = [f for f in fits if f["method"] == "cg"]
    parts = [f"exact in {exact} layers"] if exact else []
    if cg:
        tols = sorted({f["tolerance"] for f in cg})
        parts.append(f"CG to relative residual {'/'.join(f'{t:g}' for t in tols)} in {len(cg)} layers")
        short = [f for f in cg if not f["converged"]]
        if short:
            worst = max(f["max_relative_residual"] or 0.0 for f in short)
            parts.append(f"{len(short)} stopped short (residual up to {worst:.2g}): their objectives are "
                         f"their weights' own error, an upper bound")
    return f"refit              {'; '.join(parts)}"


def _block_tuning_line(tuning: dict) -> str:
    """``--block-tune``'s summary: blocks, epochs, and the median change of a block's output error."""
    change = median_block_error_change(tuning)
    median = "" if change is None else f", block output error median {100 * change:+.1f}%"
    target = ", toward the dense model's outputs" if tuning.get("target") == "dense" else ""
    return (f"block tuning       {len(tuning['blocks'])} blocks × {tuning['epochs']} epochs, lr {tuning['lr']:g}"
            f"{target}{median} (layer errors above: before tuning)")


def _structure_line(structure: dict) -> str:
    """``--structure``'s summary: channels per block before → after, decoder weights removed."""
    before, after = structure["intermediate_size"]
    line = (f"structure          {structure['kind']}:{structure['fraction']:g}: {before} → {after} channels "
            f"per block")
    params = structure.get("decoder_parameters")
    if params and params[0]:
        line += (f"; decoder weights {params[0] / 1e6:.1f}M → {params[1] / 1e6:.1f}M "
                 f"({100 * (params[1] / params[0] - 1):+.1f}%)")
    return line


def _elsa_lines(report: PruneReport) -> list[str]:
    """Whole-model ADMM's summary: sparsity, steps and tokens, loss, residual."""
    e = report.elsa
    opts = e["options"]
    hist = e.get("history") or []
    loss = f"; loss {hist[0]['loss']:.3f} → {hist[-1]['loss']:.3f}" if hist else ""
    warm = report.settings.get("init")
    lines = [f"sparsity reached   {100 * report.sparsity:.2f}% of target linear weights",
             f"elsa               {e['steps_done']}/{opts['steps']} steps, {e['tokens']} tokens{loss}"
             + (" (interrupted)" if e.get("interrupted") else "")]
    if opts.get("constrained", True):
        lines.append(f"                   λ {opts['lmda']:g} ({opts['lmda_schedule']}), residual ‖w − Proj(w)‖/‖w‖ "
                     f"{e['final_residual']:.3g} before the final projection; warm start "
                     f"{warm + ' (layer-wise)' if warm and warm != 'dense' else 'the dense model'}")
    else:
        lines.append("                   control: the same loop with no penalty and no projection (dense)")
    return lines


def _num(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if math.isfinite(x) else str(x)


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder, rename)."""
    from layerprune.problems import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def plot_layer_errors(layers: list, path) -> Optional[Path]:
    """Plot per-layer error reduction vs Wanda, ``1 − objective / wanda_objective``.

    One point per layer in pruning order, coloured by the layer's short name (``q_proj``,
    ``down_proj``, …). Written atomically; returns the path, or None if no layer has a
    Wanda reference. Drawn through matplotlib's object interface (a ``Figure`` on an Agg
    canvas): no backend is selected and no pyplot state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(i, r) for i, r in enumerate(layers) if r.reduction_vs_wanda is not None]
    if not pts:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = sorted({r.name.rsplit(".", 1)[-1] for _, r in pts})
    fig = Figure(figsize=(max(6.0, min(16.0, 0.06 * len(pts) + 4)), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for kind in kinds:
        xs = [i for i, r in pts if r.name.rsplit(".", 1)[-1] == kind]
        ys = [100 * r.reduction_vs_wanda for i, r in pts if r.name.rsplit(".", 1)[-1] == kind]
        ax.plot(xs, ys, "o", ms=4, label=kind)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("layer (pruning order)")
    ax.set_ylabel("error reduction vs Wanda (%)")
    solvers = sorted({r.solver for _, r in pts})
    ax.set_title(f"per-layer error reduction vs Wanda ({', '.join(solvers)}; {pts[0][1].objective_kind})")
    ax.legend(fontsize=7, ncol=min(4, len(kinds)), loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from layerprune.problems import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path
