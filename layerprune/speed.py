"""Inference speed, size on disk and peak memory of saved Hugging Face checkpoints.

Each checkpoint is loaded with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``,
no project code on the load path: this is also the check that a pruned checkpoint loads
anywhere) and measured for

- size (:func:`checkpoint_size`): bytes of the decoder blocks' tensors in the ``*.safetensors``
  files (read from their headers) and the files' total size;
- peak memory (:func:`peak_memory`): a child process per model loads it and runs one prefill
  and one generation; its peak resident set size (``ru_maxrss``) is reported with the peak it
  had after importing torch, transformers and the model's code, before any weight, and, on CUDA,
  ``torch.cuda.max_memory_allocated``;
- prefill: one forward of a ``batch × length`` block, ``use_cache=False``, logits of the last
  position only (``logits_to_keep=1``, as ``generate``'s own prefill): tokens/s = batch·length / s;
- generation: greedy ``generate`` of exactly ``new_tokens`` tokens (cache on) from a
  ``batch × prompt_len`` prompt: tokens/s = batch·new_tokens / s (the prompt's prefill included).

Inputs are random token ids from a seeded generator (speed does not depend on the text), the
same ids for every model. Timed runs are interleaved (:func:`schedule`): warm-up runs first
(discarded), then for each run, for each task, every model in the given order; each run's
speed-up against the first model pairs two measurements taken next to each other, so load
drift on a shared machine hits both alike.
"""
from __future__ import annotations

import json
import os
import statistics
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .speed_memory import PeakMemory, peak_memory

__all__ = ["SpeedError", "SpeedSettings", "Task", "Spread", "CheckpointSize", "PeakMemory",
           "Checkpoint", "TaskResult", "SpeedReport", "check_checkpoint", "checkpoint_size",
           "load_checkpoint", "schedule", "time_task", "peak_memory", "measure"]


class SpeedError(ValueError):
    """A checkpoint or a setting cannot be measured (one clear line)."""


@dataclass(frozen=True)
class Task:
    """One timed workload.

    ``kind`` is ``"prefill"`` (one forward of ``batch × length`` ids) or ``"generate"``
    (``new_tokens`` greedy tokens after a ``batch × length`` prompt).
    """

    kind: str
    batch: int
    length: int
    new_tokens: int = 0

    @property
    def name(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.length}"
        return f"generate b{self.batch} {self.new_tokens} new"

    @property
    def tokens(self) -> int:
        """Tokens one run produces: batch·length (prefill) or batch·new_tokens (generate)."""
        return self.batch * (self.length if self.kind == "prefill" else self.new_tokens)


