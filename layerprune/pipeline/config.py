"""The settings of a prune job, declared once (each field carries its ``layerprune prune``
flag), and every check that can run before the model is loaded."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from layerprune import data
from layerprune.problems import OBJECTIVES, ProblemError
from layerprune.problems.refit import DEFAULT_DUAL_ITER, DEFAULT_MAX_ITER, DEFAULT_TOL, REFIT_METHODS
from layerprune.problems.io import check_parent_writable
from layerprune.settings import (SettingError, check_values, flag_name, nonempty, nonnegative_float, nonnegative_int,
                                 parse_overrides, parse_solver_options, positive_float, positive_int, setting,
                                 split_list)
from layerprune.solvers import Params

from .allocate import ALLOCATIONS, KNAPSACK_NORMS, MAP_FILE, check_allocatable, check_owl_range, read_sparsity_map
from .block_tune import (BLOCK_TUNE_TARGETS, DEFAULT_BLOCK_TUNE_BATCH, DEFAULT_BLOCK_TUNE_EPOCHS, DEFAULT_BLOCK_TUNE_LR,
                         DEFAULT_BLOCK_TUNE_TARGET, DEFAULT_PRUNE_BLOCK_TUNE_TARGET)
from .channels import STRUCTURE_OBJECTIVE, STRUCTURE_SOLVER, check_structured_model, parse_structure
from .elsa import DEFAULT_WARM_START, DENSE_START, ELSA, parse_elsa_options
from .loop import DENSE_TARGET_RIDGE, TARGETS, check_target
from .plan import DEFAULT_OBJECTIVE, DEFAULT_SOLVER, DEFAULT_SOLVERS, Plan, _plan, build_solvers, check_settings, default_solver, native_objective
from .structure import find_blocks, resolve_device

__all__ = ["PruneConfig", "Checked", "check_before_loading", "check_outputs", "check_against_model",
           "with_defaults", "layerwise"]

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_PATTERN = "per-row:0.5"


def structure_text(value) -> str:
    """A ``--structure`` value that parses (``mlp:F``, F in (0, 1))."""
    try:
        parse_structure(value)
    except SettingError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return str(value)


def owl_lambda(value) -> float:
    """A number in (0, 0.5) (OWL's block sparsities span 2λ)."""
    v = positive_float(value)
    if not v < 0.5:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 0.5), got {value!r}")
    return v


def window_length(value) -> int:
    """An integer ≥ 2 (one predicted token per window at least)."""
    v = positive_int(value)
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 2, got {value!r}")
    return v


