"""The whole ``layerprune prune`` job: check, load, calibrate, measure dense, prune (layer-wise,
structured, or whole-model ADMM after an optional layer-wise warm start), measure pruned, save,
report."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from layerprune import data

from ..report import MODEL_COPIES, PruneReport, plot_layer_errors, write_json_atomic
from .allocate import (MAP_FILE, Allocation, knapsack_allocation, owl_allocation, sparsity_map_json,
                       uniform_allocation)
from .block_tune import BlockTuning
from .channels import ChannelPruning, parse_structure, prune_mlp_channels
from .config import (Checked, PruneConfig, check_against_model, check_before_loading, layerwise, target_ridge,
                     with_defaults)
from .elsa import DENSE_START, ELSA
from .elsa_stage import ElsaStage
from .loop import prune_model
from .measure import perplexity, release_memory, sparsity
__all__ = ["PruneConfig", "run"]


def run(config: PruneConfig, *, log: Callable[[str], Any] = print) -> PruneReport:
    """The whole job: check, load, calibrate, measure dense, prune, measure pruned, save, report.

    Every check that needs no model runs first (settings, device, solvers with their options,
    output paths, texts), then those that need it, before any long step. Nothing is written
    unless every step succeeded, and then everything: the model directory (atomically, by
    ``models.save_pruned``, with the report and masks), the report JSON and the plot
    ``layer_errors.png`` next to it. The process's torch thread count is as it was after.
    """
    from layerprune import models

    clock = _Clock()
    config = with_defaults(config)
    with _threads_kept():
        with clock("data"):
            checked = check_before_loading(config)
        if checked.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(checked.device)
        with clock("load"):
            model, tokenizer = models.load_model(config.model, dtype=checked.dtype, device="cpu",
                                                 cache_dir=config.cache_dir)
            release_memory()  # loader temporaries
            base = _base_bytes(model)
        plan = check_against_model(model, config, checked.sparsity_map)
        with clock("data"):
            calib_tokens, calib_ids, evals = _tokenize(tokenizer, checked, config)
        stage = ElsaStage.prepare(calib_tokens, plan, config, log) if config.solver == ELSA else None
        del calib_tokens
        release_memory()  # the tokenized calibration text
        with clock("dense_eval"):
            dense = _perplexities(model, evals, config.seqlen, checked.device)
        for name, v in dense.items():
            log(f"dense perplexity {name}: {v:.3f}")
        allocation = None
        if plan is not None:
            with clock("allocate"):
                allocation = _allocate(model, calib_ids, checked, config, plan.names)
        if allocation is not None and allocation.method != "uniform":
            values = list(allocation.fractions.values())
            log(f"allocation {allocation.method}: layer sparsity {min(values):.4f} … {max(values):.4f}")
        records, elsa = [], None
        tuning = _block_tuning(config)
        with clock("prune"):
            if config.structure is not None:
                channels = _prune_channels(model, calib_ids, checked, config)
                records = channels.records
            elif config.solver != ELSA or config.init != DENSE_START:
                records = _prune(model, calib_ids, checked, layerwise(config), allocation, tuning)
        if stage is not None:
            with clock("elsa"):
                elsa = stage.run(model, plan, allocation, config, checked.device, log)
        with clock("pruned_eval"):
            pruned = _perplexities(model, evals, config.seqlen, checked.device)
        report = _report(model, config, checked, calib_ids, evals, dense, pruned, records, clock, base)
        report.allocation = None if allocation is None else allocation.to_json()
        report.block_tuning = None if tuning is None else tuning.to_json()
        if config.structure is not None:
            report.structure = channels.to_json(parse_structure(config.structure))
        masks = None if config.structure is not None else {r.name: r.packed_mask for r in records}
        if elsa is not None:
            report.elsa = elsa.to_json()
            masks = elsa.masks or None
        _write_outputs(report, model, tokenizer, config, clock, masks)
    return report


class _Clock:
    """Seconds per step (``timings`` of the report), and since the job started."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - t

    def total(self) -> float:
        return time.perf_counter() - self.start


@contextlib.contextmanager
def _threads_kept() -> Iterator[None]:
    """The torch intra-op thread count as it was before, whatever a step set."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _tokenize(tokenizer, checked: Checked,
              config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The calibration text's tokens, (T,), its calibration windows, (nsamples, seqlen), and each
    evaluation text's first tokens, (1, T) with at least one window of ``seqlen``."""
    calib_tokens = data.tokenize(tokenizer, checked.calib_text)
    calib_ids = data.calibration_windows(calib_tokens, config.nsamples, config.seqlen, config.seed)
    evals = {}
    for name, text in checked.eval_texts.items():
        ids = data.eval_tokens(tokenizer, text, max_tokens=config.eval_tokens)
        if ids.numel() < config.seqlen:
            raise data.DataError(f"evaluation text {name!r} has {ids.numel()} tokens: fewer than one "
                                 f"window of --seqlen {config.seqlen}")
        evals[name] = ids
    return calib_tokens, calib_ids, evals