@dataclass(frozen=True)
class SpeedSettings:
    """What to measure and how often (the CLI's flags); ``device`` None is CUDA when available,
    else CPU; ``threads`` None keeps torch's number of CPU threads."""

    runs: int = 5
    warmup: int = 1
    prefill_batch: int = 8
    prefill_len: int = 256
    generate_batches: tuple = (1, 8)
    prompt_len: int = 32
    new_tokens: int = 32
    device: Optional[str] = None
    dtype: str = "float32"
    seed: int = 0
    memory: bool = True
    threads: Optional[int] = None

    def check(self) -> None:
        """Raise :class:`SpeedError` (one line) on a count below its minimum or an unknown dtype."""
        minimum = {"runs": 1, "warmup": 0, "prefill_batch": 1, "prefill_len": 1, "prompt_len": 1,
                   "new_tokens": 1, "seed": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise SpeedError(f"--{name.replace('_', '-')} must be an integer ≥ {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise SpeedError(f"--threads must be an integer ≥ 1, got {self.threads!r}")
        if not self.generate_batches or any(not isinstance(b, int) or b < 1 for b in self.generate_batches):
            raise SpeedError(f"--generate-batches must be integers ≥ 1, got {self.generate_batches!r}")
        self.torch_dtype()

    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise SpeedError(f"--dtype: unknown dtype {self.dtype!r} (float32, bfloat16, float16)")
        return dt

    def tasks(self) -> list[Task]:
        """The prefill task, then one generation task per batch size."""
        return ([Task("prefill", self.prefill_batch, self.prefill_len)]
                + [Task("generate", b, self.prompt_len, self.new_tokens) for b in self.generate_batches])


@dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of some runs."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values) -> "Spread":
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class CheckpointSize:
    """Sizes read from the safetensors headers: the decoder blocks' tensors and every file."""

    decoder_params: int
    decoder_bytes: int
    safetensors_bytes: int


@dataclass
class Checkpoint:
    """One measured checkpoint: where, its shape, its sizes, its peak memory."""

    path: str
    shape: dict
    size: CheckpointSize
    memory: Optional[PeakMemory] = None


@dataclass
class TaskResult:
    """Timings of one task; ``seconds[m][r]``: model ``m``, run ``r``."""

    task: Task
    seconds: list

    def tokens_per_s(self, m: int) -> list[float]:
        return [self.task.tokens / s for s in self.seconds[m]]

    def speedups(self, m: int) -> list[float]:
        """Run by run: tokens/s of model ``m`` over that of model 0 in the same run."""
        return [a / b for a, b in zip(self.tokens_per_s(m), self.tokens_per_s(0))]


@dataclass
class SpeedReport:
    """Everything :func:`measure` found."""

    settings: SpeedSettings
    checkpoints: list
    tasks: list
    runs_done: int
    interrupted: bool = False
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        tasks = []
        for t in self.tasks:
            models = []
            for m in range(len(self.checkpoints)):
                entry = {"seconds": t.seconds[m], "tokens_per_s": t.tokens_per_s(m),
                         "tokens_per_s_spread": asdict(Spread.of(t.tokens_per_s(m)))}
                if m > 0:
                    entry["speedup_per_run"] = t.speedups(m)
                    entry["speedup_spread"] = asdict(Spread.of(t.speedups(m)))
                models.append(entry)
            tasks.append({"task": t.task.name, **asdict(t.task), "tokens_per_run": t.task.tokens,
                          "models": models})
        return {"settings": asdict(self.settings), "runs_done": self.runs_done,
                "interrupted": self.interrupted, "environment": self.environment,
                "checkpoints": [asdict(c) for c in self.checkpoints], "tasks": tasks}


# ---------------------------------------------------------------- checkpoints and sizes


def check_checkpoint(path) -> Path:
    """``path`` as a Hugging Face model directory with safetensors weights, else :class:`SpeedError`."""
    p = Path(path)
    if not p.exists():
        raise SpeedError(f"checkpoint {path}: no such directory")
    if not p.is_dir():
        raise SpeedError(f"checkpoint {path} is not a directory")
    if not (p / "config.json").is_file():
        raise SpeedError(f"checkpoint {path} holds no config.json (not a Hugging Face model directory)")
    if not sorted(p.glob("*.safetensors")):
        raise SpeedError(f"checkpoint {path} holds no .safetensors weights")
    return p


def read_config(path) -> dict:
    """The checkpoint's ``config.json`` as a dict (:class:`SpeedError` if it is not JSON)."""
    try:
        with open(Path(path) / "config.json", encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SpeedError(f"checkpoint {path}: cannot read config.json: {exc}") from None
    if not isinstance(config, dict):
        raise SpeedError(f"checkpoint {path}: config.json is not a JSON object")
    return config


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise SpeedError(f"cannot read the safetensors header of {file}: {exc}") from None
    header.pop("__metadata__", None)
    return header


def checkpoint_size(path, decoder_prefix: str) -> CheckpointSize:
    """Sizes on disk: the tensors named ``<decoder_prefix>.*`` and all ``*.safetensors`` files.

    Parameters
    ----------
    path : path
        A checkpoint directory (:func:`check_checkpoint`).
    decoder_prefix : str
        The attribute path of the decoder blocks' list, e.g. ``"model.layers"``
        (:func:`layerprune.models.decoder_layers`).
    """
    files = sorted(Path(path).glob("*.safetensors"))
    params = nbytes = 0
    for file in files:
        for name, meta in _safetensors_header(file).items():
            if name.startswith(decoder_prefix + "."):
                start, end = meta["data_offsets"]
                nbytes += end - start
                params += _numel(meta["shape"])
    if nbytes == 0:
        raise SpeedError(f"checkpoint {path}: no tensor named {decoder_prefix}.* in its safetensors files")
    return CheckpointSize(params, nbytes, sum(f.stat().st_size for f in files))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_checkpoint(path, dtype: torch.dtype, device: torch.device):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` on ``device``, in eval mode."""
    import transformers as tf

    from layerprune.models import _transformers_quiet

    try:
        with _transformers_quiet():
            model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any loader fault becomes one line
        first = str(exc).strip().splitlines()
        raise SpeedError(f"cannot load {path} with transformers: {type(exc).__name__}: "
                         f"{first[0] if first else ''}") from None
    return model.to(device).eval().requires_grad_(False)


def _shape(config: dict) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    return {k: config.get(k) for k in keys}


# ---------------------------------------------------------------- timing


def schedule(n_models: int, runs: int, n_tasks: int) -> list[tuple[int, int, int]]:
    """The timed measurements in order, as ``(run, task, model)``: for each run, for each task,
    every model in turn (A B A B …), so the runs of two models alternate."""
    return [(r, t, m) for r in range(runs) for t in range(n_tasks) for m in range(n_models)]


def make_inputs(task: Task, vocab_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(batch, length)`` random token ids in ``[0, vocab_size)`` from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (task.batch, task.length), generator=gen).to(device)


def _pad_id(model) -> int:
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_task(model, task: Task, ids: torch.Tensor) -> None:
    """Run ``task`` once on ``ids`` (no timing); a generation must give exactly ``new_tokens``."""
    with torch.inference_mode():
        if task.kind == "prefill":
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=task.new_tokens, min_new_tokens=task.new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=_pad_id(model))
    if out.shape != (task.batch, task.length + task.new_tokens):
        raise SpeedError(f"generate returned shape {tuple(out.shape)}, not "
                         f"{(task.batch, task.length + task.new_tokens)}")


def time_task(model, task: Task, ids: torch.Tensor) -> float:
    """Seconds of one :func:`run_task` (device synchronised before and after)."""
    sync(ids.device)
    start = time.perf_counter()
    run_task(model, task, ids)
    sync(ids.device)
    return time.perf_counter() - start


# ---------------------------------------------------------------- the whole measurement


def prepare(paths, settings: SpeedSettings) -> tuple[list[Path], list[dict], torch.device]:
    """Every check that needs no model: settings, device, directories, configs, lengths.

    Returns the directories, their configs and the device; raises :class:`SpeedError`
    (or :class:`~layerprune.settings.SettingError` for the device) with one line.
    """
    from layerprune.pipeline.structure import resolve_device

    settings.check()
    if not paths:
        raise SpeedError("give at least one checkpoint directory")
    device = resolve_device(settings.device)
    dirs = [check_checkpoint(p) for p in paths]
    configs = [read_config(p) for p in dirs]
    longest = max(settings.prefill_len, settings.prompt_len + settings.new_tokens)
    for p, config in zip(dirs, configs):
        limit = config.get("max_position_embeddings")
        if isinstance(limit, int) and longest > limit:
            raise SpeedError(f"checkpoint {p} takes at most {limit} positions; the longest run needs {longest}")
    return dirs, configs, device


def _environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "device": str(device), "loadavg_start": os.getloadavg()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def measure(paths, settings: SpeedSettings = SpeedSettings(),
            log: Callable[[str], None] = lambda s: None) -> SpeedReport:
    """Sizes, peak memory and interleaved timings of the checkpoints in ``paths``.

    The first checkpoint is the reference of the speed-ups. Ctrl-C during the timed runs
    stops after keeping the runs finished by every model (``interrupted=True``); with none
    finished it propagates.
    """
    dirs, configs, device = prepare(paths, settings)
    threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        return _measure(dirs, configs, device, settings, log)
    finally:
        torch.set_num_threads(threads)


def _measure(dirs, configs, device, settings: SpeedSettings, log) -> SpeedReport:
    """:func:`measure` after its checks: peak memory (children), loads, sizes, timed runs."""
    from layerprune.models import decoder_layers

    settings = replace(settings, device=str(device))
    memories = [_logged_memory(p, settings, log) if settings.memory else None for p in dirs]
    models = [load_checkpoint(p, settings.torch_dtype(), device) for p in dirs]
    report = SpeedReport(settings, [], [], 0, environment=_environment(device))
    for p, config, memory, model in zip(dirs, configs, memories, models):
        size = checkpoint_size(p, decoder_layers(model)[1])
        report.checkpoints.append(Checkpoint(str(p), _shape(config), size, memory))
    _timed_runs(models, settings, device, report, log)
    report.environment["loadavg_end"] = os.getloadavg()
    return report


def _logged_memory(path, settings: SpeedSettings, log) -> PeakMemory:
    memory = peak_memory(path, settings)
    log(f"{path}: peak RSS {memory.peak_rss / 2**20:.0f} MiB ({memory.model_rss / 2**20:.0f} above imports)")
    return memory


def _timed_runs(models, settings: SpeedSettings, device, report: SpeedReport, log) -> None:
    """Warm-up, then the interleaved :func:`schedule`, filling ``report.tasks`` run by run."""
    tasks = settings.tasks()
    vocab = min(m.config.vocab_size for m in models)
    inputs = [make_inputs(t, vocab, settings.seed, device) for t in tasks]
    for task, ids in zip(tasks, inputs):
        for model in models:
            for _ in range(settings.warmup):
                run_task(model, task, ids)
    report.tasks = [TaskResult(t, [[] for _ in models]) for t in tasks]
    try:
        for run, t, m in schedule(len(models), settings.runs, len(tasks)):
            report.tasks[t].seconds[m].append(time_task(models[m], tasks[t], inputs[t]))
            if t == len(tasks) - 1 and m == len(models) - 1:
                report.runs_done = run + 1
                log(_progress(report))
    except KeyboardInterrupt:
        if report.runs_done == 0:
            raise
        report.interrupted = True
        for result in report.tasks:  # only the runs every model finished
            result.seconds = [s[:report.runs_done] for s in result.seconds]


def _progress(report: SpeedReport) -> str:
    parts = []
    for t in report.tasks:
        rates = " / ".join(f"{v[-1]:.0f}" for v in (t.tokens_per_s(m) for m in range(len(t.seconds))))
        parts.append(f"{t.task.name}: {rates} tok/s")
    return f"run {report.runs_done}/{report.settings.runs}: " + "; ".join(parts)