@dataclass
class PruneConfig:
    """Settings of one ``layerprune prune`` job; each field declares its flag
    (:func:`layerprune.settings.setting`), in the order ``layerprune prune --help`` lists them."""

    model: str = setting("smollm2", "'smollm2' (bundled), a Hugging Face id, a directory or a .gguf file",
                         type=nonempty)
    solver: Optional[str] = setting(None, "backend (layerprune solvers), or elsa: whole-model ADMM on the "
                                    "model's loss (its options: --solver-option; see docs)", metavar="NAME",
                                    type=nonempty,
                                    default_text=f"{DEFAULT_SOLVER}, {DEFAULT_SOLVERS['mask']} with "
                                    f"--objective mask; {STRUCTURE_SOLVER} with --structure")
    pattern: str = setting(DEFAULT_PATTERN, "per-row:0.5 | nm:2:4 | unstructured:0.6 | columns:0.3 (pruned fractions)",
                           metavar="PATTERN", type=nonempty)
    structure: Optional[str] = setting(None, "structured pruning instead of --pattern: mlp:F removes the fraction F "
                                       "of every block's MLP channels (gate/up rows, down_proj columns; a smaller "
                                       "standard checkpoint)", metavar="mlp:F", type=structure_text)
    allocate: str = setting("uniform", "each layer's sparsity: uniform (the pattern's everywhere), owl "
                            "(outlier-weighted per block, Yin et al. 2024) or knapsack (measured error "
                            "curves, exact choice at uniform's kept-weight budget)",
                            choices=ALLOCATIONS)
    owl_m: float = setting(5.0, "OWL: a Wanda score is an outlier above M × its block's mean", metavar="M",
                           type=positive_float)
    owl_lambda: float = setting(0.08, "OWL: block sparsities span 2λ around the target", metavar="LAMBDA",
                                type=owl_lambda)
    knapsack_norm: str = setting("relative", "knapsack: each layer's error divided by its dense output "
                                 "energy (relative) or not (raw)", choices=KNAPSACK_NORMS)
    sparsity_map: Optional[str] = setting(None, "per-layer pruned fractions, a JSON object {layer name: "
                                          "fraction} (as the report names layers); layers not in it take "
                                          "--pattern's", metavar="FILE.json", type=nonempty)
    objective: Optional[str] = setting(None, "layer error with the kept weights fixed or refitted", choices=OBJECTIVES,
                                       default_text=f"{DEFAULT_OBJECTIVE} without --solver, else the "
                                       f"solver's own (mask where it takes it); {STRUCTURE_OBJECTIVE} with --structure")
    target: str = setting("layer", "match each layer's own outputs on the pruned model's inputs, or the dense "
                          "model's outputs (dense: one more copy of the calibration hidden states)",
                          choices=TARGETS)
    target_ridge: Optional[float] = setting(None, "dense target: add δ‖v − w‖² to each layer's error, δ = FRAC × "
                                            "mean diag of its Gram (0: none)", metavar="FRAC",
                                            type=nonnegative_float, default_text=f"{DENSE_TARGET_RIDGE} with --target dense")
    nsamples: int = setting(64, "calibration sequences", type=positive_int)
    seqlen: int = setting(256, "tokens per calibration sequence and per evaluation window", type=window_length)
    calib: Optional[str] = setting(None, "calibration text: bundled name, file, directory or datasets name",
                                   metavar="SOURCE", type=nonempty, default_text=data.DEFAULT_CALIBRATION)
    eval: Optional[list] = setting(None, "evaluation text (repeatable or comma-separated)", metavar="SOURCE",
                                   repeat=split_list, default_text=", ".join(data.DEFAULT_EVALUATION))
    eval_tokens: Optional[int] = setting(16384, "evaluate on the first N tokens of each text", metavar="N",
                                         type=positive_int)
    out: Optional[str] = setting(None, "save the pruned model (HF directory)", metavar="DIR", type=nonempty)
    force: bool = setting(False, "overwrite --out")
    report: Optional[str] = setting(None, "write the JSON report (and layer_errors.png next to it)",
                                    metavar="FILE.json", type=nonempty)
    init: Optional[str] = setting(None, "warm start each layer from this solver (with --solver elsa: the "
                                  f"layer-wise prune Elsa starts from, default {DEFAULT_WARM_START}; "
                                  f"{DENSE_START}: the dense model, as published)", metavar="SOLVER",
                                  type=nonempty)
    device: Optional[str] = setting(None, "cpu, cuda, cuda:1, …", type=nonempty,
                                    default_text="cuda if available, else cpu")
    time_limit_per_layer: Optional[float] = setting(None, "time limit of each layer's solve", metavar="SECONDS",
                                                    type=positive_float)
    max_iter: Optional[int] = setting(None, "iteration cap per layer for iterative solvers (sparsefw, admm, …)",
                                      metavar="N", type=positive_int)
    refit: Optional[str] = setting(None, "reconstruct: how each layer's kept weights are refitted: exact (batched "
                                   "Cholesky per row, O(d_out·K³)), cg (batched preconditioned CG from the solver's "
                                   "own weights) or auto (exact on small layers)", choices=REFIT_METHODS,
                                   default_text="auto")
    refit_tol: Optional[float] = setting(None, "reconstruct: the CG refit's relative residual at which a row stops",
                                         metavar="TOL", type=positive_float, default_text=f"{DEFAULT_TOL:g}")
    refit_max_iter: Optional[int] = setting(None, "reconstruct: the CG refit's iteration cap per row (a row stopped "
                                            "short scores its weights' own error, an upper bound)", metavar="N",
                                            type=nonnegative_int, default_text=f"{DEFAULT_MAX_ITER}")
    refit_dual_iter: Optional[int] = setting(None, "reconstruct: the CG refit's dual-start iteration cap per row "
                                             "(0: CG starts from the solver's own weights)", metavar="N",
                                             type=nonnegative_int, default_text=f"{DEFAULT_DUAL_ITER}")
    solver_options: dict = setting(help="option of the default solver, e.g. candidates=32 (repeatable)",
                                   metavar="KEY=VALUE", flag="--solver-option", repeat=parse_solver_options,
                                   default_factory=dict)
    seed: int = setting(0, "seed of the calibration windows and of randomised solvers", type=nonnegative_int)
    overrides: dict = setting(help="another backend for layers whose name contains NAME (repeatable)",
                              metavar="NAME=SOLVER", flag="--override", repeat=parse_overrides,
                              default_factory=dict)
    reference: bool = setting(True, "no Wanda reference per layer (under reconstruct: one refit less per layer; "
                              "the report has no error ratio to Wanda)", negate=True)
    sequential_order: bool = setting(False, "within a block prune q,k,v → o → gate,up → down, re-capturing inputs")
    block_tune: Optional[int] = setting(None, "after each block's layer-wise solve, tune its pruned linears' kept "
                                        "weights for EPOCHS passes so the block's output matches the dense one "
                                        "(--block-tune-target; EBFT; masks unchanged; 0: off)", metavar="EPOCHS",
                                        type=nonnegative_int,
                                        default_text=f"{DEFAULT_BLOCK_TUNE_EPOCHS} in the default prune (no --solver, "
                                        f"{DEFAULT_OBJECTIVE} objective, layer target, float32), else 0")
    block_tune_lr: Optional[float] = setting(None, "learning rate of --block-tune (AdamW, decaying linearly to 0)",
                                             metavar="LR", type=positive_float, default_text=f"{DEFAULT_BLOCK_TUNE_LR:g}")
    block_tune_batch: Optional[int] = setting(None, "calibration sequences per --block-tune step",
                                              metavar="N", type=positive_int,
                                              default_text=f"{DEFAULT_BLOCK_TUNE_BATCH}")
    block_tune_target: Optional[str] = setting(None, "what --block-tune matches: the dense block on the pruned "
                                               "model's inputs (block) or the dense model's own block outputs (dense)",
                                               choices=BLOCK_TUNE_TARGETS,
                                               default_text=f"{DEFAULT_PRUNE_BLOCK_TUNE_TARGET} in the default prune "
                                               f"(no --solver), else {DEFAULT_BLOCK_TUNE_TARGET}")
    prune_lm_head: bool = setting(False, "prune lm_head too")
    dtype: str = setting("float32", "dtype of the model's weights", choices=DTYPES)
    progress: bool = setting(True, "no progress bars", negate=True)
    cache_dir: Optional[str] = setting(None, "where the bundled model and corpora are kept", cli=False)


