"""The whole ``layerprune prune`` job: load, calibrate, measure dense, prune, measure pruned,
save, report."""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from layerprune.problems import ProblemError
from layerprune.solvers import Params, make_solver

from ..report import PruneReport, plot_layer_errors, write_json_atomic
from .loop import prune_model
from .measure import perplexity, release_memory, sparsity
from .plan import _plan
from .structure import find_blocks

__all__ = ["PruneConfig", "run"]


@dataclass
class PruneConfig:
    """Settings of one ``layerprune prune`` job (the CLI's flags)."""

    model: str = "smollm2"
    solver: str = "sparseswaps"
    pattern: str = "per-row:0.5"
    objective: str = "mask"
    nsamples: int = 64
    seqlen: int = 256
    calib: Optional[str] = None              # None: data's default calibration text
    eval: Optional[list] = None              # None: data's default evaluation texts
    eval_tokens: Optional[int] = 16384       # evaluation tokens per text (None: all)
    out: Optional[str] = None
    force: bool = False
    report: Optional[str] = None
    init: Optional[str] = None
    device: Optional[str] = None             # None: cuda if available, else cpu
    time_limit_per_layer: Optional[float] = None
    max_iter: Optional[int] = None           # iteration cap per layer (Params.max_iter)
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    sequential_order: bool = False
    prune_lm_head: bool = False
    solver_options: dict = field(default_factory=dict)
    dtype: str = "float32"
    progress: bool = True
    cache_dir: Optional[str] = None


def _dtype(name: str) -> torch.dtype:
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise ProblemError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return dt