def _perplexities(model: nn.Module, evals: dict[str, torch.Tensor], seqlen: int,
                  device: torch.device) -> dict[str, float]:
    return {name: perplexity(model, ids, seqlen, device) for name, ids in evals.items()}


def _allocate(model: nn.Module, calib_ids: torch.Tensor, checked: Checked, config: PruneConfig,
              names: list[str]) -> Optional[Allocation]:
    """Each layer's pruned fraction (every layer of the plan named), or None for a pattern
    that gives none (``nm:N:M``, counts) with no allocation asked for."""
    if config.allocate == "owl":
        owl = owl_allocation(model, calib_ids, config.pattern, m=config.owl_m, lam=config.owl_lambda,
                             device=checked.device)
        owl.fractions = {name: owl.fractions.get(name, owl.target) for name in names}
        return owl
    if config.allocate == "knapsack":
        knap = knapsack_allocation(model, calib_ids, config.pattern, norm=config.knapsack_norm, device=checked.device)
        knap.fractions = {name: knap.fractions.get(name, knap.target) for name in names}
        return knap
    return uniform_allocation(names, config.pattern, checked.sparsity_map)


def _block_tuning(config: PruneConfig) -> Optional[BlockTuning]:
    """``--block-tune``'s settings (its log fills during the prune), or None when off."""
    if not config.block_tune:
        return None
    given = {"lr": config.block_tune_lr, "batch": config.block_tune_batch, "target": config.block_tune_target}
    return BlockTuning(config.block_tune, seed=config.seed, **{k: v for k, v in given.items() if v is not None})


def _prune(model: nn.Module, calib_ids: torch.Tensor, checked: Checked, config: PruneConfig,
           allocation: Optional[Allocation], tuning: Optional[BlockTuning] = None) -> list:
    own = allocation is not None and allocation.method != "uniform"
    return prune_model(model, calib_ids, solver=config.solver, pattern=config.pattern,
                       objective=config.objective, overrides=config.overrides,
                       solver_options=config.solver_options, init=config.init, params=checked.params,
                       device=checked.device, sequential_order=config.sequential_order,
                       prune_lm_head=config.prune_lm_head, progress=config.progress, target=config.target,
                       sparsity_map=allocation.fractions if own else None, target_ridge=target_ridge(config),
                       reference=config.reference, block_tuning=tuning)


def _prune_channels(model: nn.Module, calib_ids: torch.Tensor, checked: Checked, config: PruneConfig) -> ChannelPruning:
    return prune_mlp_channels(model, calib_ids, config.structure, solver=config.solver, objective=config.objective,
                              solver_options=config.solver_options, init=config.init, params=checked.params,
                              device=checked.device, progress=config.progress, reference=config.reference)


def _report(model: nn.Module, config: PruneConfig, checked: Checked, calib_ids: torch.Tensor,
            evals: dict[str, torch.Tensor], dense: dict, pruned: dict, records: list,
            clock: _Clock, base: Optional[int]) -> PruneReport:
    from layerprune import models

    device = checked.device
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "force")}
    settings.update(calib=data.text_name(checked.calib_source), calib_source=str(checked.calib_source),
                    eval=list(evals), eval_sources=[str(s) for s in checked.eval_sources],
                    eval_tokens_used={k: int(v.numel()) for k, v in evals.items()},
                    calibration_tokens=int(calib_ids.numel()), device=str(device), versions=_versions(),
                    target_ridge=target_ridge(config))
    size = models.model_size_bytes(model)
    return PruneReport(
        dense_perplexity=dense, perplexity=pruned,
        sparsity=sparsity(model, include_lm_head=config.prune_lm_head),
        seconds=clock.total(), peak_memory_bytes=_peak_rss_bytes(), layers=records, settings=settings,
        timings=clock.timings, model_size_bytes=size,
        memory_base_bytes=base, memory_target_bytes=_memory_target(size, base, model, calib_ids),
        peak_device_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        peak_child_memory_bytes=_peak_rss_bytes(resource.RUSAGE_CHILDREN) or None,
    )


# ---------------------------------------------------------------------------- outputs
def _write_outputs(report: PruneReport, model: nn.Module, tokenizer, config: PruneConfig, clock: _Clock,
                   masks: Optional[dict]) -> None:
    """The model directory, the report JSON and its plot: all written, or none.

    The plot and the report's file are made first under temporary names beside their paths,
    then the model directory is saved (atomically), then the report is written into its
    temporary file and both are renamed into place. On a failure the temporary files go, and
    so does a model directory this call created (one replaced under ``force`` stays replaced).
    """
    from layerprune import models

    started = time.perf_counter()
    staged = _Staged()
    new_out = None if config.out is None or Path(config.out).expanduser().exists() else Path(config.out).expanduser()
    try:
        png = _plot_png(report) if config.out is not None or config.report is not None else None
        plot = _stage_plot(png, config, staged)
        map_path = _stage_map(report, config, staged)
        report_tmp = staged.file(Path(config.report).expanduser()) if config.report is not None else None
        if config.out is not None:
            report.out_dir = str(config.out)
            models.save_pruned(model, tokenizer, config.out, masks=masks,
                               force=config.force, extra_files=_model_extras(report, png))
        if report_tmp is not None:
            report.report_path, report.plot_path, report.map_path = str(config.report), plot, map_path
        clock.timings["save"] = time.perf_counter() - started
        report.seconds = clock.total()
        if report_tmp is not None:
            write_json_atomic(report_tmp, report.to_json())
        staged.publish()
    except BaseException:
        if new_out is not None and new_out.is_dir():
            shutil.rmtree(new_out, ignore_errors=True)
        raise
    finally:
        staged.discard()