def _dtype(name: str) -> torch.dtype:
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise ProblemError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return dt


@dataclass
class Checked:
    """What the checks before loading found, as the later steps use it."""

    device: torch.device
    dtype: torch.dtype
    params: Params
    calib_source: str
    eval_sources: list[str]
    calib_text: str
    eval_texts: dict[str, str]      # by text name (:func:`layerprune.data.text_name`)
    sparsity_map: Optional[dict] = None   # the --sparsity-map file's entries, read and checked


def check_before_loading(config: PruneConfig) -> Checked:
    """Every check that needs no model, cheapest first: the settings' values, the device, the
    solvers (each built with its options), the output paths, then the texts (read).

    Raises
    ------
    SettingError, ProblemError, PatternError, SolverError, ModelError, DataError
        One line saying what is wrong.
    """
    given, config = config, with_defaults(config)
    check_values(config)
    if config.eval_tokens is not None and config.eval_tokens < config.seqlen:
        raise SettingError(f"--eval-tokens {config.eval_tokens} is less than one window of "
                           f"--seqlen {config.seqlen} tokens")
    device = resolve_device(config.device)
    dtype = _dtype(config.dtype)
    if config.solver == ELSA:
        check_elsa(given)
        fractions = check_allocation(config)
    elif config.structure is not None:
        check_structure(config)
        fractions = None
    else:
        check_solvers(config)
        fractions = check_allocation(config)
    check_block_tune(config)
    check_refit(config)
    check_outputs(config.out, config.report, config.force)
    calib_source = config.calib if config.calib is not None else data.DEFAULT_CALIBRATION
    eval_sources = list(config.eval) if config.eval else list(data.DEFAULT_EVALUATION)
    _check_no_overlap(calib_source, eval_sources)
    calib_text = data.load_text(calib_source, cache_dir=config.cache_dir)
    eval_texts = {data.text_name(src): data.load_text(src, cache_dir=config.cache_dir) for src in eval_sources}
    params = Params(time_limit=config.time_limit_per_layer, max_iter=config.max_iter, seed=config.seed,
                    **refit_params(config))
    return Checked(device, dtype, params, calib_source, eval_sources, calib_text, eval_texts, fractions)


