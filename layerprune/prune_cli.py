"""``layerprune prune`` and ``layerprune eval``: the model pipeline on the command line.

Every expected fault (unknown model path, text too short, pattern that does not fit a layer,
unknown solver, bad override, …) ends with one clear line on stderr, exit code 2 and nothing
written. Ctrl-C during pruning exits 130, writing nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

__all__ = ["add_subcommands", "cmd_prune", "cmd_eval", "parse_overrides", "split_list"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"layerprune: error: {message}", file=sys.stderr)
    return code


def _expected_errors() -> tuple:
    """The exception types that mean bad input (one line, exit 2), imported lazily."""
    from layerprune.problems import PatternError, ProblemError
    from layerprune.solvers import SolverError

    errors = [PatternError, ProblemError, SolverError]
    for module, name in (("layerprune.models", "ModelError"), ("layerprune.data", "DataError")):
        try:
            mod = __import__(module, fromlist=[name])
            errors.append(getattr(mod, name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def split_list(values: Optional[list]) -> Optional[list]:
    """``--eval a --eval b,c`` → ``[a, b, c]`` (None if not given)."""
    if not values:
        return None
    out = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out or None


def parse_overrides(values: Optional[list]) -> dict:
    """``--override down_proj=sparsegpt`` (repeatable) → ``{"down_proj": "sparsegpt"}``."""
    from layerprune.solvers import SolverError

    out = {}
    for v in values or []:
        name, sep, solver = v.partition("=")
        if not sep or not name.strip() or not solver.strip():
            raise SolverError(f"--override expects NAME=SOLVER, got {v!r}")
        out[name.strip()] = solver.strip()
    return out


def parse_solver_options(values: Optional[list]) -> dict:
    """``--solver-option candidates=32`` (repeatable) → ``{"candidates": 32}``; values are read
    as int, then float, else kept as text."""
    from layerprune.solvers import SolverError

    out = {}
    for v in values or []:
        key, sep, text = v.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise SolverError(f"--solver-option expects KEY=VALUE, got {v!r}")
        text = text.strip()
        for cast in (int, float):
            try:
                out[key.strip()] = cast(text)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = text
    return out


def _quiet_transformers() -> None:
    """No "Loading weights" bars from transformers (stderr keeps only what matters)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


# --------------------------------------------------------------------------- prune
def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune a causal LM layer by layer and report perplexity",
        description="Prune every linear of every decoder block (sequentially, block after block) "
                    "with a chosen backend; measure dense and pruned perplexity; save and report.")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled), a Hugging Face id, a directory or a .gguf file")
    p.add_argument("--solver", default="sparseswaps", metavar="NAME", help="backend (layerprune solvers; default sparseswaps)")
    p.add_argument("--pattern", default="per-row:0.5", metavar="PATTERN",
                   help="per-row:0.5 | nm:2:4 | unstructured:0.6 | columns:0.3 (pruned fractions)")
    p.add_argument("--objective", default="mask", choices=["mask", "reconstruct"])
    p.add_argument("--nsamples", type=_positive_int, default=64, help="calibration sequences")
    p.add_argument("--seqlen", type=_positive_int, default=256,
                   help="tokens per calibration sequence and per evaluation window")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help="calibration text: bundled name, file, directory or datasets name")
    p.add_argument("--eval", action="append", default=None, metavar="SOURCE",
                   help="evaluation text (repeatable or comma-separated)")
    p.add_argument("--eval-tokens", type=_positive_int, default=16384, metavar="N",
                   help="evaluate on the first N tokens of each text")
    p.add_argument("--out", default=None, metavar="DIR", help="save the pruned model (HF directory)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--report", default=None, metavar="FILE.json",
                   help="write the JSON report (and layer_errors.png next to it)")
    p.add_argument("--init", default=None, metavar="SOLVER", help="warm start each layer from this solver")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)")
    p.add_argument("--time-limit-per-layer", type=_positive_float, default=None, metavar="SECONDS")
    p.add_argument("--max-iter", type=_positive_int, default=None, metavar="N",
                   help="iteration cap per layer for iterative solvers (sparsefw, admm, …)")
    p.add_argument("--solver-option", action="append", default=None, metavar="KEY=VALUE",
                   help="option of the default solver, e.g. candidates=32 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=None, metavar="NAME=SOLVER",
                   help="another backend for layers whose name contains NAME (repeatable)")
    p.add_argument("--sequential-order", action="store_true",
                   help="within a block prune q,k,v → o → gate,up → down, re-capturing inputs")
    p.add_argument("--prune-lm-head", action="store_true", help="prune lm_head too")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_prune)


def config_from_args(args):
    """A :class:`~layerprune.pipeline.PruneConfig` from parsed ``prune`` arguments."""
    from layerprune.pipeline import PruneConfig

    return PruneConfig(
        model=args.model, solver=args.solver, pattern=args.pattern, objective=args.objective,
        nsamples=args.nsamples, seqlen=args.seqlen, calib=args.calib, eval=split_list(args.eval),
        eval_tokens=args.eval_tokens, out=args.out, force=args.force, report=args.report,
        init=args.init, device=args.device, time_limit_per_layer=args.time_limit_per_layer,
        max_iter=args.max_iter, solver_options=parse_solver_options(args.solver_option),
        seed=args.seed, overrides=parse_overrides(args.override),
        sequential_order=args.sequential_order, prune_lm_head=args.prune_lm_head,
        dtype=args.dtype, progress=not args.no_progress)


def cmd_prune(args) -> int:
    """Handler of ``layerprune prune``; returns the exit code."""
    from layerprune.pipeline import PruningInterrupted, run

    expected = _expected_errors()
    if args.no_progress:
        _quiet_transformers()
    try:
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
    p = sub.add_parser("eval", help="measure the perplexity of a (saved) model",
                       description="Perplexity on non-overlapping windows of --seqlen tokens.")
    p.add_argument("--model", required=True, help="a saved directory, 'smollm2', an HF id or a .gguf")
    p.add_argument("--eval", action="append", default=None, metavar="SOURCE",
                   help="evaluation text (repeatable or comma-separated)")
    p.add_argument("--seqlen", type=_positive_int, default=256)
    p.add_argument("--eval-tokens", type=_positive_int, default=16384, metavar="N")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=cmd_eval)


def evaluate(model_source: str, eval_sources: Optional[list] = None, *, seqlen: int = 256,
             eval_tokens: Optional[int] = 16384, device: Optional[str] = None,
             dtype: str = "float32") -> dict:
    """Perplexity of a model on each evaluation text, plus its measured sparsity."""
    import torch

    from layerprune import data, models
    from layerprune.pipeline import perplexity, sparsity
    from layerprune.pipeline.job import _dtype

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = models.load_model(model_source, dtype=_dtype(dtype), device="cpu")
    srcs = eval_sources or list(getattr(data, "DEFAULT_EVALUATION", ("persuasion", "mobydick")))
    ppl = {}
    for src in srcs:
        ids = data.eval_tokens(tokenizer, data.load_text(src), max_tokens=eval_tokens)
        ppl[data.text_name(src)] = perplexity(model, ids, seqlen, dev)
    return {"model": str(model_source), "perplexity": ppl, "sparsity": sparsity(model),
            "seqlen": seqlen, "eval_tokens": eval_tokens}


def cmd_eval(args) -> int:
    """Handler of ``layerprune eval``; returns the exit code."""
    expected = _expected_errors()
    _quiet_transformers()
    try:
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
