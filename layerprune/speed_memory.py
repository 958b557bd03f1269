"""Peak memory of one checkpoint, measured in a child Python process (:mod:`layerprune.speed`).

The child imports torch, transformers and the checkpoint's modelling code, notes its peak
resident set size (``ru_maxrss``), then loads the weights with plain ``transformers`` and runs
one prefill and the largest generation of the settings; it prints its peak memory as JSON.
A fresh process per model keeps one model's allocations out of another's figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["PeakMemory", "peak_memory"]


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of a child process that loaded one model and ran one prefill and one generation.

    ``peak_rss`` is its peak resident set size (``ru_maxrss``), ``import_rss`` the peak after
    importing torch, transformers and the model's modelling code, before any weight;
    ``device_peak`` is ``torch.cuda.max_memory_allocated`` on CUDA, else None. Bytes.
    """

    peak_rss: int
    import_rss: int
    device_peak: Optional[int] = None

    @property
    def model_rss(self) -> int:
        """The peak resident set size above what the imports alone took (weights, activations,
        the allocator's and the first calls' overheads)."""
        return self.peak_rss - self.import_rss


def peak_memory(path, settings) -> PeakMemory:
    """:class:`PeakMemory` of one checkpoint under ``settings`` (a
    :class:`~layerprune.speed.SpeedSettings` with a device name), from a child Python process.

    Raises
    ------
    SpeedError
        If the child fails (its last stderr line).
    """
    from layerprune.speed import SpeedError

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    arg = json.dumps({"path": str(path), "settings": asdict(settings)})
    proc = subprocess.run([sys.executable, "-m", "layerprune.speed_memory", arg], capture_output=True,
                          text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise SpeedError(f"the memory measurement of {path} failed: "
                         f"{err[-1] if err else f'exit status {proc.returncode}'}")
    return PeakMemory(**json.loads(lines[-1]))


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _import_model_code(path) -> None:
    """Import the modelling code ``from_pretrained`` will use for ``path`` (no weights), so
    that the baseline of :class:`PeakMemory` holds the code and not only ``transformers``."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(str(path))
        tf.AutoModelForCausalLM._model_mapping[type(config)]  # the lazy import of its module
    except Exception:  # noqa: BLE001 - the load proper reports what is wrong
        pass


def _memory_child(arg: str) -> None:
    """The child of :func:`peak_memory`: load, one prefill, the largest generation; print JSON."""
    from layerprune.speed import SpeedSettings, load_checkpoint, make_inputs, run_task, sync

    spec = json.loads(arg)
    spec["settings"]["generate_batches"] = tuple(spec["settings"]["generate_batches"])
    settings = SpeedSettings(**spec["settings"])
    device = torch.device(settings.device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    _import_model_code(spec["path"])
    import_rss = _max_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = load_checkpoint(spec["path"], settings.torch_dtype(), device)
    tasks = settings.tasks()
    largest = max(tasks[1:], key=lambda t: t.batch)
    for task in (tasks[0], largest):
        run_task(model, task, make_inputs(task, model.config.vocab_size, settings.seed, device))
    sync(device)
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(json.dumps({"peak_rss": _max_rss(), "import_rss": import_rss, "device_peak": device_peak}))


if __name__ == "__main__":
    _memory_child(sys.argv[1])