def with_defaults(config: PruneConfig) -> PruneConfig:
    """``config`` with its solver and objective filled in where not given: ``--structure``'s
    (``alternating``, ``reconstruct``); a layer-wise prune's by :func:`~.plan.default_solver`
    (neither given: ``admm``, ``reconstruct``; ``--objective mask`` alone: ``sparseswaps``; a
    solver alone: its own objective, ``mask`` where it takes it); under ``--solver elsa`` its
    warm start's (``--init``; from the dense model it keeps no objective); ``--block-tune`` and
    ``--block-tune-target`` by :func:`_block_tune_epochs` and :func:`_block_tune_target`."""
    epochs = _block_tune_epochs(config)
    config = dataclasses.replace(config, block_tune=epochs, block_tune_target=_block_tune_target(config, epochs))
    if config.structure is not None:
        return dataclasses.replace(config, solver=config.solver or STRUCTURE_SOLVER,
                                   objective=config.objective or STRUCTURE_OBJECTIVE)
    if config.solver == ELSA:
        init = _elsa_init(config)
        objective = config.objective
        if objective is None and init != DENSE_START:      # from dense: no layer objective
            objective = native_objective(init)
        return dataclasses.replace(config, objective=objective, init=init)
    solver, objective = default_solver(config.solver, config.objective)
    return dataclasses.replace(config, solver=solver, objective=objective)


def _block_tune_epochs(config: PruneConfig) -> int:
    """``--block-tune`` as given; not given, :data:`~.block_tune.DEFAULT_BLOCK_TUNE_EPOCHS` for the
    default prune (no ``--solver``, no ``--structure``: the default solver on the ``reconstruct``
    objective) where block tuning applies (the layer target, float32 weights), else 0: a named
    solver (``elsa`` too) prunes in its own form."""
    if config.block_tune is not None:
        return config.block_tune
    applies = config.target == "layer" and config.dtype == "float32"
    return DEFAULT_BLOCK_TUNE_EPOCHS if _default_prune(config) and applies else 0


def _block_tune_target(config: PruneConfig, epochs: int) -> Optional[str]:
    """``--block-tune-target`` as given; not given and tuning on (``epochs`` ≥ 1),
    :data:`~.block_tune.DEFAULT_PRUNE_BLOCK_TUNE_TARGET` in the default prune and EBFT's
    :data:`~.block_tune.DEFAULT_BLOCK_TUNE_TARGET` after a named solver."""
    if config.block_tune_target is not None or not epochs:
        return config.block_tune_target
    return DEFAULT_PRUNE_BLOCK_TUNE_TARGET if _default_prune(config) else DEFAULT_BLOCK_TUNE_TARGET