def _plot_png(report: PruneReport) -> Optional[bytes]:
    """``layer_errors.png`` drawn once, as bytes (None without layers to plot)."""
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_layer_errors(report.layers, Path(tmp) / "layer_errors.png")
        return None if png is None else png.read_bytes()


def _stage_plot(png: Optional[bytes], config: PruneConfig, staged: "_Staged") -> Optional[str]:
    """Write the plot beside the report under a temporary name; its final path, or None
    without a report or without a plot."""
    if config.report is None or png is None:
        return None
    staged.file(Path(config.report).expanduser().parent / "layer_errors.png").write_bytes(png)
    return str(Path(config.report).parent / "layer_errors.png")


def _stage_map(report: PruneReport, config: PruneConfig, staged: "_Staged") -> Optional[str]:
    """Write the sparsity map beside the report under a temporary name; its final path, or
    None without a report or without a map."""
    text = _map_text(report)
    if config.report is None or text is None:
        return None
    staged.file(Path(config.report).expanduser().parent / MAP_FILE).write_text(text)
    return str(Path(config.report).parent / MAP_FILE)


def _map_text(report: PruneReport) -> Optional[str]:
    """The sparsity map file's text (every layer's pruned fraction), None without one."""
    if not report.allocation:
        return None
    return sparsity_map_json(report.allocation["fractions"])


def _model_extras(report: PruneReport, png: Optional[bytes]) -> dict[str, bytes]:
    """The report, its plot and the sparsity map, as saved inside the model directory."""
    extra = {"prune_report.json": json.dumps(report.to_json(), indent=2) + "\n"}
    if png is not None:
        extra["layer_errors.png"] = png
    map_text = _map_text(report)
    if map_text is not None:
        extra[MAP_FILE] = map_text
    return extra


class _Staged:
    """Files written under temporary names beside their paths, renamed onto them together."""

    def __init__(self):
        self.files: list[tuple[Path, Path]] = []   # (temporary, final)
        self.made: list[Path] = []                 # directories created for them, outermost first

    def file(self, final: Path) -> Path:
        """A new empty temporary file in ``final``'s directory (created if missing)."""
        missing = [d for d in (final.parent, *final.parent.parents) if not d.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)
        self.made.extend(reversed(missing))
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        self.files.append((Path(tmp), final))
        return Path(tmp)

    def publish(self) -> None:
        for tmp, final in self.files:
            os.replace(tmp, final)
        self.files, self.made = [], []

    def discard(self) -> None:
        """Remove what was not published (temporary files, then the directories made for them)."""
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for d in reversed(self.made):
            with contextlib.suppress(OSError):
                d.rmdir()
        self.files, self.made = [], []


# ---------------------------------------------------------------------------- measurements
def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size of this process, or with ``RUSAGE_CHILDREN`` of its largest
    finished child (Linux: ru_maxrss is in KiB; macOS: bytes)."""
    peak = int(resource.getrusage(who).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_bytes() -> Optional[int]:
    """This process's resident set size now (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _base_bytes(model: nn.Module) -> Optional[int]:
    """The process's resident memory just after loading less the model's own weights: Python,
    torch, transformers with the model's code, the tokenizer and the texts. It does not scale
    with the model's dtype (about 410 MiB here)."""
    from layerprune import models

    rss = _rss_bytes()
    return None if rss is None else max(0, rss - models.model_size_bytes(model))


def _memory_target(model_bytes: Optional[int], base_bytes: Optional[int], model: nn.Module,
                   calib_ids: torch.Tensor) -> Optional[int]:
    """The job's memory budget: the base measured at load (:func:`_base_bytes`) plus
    :data:`MODEL_COPIES` × the model's size plus one block's input and output hidden states
    (calibration set)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not model_bytes or not hidden or base_bytes is None:
        return None
    elem = next(model.parameters()).element_size()
    return int(base_bytes + MODEL_COPIES * model_bytes + 2 * calib_ids.numel() * int(hidden) * elem)


def _versions() -> dict:
    import transformers

    import layerprune
    return {"layerprune": getattr(layerprune, "__version__", None), "torch": torch.__version__,
            "transformers": transformers.__version__}