def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size of this process, or with ``RUSAGE_CHILDREN`` of its largest
    finished child (Linux: ru_maxrss is in KiB; macOS: bytes)."""
    peak = int(resource.getrusage(who).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def run(config: PruneConfig, *, log: Callable[[str], Any] = print) -> PruneReport:
    """The whole job: load, calibrate, measure dense, prune, measure pruned, save, report.

    Nothing is written unless every step succeeded: the model directory atomically by
    ``models.save_pruned`` (with the report and masks), the report JSON atomically, and the
    plot ``layer_errors.png`` next to the report.
    """
    from layerprune import data, models

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if config.out is not None and Path(config.out).exists() and not config.force:
        raise models.ModelError(f"output directory {config.out} exists (use --force to overwrite)")
    if config.nsamples < 1 or config.seqlen < 2:
        raise data.DataError(f"need nsamples ≥ 1 and seqlen ≥ 2, got {config.nsamples} × {config.seqlen}")
    dtype = _dtype(config.dtype)
    device = torch.device(config.device) if config.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calib_src = config.calib if config.calib is not None else \
        getattr(data, "DEFAULT_CALIBRATION", "austen-calib")
    eval_srcs = list(config.eval) if config.eval else \
        list(getattr(data, "DEFAULT_EVALUATION", ("persuasion", "mobydick")))
    params = Params(time_limit=config.time_limit_per_layer, max_iter=config.max_iter, seed=config.seed)

    t = time.perf_counter()
    model, tokenizer = models.load_model(config.model, dtype=dtype, device="cpu", cache_dir=config.cache_dir)
    timings["load"] = time.perf_counter() - t
    release_memory()  # loader temporaries
    # validate pattern/solvers/overrides against the model before the costly steps
    blocks, path = find_blocks(model)
    _plan(model, blocks, path, config.pattern, config.objective, config.solver,
          dict(config.overrides or {}), config.init, config.prune_lm_head)
    make_solver(config.solver, **(config.solver_options or {}))  # unknown options: fail now

    t = time.perf_counter()
    calib_name = data.text_name(calib_src)
    calib_ids = data.calibration_batch(tokenizer, data.load_text(calib_src, cache_dir=config.cache_dir),
                                       config.nsamples, config.seqlen, config.seed)
    evals = {}
    for src in eval_srcs:
        name = data.text_name(src)
        overlap = getattr(data, "sources_overlap", lambda a, b: data.text_name(a) == data.text_name(b))
        if overlap(calib_src, src):
            raise data.DataError(f"evaluation text {name!r} overlaps the calibration text {calib_name!r}")
        evals[name] = data.eval_tokens(tokenizer, data.load_text(src, cache_dir=config.cache_dir),
                                       max_tokens=config.eval_tokens)
    timings["data"] = time.perf_counter() - t
    release_memory()  # the tokenized calibration text

    t = time.perf_counter()
    dense = {name: perplexity(model, ids, config.seqlen, device) for name, ids in evals.items()}
    timings["dense_eval"] = time.perf_counter() - t
    for name, v in dense.items():
        log(f"dense perplexity {name}: {v:.3f}")

    t = time.perf_counter()
    records = prune_model(model, calib_ids, solver=config.solver, pattern=config.pattern,
                          objective=config.objective, overrides=config.overrides,
                          solver_options=config.solver_options, init=config.init, params=params,
                          device=device, sequential_order=config.sequential_order,
                          prune_lm_head=config.prune_lm_head, progress=config.progress)
    timings["prune"] = time.perf_counter() - t

    t = time.perf_counter()
    pruned = {name: perplexity(model, ids, config.seqlen, device) for name, ids in evals.items()}
    timings["pruned_eval"] = time.perf_counter() - t

    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "force")}
    settings.update(calib=calib_name, calib_source=str(calib_src), eval=list(evals),
                    eval_sources=[str(s) for s in eval_srcs],
                    eval_tokens_used={k: int(v.numel()) for k, v in evals.items()},
                    calibration_tokens=int(calib_ids.numel()), device=str(device),
                    versions=_versions())
    size = _size(models, model)
    report = PruneReport(
        dense_perplexity=dense, perplexity=pruned,
        sparsity=sparsity(model, include_lm_head=config.prune_lm_head),
        seconds=0.0, peak_memory_bytes=0, layers=records, settings=settings, timings=timings,
        model_size_bytes=size,
        memory_target_bytes=_memory_target(size, model, calib_ids),
        peak_device_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    )

    t = time.perf_counter()
    report.peak_memory_bytes = _peak_rss_bytes()
    report.peak_child_memory_bytes = _peak_rss_bytes(resource.RUSAGE_CHILDREN) or None
    report.seconds = time.perf_counter() - t0
    if config.out is not None:
        report.out_dir = str(config.out)
        extra = {"prune_report.json": json.dumps(report.to_json(), indent=2) + "\n"}
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_layer_errors(records, Path(tmp) / "layer_errors.png")
            if png is not None:
                extra["layer_errors.png"] = png.read_bytes()
        masks = {r.name: r.packed_mask for r in records}
        models.save_pruned(model, tokenizer, config.out, masks=masks, force=config.force,
                           extra_files=extra)
    if config.report is not None:
        report.report_path = str(config.report)
        plot = plot_layer_errors(records, Path(config.report).parent / "layer_errors.png")
        report.plot_path = None if plot is None else str(plot)
    timings["save"] = time.perf_counter() - t
    report.seconds = time.perf_counter() - t0
    if config.report is not None:
        write_json_atomic(config.report, report.to_json())
    return report


def _memory_target(model_bytes: Optional[int], model: nn.Module, calib_ids: torch.Tensor) -> Optional[int]:
    """3 × the model's size plus one block's input and output hidden states (calibration set)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not model_bytes or not hidden:
        return None
    elem = next(model.parameters()).element_size()
    return int(3 * model_bytes + 2 * calib_ids.numel() * int(hidden) * elem)


def _size(models, model) -> Optional[int]:
    fn = getattr(models, "model_size_bytes", None)
    if fn is None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return int(fn(model))


def _versions() -> dict:
    import transformers

    import layerprune
    return {"layerprune": getattr(layerprune, "__version__", None), "torch": torch.__version__,
            "transformers": transformers.__version__}