def _default_prune(config: PruneConfig) -> bool:
    """No ``--solver``, no ``--structure``: the default solver on the ``reconstruct`` objective."""
    return (config.solver is None and config.structure is None
            and default_solver(None, config.objective)[1] == DEFAULT_OBJECTIVE)


def _elsa_init(config: PruneConfig) -> str:
    """Where an Elsa run starts: ``--init`` as given, else the dense model for the control
    (``constrained=false``) and :data:`~.elsa.DEFAULT_WARM_START`'s prune otherwise."""
    if config.init is not None:
        return config.init
    try:
        control = not parse_elsa_options(config.solver_options).constrained
    except SettingError:        # check_elsa says what is wrong
        control = False
    return DENSE_START if control else DEFAULT_WARM_START


def layerwise(config: PruneConfig) -> PruneConfig:
    """The layer-wise part of a job: ``config`` itself, or under ``--solver elsa`` the warm
    start's prune (``--init``'s solver; from the dense model ``magnitude`` stands in to check
    that the pattern fits every layer, and nothing is pruned layer-wise)."""
    config = with_defaults(config)
    if config.solver != ELSA:
        return config
    solver = "magnitude" if config.init == DENSE_START else config.init
    return with_defaults(dataclasses.replace(config, solver=solver, init=None, solver_options={}))


def check_elsa(config: PruneConfig) -> None:
    """``--solver elsa`` with the settings it takes: its options (``--solver-option``), float32
    weights, no ``--structure`` or ``lm_head``; the flags of a layer-wise prune only with a
    layer-wise warm start (``--init SOLVER`` or the default), whose solver must take the pattern."""
    options = parse_elsa_options(config.solver_options)
    if options.checkpoint is not None:
        path = Path(options.checkpoint).expanduser()
        if path.is_dir():
            raise SettingError(f"--solver-option checkpoint={options.checkpoint} is a directory (give a file)")
        _check_writable_parent(path, f"--solver-option checkpoint={options.checkpoint}")
    if config.structure is not None:
        raise SettingError("--structure does not apply with --solver elsa (give the sparsity with --pattern)")
    if config.prune_lm_head:
        raise SettingError("--prune-lm-head does not apply with --solver elsa (it prunes the decoder's linears; "
                           "lm_head is tied to the embeddings and stays dense)")
    if config.dtype != "float32":
        raise SettingError(f"--dtype {config.dtype}: elsa trains float32 weights (for a mixed-precision forward "
                           f"use --solver-option autocast=bfloat16)")
    if config.init is not None and config.init != DENSE_START and not options.constrained:
        raise SettingError(f"--solver-option constrained=false is the dense control (the dense model fine-tuned "
                           f"by the same loop): it takes no layer-wise --init (only --init {DENSE_START})")
    if config.init == ELSA:
        raise SettingError("--init elsa: the warm start is a layer-wise solver")
    if with_defaults(config).init == DENSE_START:
        layer_flags = (("--objective", config.objective is not None), ("--target dense", config.target != "layer"),
                       ("--target-ridge", config.target_ridge is not None), ("--override", bool(config.overrides)),
                       ("--sequential-order", config.sequential_order),
                       ("--time-limit-per-layer", config.time_limit_per_layer is not None),
                       ("--max-iter", config.max_iter is not None), ("--block-tune", bool(config.block_tune)))
        _refuse_given(layer_flags, "shapes a layer-wise warm start: an Elsa run from the dense model has none")
    check_solvers(layerwise(config))


