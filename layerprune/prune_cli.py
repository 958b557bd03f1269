"""``layerprune prune`` and ``layerprune eval``: the model pipeline on the command line.

Every expected fault (unknown model path, text too short, pattern that does not fit a layer,
unknown solver, bad override, …) ends with one clear line on stderr, exit code 2 and nothing
written. Ctrl-C during pruning exits 130, writing nothing.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Iterator, Optional

from layerprune.settings import add_flags, from_args, parse_overrides, parse_solver_options, split_list

__all__ = ["add_subcommands", "cmd_prune", "cmd_eval", "config_from_args", "evaluate", "parse_overrides",
           "parse_solver_options", "split_list"]

#: the settings of ``prune`` that ``eval`` takes too (same flags, same help)
EVAL_FLAGS = ("model", "eval", "seqlen", "eval_tokens", "device", "dtype")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"layerprune: error: {message}", file=sys.stderr)
    return code


def _expected_errors() -> tuple:
    """The exception types that mean bad input (one line, exit 2), imported lazily."""
    from layerprune.problems import PatternError, ProblemError
    from layerprune.settings import SettingError
    from layerprune.solvers import SolverError

    errors = [PatternError, ProblemError, SolverError, SettingError]
    for module, name in (("layerprune.models", "ModelError"), ("layerprune.data", "DataError")):
        try:
            mod = __import__(module, fromlist=[name])
            errors.append(getattr(mod, name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextlib.contextmanager
def _transformers_bars_off(off: bool = True) -> Iterator[None]:
    """No "Loading weights" bars from transformers inside (stderr keeps only what matters);
    as they were after."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        off = False
    was_on = off and hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- prune
def _add_prune(sub) -> None:
    from layerprune.pipeline.config import PruneConfig

    p = sub.add_parser(
        "prune", help="prune a causal LM layer by layer and report perplexity",
        description="Prune every linear of every decoder block (sequentially, block after block) "
                    "with a chosen backend; measure dense and pruned perplexity; save and report.")
    add_flags(p, PruneConfig)
    p.set_defaults(handler=cmd_prune)


def config_from_args(args):
    """A :class:`~layerprune.pipeline.PruneConfig` from parsed ``prune`` arguments."""
    from layerprune.pipeline.config import PruneConfig

    return from_args(PruneConfig, args)


def cmd_prune(args) -> int:
    """Handler of ``layerprune prune``; returns the exit code."""
    from layerprune.pipeline import PruningInterrupted, run

    expected = _expected_errors()
    try:
        with _transformers_bars_off(args.progress is False):
            config = config_from_args(args)
            report = run(config, log=lambda s: print(s, file=sys.stderr))
    except PruningInterrupted as exc:
        return _fail(f"interrupted after {len(exc.records)} of {exc.total} layers; nothing written",
                     EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing written", EXIT_INTERRUPTED)
    except expected as exc:
        return _fail(str(exc))
    print(report.format())
    return 0


# --------------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    from layerprune.pipeline.config import PruneConfig

    p = sub.add_parser("eval", help="measure the perplexity of a (saved) model",
                       description="Perplexity on non-overlapping windows of --seqlen tokens.")
    add_flags(p, PruneConfig, only=EVAL_FLAGS, required=("model",))
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=cmd_eval)


def evaluate(model_source: str, eval_sources: Optional[list] = None, *, seqlen: int = 256,
             eval_tokens: Optional[int] = 16384, device: Optional[str] = None,
             dtype: str = "float32") -> dict:
    """Perplexity of a model on each evaluation text, plus its measured sparsity.

    The settings, the device and the texts are checked (and the texts read) before the model
    is loaded; each text must hold one window of ``seqlen`` tokens.
    """
    from layerprune import data, models
    from layerprune.pipeline import perplexity, sparsity
    from layerprune.pipeline.config import PruneConfig, _dtype
    from layerprune.pipeline.structure import resolve_device
    from layerprune.settings import SettingError, check_values

    check_values(PruneConfig(model=model_source, eval=eval_sources, seqlen=seqlen, eval_tokens=eval_tokens,
                             device=device, dtype=dtype))
    if eval_tokens is not None and eval_tokens < seqlen:
        raise SettingError(f"--eval-tokens {eval_tokens} is less than one window of --seqlen {seqlen} tokens")
    dev = resolve_device(device)
    srcs = eval_sources or list(data.DEFAULT_EVALUATION)
    texts = {data.text_name(src): data.load_text(src) for src in srcs}
    model, tokenizer = models.load_model(model_source, dtype=_dtype(dtype), device="cpu")
    ppl = {}
    for name, text in texts.items():
        ids = data.eval_tokens(tokenizer, text, max_tokens=eval_tokens)
        if ids.numel() < seqlen:
            raise data.DataError(f"evaluation text {name!r} has {ids.numel()} tokens: fewer than one "
                                 f"window of --seqlen {seqlen}")
        ppl[name] = perplexity(model, ids, seqlen, dev)
    return {"model": str(model_source), "perplexity": ppl, "sparsity": sparsity(model),
            "seqlen": seqlen, "eval_tokens": eval_tokens}


def cmd_eval(args) -> int:
    """Handler of ``layerprune eval``; returns the exit code."""
    expected = _expected_errors()
    try:
        with _transformers_bars_off():
            result = evaluate(args.model, split_list(args.eval), seqlen=args.seqlen,
                              eval_tokens=args.eval_tokens, device=args.device, dtype=args.dtype)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except expected as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {result['model']}  sparsity {100 * result['sparsity']:.2f}%  "
          f"windows of {result['seqlen']} tokens")
    for name, v in result["perplexity"].items():
        print(f"{name:<20} {v:>12.3f}")
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``prune`` and ``eval`` on the ``layerprune`` sub-command parser."""
    _add_prune(subparsers)
    _add_eval(subparsers)
