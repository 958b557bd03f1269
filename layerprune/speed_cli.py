"""``layerprune speed``: speed, size and peak memory of saved checkpoints (:mod:`layerprune.speed`).

Bad input (missing directory, not a model directory, a count below its minimum, an unknown
device, an unwritable ``--json``) ends with one line on stderr, exit code 2 and nothing
written, before any model is loaded. Ctrl-C during the timed runs keeps the runs every model
finished: they are printed and written, and the exit code is 130.
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_subcommand", "cmd_speed", "format_report"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
MIB = 2 ** 20


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"layerprune: error: {message}", file=sys.stderr)
    return code


def _block(text: str) -> tuple[int, int]:
    """``"8x256"`` → ``(8, 256)``."""
    try:
        batch, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH such as 8x256, got {text!r}") from None
    return batch, length


def _int_list(text: str) -> tuple[int, ...]:
    """``"1,8"`` → ``(1, 8)``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas such as 1,8, got {text!r}") from None


def add_subcommand(sub) -> None:
    """Register ``speed`` on the ``layerprune`` sub-command parser."""
    p = sub.add_parser(
        "speed", help="measure the speed, size and peak memory of saved Hugging Face checkpoints",
        description="Load each checkpoint with plain transformers; report its size on disk, its peak "
                    "memory (a child process per model), prefill and generation tokens/s over "
                    "interleaved runs (median, min, max) and speed-ups against the first checkpoint.")
    p.add_argument("checkpoints", nargs="+", metavar="DIR", help="Hugging Face model directories; the first is the reference")
    p.add_argument("--runs", type=int, default=5, help="timed runs per model and task (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs per model and task first (default 1)")
    p.add_argument("--prefill", type=_block, default=(8, 256), metavar="BxL",
                   help="prefill block: batch x tokens (default 8x256)")
    p.add_argument("--generate-batches", type=_int_list, default=(1, 8), metavar="B[,B…]",
                   help="generation batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before generating (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default 32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="weights' dtype when loaded (default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 avoids the threads' spin-waits on a busy machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory child processes")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full results as JSON (atomically)")
    p.set_defaults(handler=cmd_speed)


def _settings(args):
    from layerprune.speed import SpeedSettings

    return SpeedSettings(runs=args.runs, warmup=args.warmup, prefill_batch=args.prefill[0],
                         prefill_len=args.prefill[1], generate_batches=args.generate_batches,
                         prompt_len=args.prompt_len, new_tokens=args.new_tokens, device=args.device,
                         dtype=args.dtype, seed=args.seed, memory=args.memory, threads=args.threads)


def cmd_speed(args) -> int:
    """Handler of ``layerprune speed``; returns the exit code."""
    from layerprune.problems import ProblemError, atomic_write, check_writable
    from layerprune.prune_cli import _transformers_bars_off
    from layerprune.settings import SettingError
    from layerprune.speed import SpeedError, measure

    settings = _settings(args)
    try:
        if args.json is not None:
            check_writable(args.json, what="--json")
        with _transformers_bars_off():
            report = measure(args.checkpoints, settings, log=lambda s: print(s, file=sys.stderr))
    except KeyboardInterrupt:
        return _fail("interrupted before any run finished; nothing written", EXIT_INTERRUPTED)
    except (SpeedError, SettingError, ProblemError) as exc:
        return _fail(str(exc))
    print(format_report(report))
    if args.json is not None:
        atomic_write(args.json, lambda tmp: _write_json(tmp, report.to_json()))
    if report.interrupted:
        return _fail(f"interrupted after {report.runs_done} of {settings.runs} runs; those are reported",
                     EXIT_INTERRUPTED)
    return 0


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def _spread(values, fmt: str = "{:.1f}") -> str:
    from layerprune.speed import Spread

    s = Spread.of(values)
    return f"{fmt.format(s.median)} [{fmt.format(s.low)}, {fmt.format(s.high)}]"


def format_report(report) -> str:
    """Sizes and memory per checkpoint, then tokens/s (median [min, max]) and speed-ups per task."""
    lines = [f"{'#':<2} {'intermediate':>12} {'decoder MiB':>11} {'files MiB':>9} {'peak RSS MiB':>12} "
             f"{'above imports':>13}  checkpoint"]
    for i, c in enumerate(report.checkpoints):
        mem = c.memory
        rss = f"{mem.peak_rss / MIB:>12.1f} {mem.model_rss / MIB:>13.1f}" if mem else f"{'—':>12} {'—':>13}"
        lines.append(f"{i:<2} {str(c.shape.get('intermediate_size')):>12} {c.size.decoder_bytes / MIB:>11.2f} "
                     f"{c.size.safetensors_bytes / MIB:>9.2f} {rss}  {c.path}")
        if mem is not None and mem.device_peak is not None:
            lines.append(f"{'':<2} device peak {mem.device_peak / MIB:.1f} MiB (torch.cuda.max_memory_allocated)")
    env = report.environment
    lines.append(f"\ninterleaved runs: {report.runs_done}, on {env.get('device')} ({env.get('threads')} threads), "
                 f"load average {_load(env.get('loadavg_start'))} → {_load(env.get('loadavg_end'))}")
    lines.append(f"{'task':<24} {'#':<2} {'tokens/s median [min, max]':>30} {'speed-up vs #0 median [min, max]':>34}")
    for t in report.tasks:
        for m in range(len(t.seconds)):
            ratio = _spread(t.speedups(m), "{:.3f}") if m > 0 else ""
            lines.append(f"{t.task.name:<24} {m:<2} {_spread(t.tokens_per_s(m)):>30} {ratio:>34}")
    return "\n".join(lines)


def _load(avg) -> str:
    return "—" if avg is None else "/".join(f"{v:.2f}" for v in avg)