def check_block_tune(config: PruneConfig) -> None:
    """``--block-tune`` (with ``--block-tune-lr``, ``-batch``, ``-target``) and the settings it takes: a layer-wise prune
    (no ``--structure``; under ``--solver elsa`` its layer-wise warm start, :func:`check_elsa`), the layer
    target, float32 weights."""
    for flag, given in (("--block-tune-lr", config.block_tune_lr is not None),
                        ("--block-tune-batch", config.block_tune_batch is not None),
                        ("--block-tune-target", config.block_tune_target is not None)):
        if given and not config.block_tune:
            raise SettingError(f"{flag} applies with block tuning only (--block-tune EPOCHS ≥ 1, or the default "
                               f"prune: no --solver)")
    if not config.block_tune:
        return
    flags = (("--structure", config.structure is not None), ("--target dense", config.target != "layer"))
    _refuse_given(flags, "does not apply with --block-tune (it tunes a layer-wise prune's blocks toward the "
                         "dense blocks' outputs)")
    if config.dtype != "float32":
        raise SettingError(f"--dtype {config.dtype}: --block-tune trains float32 weights")


#: the settings that are :class:`~layerprune.solvers.Params` refit fields of the same name
REFIT_SETTINGS = ("refit", "refit_tol", "refit_max_iter", "refit_dual_iter")


def refit_params(config: PruneConfig) -> dict:
    """The :data:`REFIT_SETTINGS` given (those not given keep Params' defaults)."""
    given = {name: getattr(config, name) for name in REFIT_SETTINGS}
    return {k: v for k, v in given.items() if v is not None}


def check_refit(config: PruneConfig) -> None:
    """The refit flags apply where kept weights are refitted: the ``reconstruct`` objective (after
    :func:`with_defaults`; an Elsa run's, that of its layer-wise warm start)."""
    if config.objective == "reconstruct":
        return
    flags = tuple((flag_name(f), getattr(config, f.name) is not None)
                  for f in dataclasses.fields(config) if f.name in REFIT_SETTINGS)
    _refuse_given(flags, f"applies to the reconstruct objective (the kept weights refitted), not "
                         f"{config.objective or 'an Elsa run from the dense model'}")


def _refuse_given(flags: tuple, why: str) -> None:
    """One line for the first ``(flag, given)`` pair that was given: ``"{flag} {why}"``."""
    for flag, given in flags:
        if given:
            raise SettingError(f"{flag} {why}")


def check_structure(config: PruneConfig) -> None:
    """``--structure`` with the settings it takes: the flags that choose what else is pruned or how
    sparsity is spread are refused (one line each), and the solver (with its options and
    ``--init``) must take ``columns`` under the objective."""
    structure = parse_structure(config.structure)
    conflicts = (("--pattern", config.pattern != DEFAULT_PATTERN), ("--allocate", config.allocate != "uniform"),
                 ("--sparsity-map", config.sparsity_map is not None), ("--target dense", config.target != "layer"),
                 ("--target-ridge", config.target_ridge is not None), ("--override", bool(config.overrides)),
                 ("--prune-lm-head", config.prune_lm_head), ("--sequential-order", config.sequential_order))
    _refuse_given(conflicts, f"does not apply with --structure {structure} (it removes whole MLP channels)")
    pattern = f"columns:{structure.fraction}"
    check_settings(pattern, config.objective, config.solver, {}, config.init)
    build_solvers(config.solver, {}, config.init, config.solver_options, pattern, config.objective)


def check_allocation(config: PruneConfig) -> Optional[dict]:
    """``--allocate`` and ``--sparsity-map`` against the pattern, and the map file's syntax and
    values (read here); returns the map's entries (None without a map)."""
    if config.allocate != "uniform":
        if config.sparsity_map is not None:
            raise SettingError(f"--sparsity-map and --allocate {config.allocate} both set each layer's "
                               f"sparsity: give one")
        target = check_allocatable(config.pattern, f"--allocate {config.allocate}")
        if config.allocate == "owl":
            check_owl_range(target, config.owl_lambda)
        return None
    if config.sparsity_map is None:
        return None
    check_allocatable(config.pattern, "--sparsity-map")
    return read_sparsity_map(config.sparsity_map)


def check_solvers(config: PruneConfig) -> None:
    """Every solver the prune will use exists, takes the pattern and objective, and is built with
    its options (the option checks include ``init_solver``, the solver it starts from)."""
    config = with_defaults(config)
    overrides = dict(config.overrides or {})
    check_settings(config.pattern, config.objective, config.solver, overrides, config.init)
    solvers = build_solvers(config.solver, overrides, config.init, config.solver_options, config.pattern,
                            config.objective)
    check_target(config.target, solvers, config.pattern, config.objective, config.prune_lm_head)
    if config.target_ridge is not None and config.target != "dense":
        raise SettingError(f"--target-ridge {config.target_ridge:g} applies to --target dense only")


def target_ridge(config: PruneConfig) -> float:
    """The ridge fraction the job uses: ``--target-ridge``, else the default with a dense target."""
    if config.target != "dense":
        return 0.0
    return DENSE_TARGET_RIDGE if config.target_ridge is None else config.target_ridge


def _check_no_overlap(calib_source: str, eval_sources: list[str]) -> None:
    for src in eval_sources:
        if data.sources_overlap(calib_source, src):
            raise data.DataError(f"evaluation text {data.text_name(src)!r} overlaps the calibration text "
                                 f"{data.text_name(calib_source)!r}")


# ---------------------------------------------------------------------------- output paths
def check_outputs(out: Optional[str], report: Optional[str], force: bool) -> None:
    """Each output can be written: ``out`` a directory that is new (or replaced under ``force``),
    ``report`` and the plot beside it files, each under a writable directory (missing parents
    are created when the job writes).

    Raises
    ------
    SettingError
        "--out …" / "--report …" and why not.
    """
    if out is not None:
        _check_out_dir(Path(out).expanduser(), force)
    if report is not None:
        rep = Path(report).expanduser()
        for path, flag in ((rep, "--report"), (rep.parent / "layer_errors.png", "--report's plot"),
                           (rep.parent / MAP_FILE, "--report's sparsity map")):
            if path.is_dir():
                raise SettingError(f"{flag} {path} is a directory")
            _check_writable_parent(path, flag)
        if out is not None and _inside(rep, Path(out).expanduser()):
            raise SettingError(f"--report {rep} is inside --out {out}, which is replaced whole "
                               f"(the model directory holds its own prune_report.json)")


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise SettingError(f"output directory {out} exists (use --force to overwrite)")
        if not out.is_dir():
            raise SettingError(f"--out {out} exists and is not a directory")
        if _inside(Path.cwd(), out):
            raise SettingError(f"--out {out} holds the working directory; it cannot be replaced")
    _check_writable_parent(out, "--out")


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory a file can be created in."""
    try:
        check_parent_writable(path.absolute(), what=flag)
    except ProblemError as exc:
        raise SettingError(str(exc)) from None


# ---------------------------------------------------------------------------- with the model
def check_against_model(model: nn.Module, config: PruneConfig, fractions: Optional[dict] = None) -> Optional[Plan]:
    """The checks that need the loaded model: the plan (the pattern fits every layer, each
    override and each sparsity-map entry names a layer), or under ``--structure`` the blocks'
    gated MLPs, and windows no longer than the model's positions. Returns the plan (None under
    ``--structure``)."""
    config = layerwise(config)
    if config.structure is not None:
        check_structured_model(model, parse_structure(config.structure))
        plan = None
    else:
        blocks, path = find_blocks(model)
        plan = _plan(model, blocks, path, config.pattern, config.objective, config.solver,
                     dict(config.overrides or {}), config.init, config.prune_lm_head, fractions)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and config.seqlen > limit:
        raise SettingError(f"--seqlen {config.seqlen} is longer than the model's {limit} positions")
    return plan
