"""The pruning loop.

Capture the first block's inputs; then, block after block: group its linears by shared input
and accumulate one Gram matrix per group, solve each layer, write it back, and run the pruned
block to get the next block's inputs. :func:`prune_model` says exactly that; each stage is one
function over a :class:`BlockState` (the block being pruned), so a new stage — a dense twin
of the block for cross-Gram targets, structured pruning, … — reads and extends that state and
takes its place in :func:`_prune_block`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from layerprune.problems import (LayerProblem, ProblemError, check_ridge_fraction, parse_pattern,
                                 ridge_targets)
from layerprune.solvers import Params, Result, Solver, SolverError, make_solver, refit_scored

from ..report import LayerRecord, pack_mask
from .block_tune import BlockTuning, dense_targets, tune_block
from .capture import (CALIB_BATCH, _accumulate, _accumulate_targets, _Batch, _GramAccumulator, _propagate, _Stop,
                      capture_block_inputs, linear_groups)
from .measure import release_memory
from .plan import _Layer, _plan, build_solvers, default_solver
from .structure import _eval_mode, _model_device, _on_device, find_blocks, find_linears

__all__ = ["PruningInterrupted", "prune_model", "BlockState", "SolveSettings", "TARGETS", "DENSE_TARGET_RIDGE", "check_target"]

#: what each layer's pruned outputs should match (``prune_model(target=…)``, ``--target``)
TARGETS = ("layer", "dense")
#: default ridge of ``--target dense``, relative to mean(diag G) (docs/DECISIONS.md)
DENSE_TARGET_RIDGE = 0.01


class PruningInterrupted(KeyboardInterrupt):
    """Pruning stopped by Ctrl-C. The model is left partially pruned: ``records`` lists the
    layers already written (each layer is written whole or not at all)."""

    def __init__(self, records: list, total: int):
        super().__init__(f"interrupted after {len(records)} of {total} layers")
        self.records = records
        self.total = total


@dataclass
class SolveSettings:
    """What solving any layer of one prune takes (the same for every layer)."""

    pattern: str                    # pattern string; fractions resolve per layer width
    objective: str                  # ``mask`` or ``reconstruct``
    solvers: dict[str, Solver]      # every solver of the plan, by registry name
    init: Optional[str]             # solver whose mask starts every solve, or None
    params: Params
    target_ridge: float = 0.0       # dense targets: δ/mean(diag G) of the ridge δ‖v − w‖²
    reference: bool = True          # score Wanda's mask on every layer (its record's reference)


@dataclass
class BlockState:
    """One decoder block while it is pruned: each stage reads it and adds what it found.

    Attributes
    ----------
    index : the block's position among the decoder blocks
    module : the block (on the compute device while it is pruned)
    layers : its target linears and their solvers, by name inside the block
    batches : its inputs, one :class:`_Batch` per calibration mini-batch (hidden states
        (B, T, H)); after :func:`_propagate` its outputs, the next block's inputs
    groups : names of the linears that read one input tensor, in forward order
        (``q,k,v`` → ``o`` → ``gate,up`` → ``down``); set by :func:`_group_linears`
    masks : each solved linear's (d_out, d_in) bool mask, by name inside the block; set by
        :func:`_prune_block`
    """

    index: int
    module: nn.Module
    layers: dict[str, _Layer]
    batches: list[_Batch]
    groups: list[list[str]] = field(default_factory=list)
    dense: Optional["DenseTwin"] = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def linears(self) -> dict[str, nn.Linear]:
        """The target linears by name inside the block."""
        return {local: layer.linear for local, layer in self.layers.items()}


@dataclass
class DenseTwin:
    """The dense model beside the pruned one (``target="dense"``).

    module : a copy of the block being pruned, with its dense weights (one block)
    batches : the dense model's inputs to the block, one per calibration mini-batch (the
        hidden states differ from :attr:`BlockState.batches`; the rest of the call is shared)
    """

    module: nn.Module
    batches: list[_Batch]

    @property
    def linears(self) -> dict[str, nn.Linear]:
        """The copy's target linears by name inside the block (the names of the pruned block's)."""
        return find_linears(self.module)


@dataclass
class _Solved:
    """A solved layer: what to write into it and what to report."""

    weights: torch.Tensor           # (d_out, d_in) float64, zeros where pruned
    record: LayerRecord
    mask: torch.Tensor              # (d_out, d_in) bool, True where kept


class _Progress:
    """The layers written so far, the caller's callback and the progress bar."""

    def __init__(self, total: int, callback: Optional[Callable[[LayerRecord], Any]], enabled: bool):
        from tqdm.auto import tqdm

        self.total = total
        self.records: list[LayerRecord] = []
        self.callback = callback
        self.bar = tqdm(total=total, disable=not enabled, desc="pruning", unit="layer")

    def block(self, index: int, count: int, stage: str = "") -> None:
        self.bar.set_postfix_str(f"block {index + 1}/{count}" + (f" {stage}" if stage else ""))

    def add(self, record: LayerRecord) -> None:
        self.records.append(record)
        if self.callback is not None:
            self.callback(record)
        self.bar.update(1)

    def skip(self, count: int) -> None:
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()


def prune_model(model: nn.Module, calib_ids: torch.Tensor, *, solver: Union[None, str, Solver] = None,
                pattern: str = "per-row:0.5", objective: Optional[str] = None,
                overrides: Optional[dict[str, str]] = None, solver_options: Optional[dict] = None,
                init: Optional[str] = None, params: Optional[Params] = None,
                device: Union[None, str, torch.device] = None, sequential_order: bool = False,
                prune_lm_head: bool = False, progress: bool = True,
                callback: Optional[Callable[[LayerRecord], Any]] = None,
                batch_size: int = CALIB_BATCH, target: str = "layer",
                sparsity_map: Optional[dict[str, float]] = None,
                target_ridge: float = DENSE_TARGET_RIDGE, reference: bool = True,
                block_tuning: Optional[BlockTuning] = None) -> list[LayerRecord]:
    """Prune every target linear of every decoder block, block after block.

    Parameters
    ----------
    model : a Hugging Face causal LM (``model(input_ids=…)``), modified in place
    calib_ids : (nsamples, seqlen) LongTensor of calibration tokens
    solver : registry name of the default backend, or a :class:`Solver` instance
    pattern : pattern string; fractions (``per-row:0.5``) resolve per layer width
    objective : ``mask`` or ``reconstruct``. Either or both of ``solver`` and ``objective`` left
        out are filled in as ``layerprune prune`` does (:func:`~.plan.default_solver`): neither →
        ``admm``, ``reconstruct``; a solver alone → its own objective (``mask`` where it takes it)
    overrides : {module name or substring of it: solver name}, e.g. ``{"down_proj": "sparsegpt"}``;
        a key that names no layer is an error
    solver_options : constructor options of the default solver
    init : solver name whose mask warm-starts each layer's solve
    params : common solver parameters (time limit per layer, seed, …)
    device : where each block runs (default: the model's device); blocks move there one at
        a time and back
    sequential_order : prune groups of linears sharing an input one after the other
        (``q,k,v`` → ``o`` → ``gate,up`` → ``down``), re-capturing the Gram matrix of each
        group from the partially pruned block
    prune_lm_head : also prune the output projection (untied from the embeddings first)
    progress : tqdm bars over blocks and layers
    callback : called with each :class:`LayerRecord` once the layer is written
    target : what each layer's pruned outputs should match. ``"layer"``: the layer's own dense
        weights on the inputs it sees in the pruned model (``‖X̃(w − v)‖²``). ``"dense"``: the
        dense model's outputs (``‖X̃v − Xw‖²``, CONTRACT.md's dense targets): a dense copy of
        the current block and a dense stream of hidden states run beside the pruned ones, and
        each layer's problem gets ``C = X̃ᵀX``, ``G0 = XᵀX`` (memory: one more copy of the
        calibration hidden states and of one block's weights; the block runs twice per pass)
    target_ridge : with ``target="dense"``, each layer's error gains ``δ‖v − w‖²``,
        ``δ = target_ridge · mean(diag G)`` (:func:`~layerprune.problems.ridge_targets`); 0 for
        none. Ignored with ``target="layer"``.
    reference : score Wanda's mask on every layer, each record's ``wanda_objective``. False
        skips it (under ``reconstruct`` a second refit per layer); Wanda's mask is still
        found where it starts or backs up a solve
    block_tuning : after each block's layer-wise solve, tune the kept weights of its pruned
        linears so the block's output matches the dense block's on the same inputs, or under
        ``block_tuning.target == "dense"`` the dense model's output (a dense stream of hidden
        states runs beside the pruned one) (:mod:`.block_tune`; masks unchanged, each layer's
        record keeps its layer-wise objective); ``block_tuning.log`` receives each block's
        errors before and after.
        None: no tuning (``layerprune prune`` without ``--solver`` passes
        ``BlockTuning(DEFAULT_BLOCK_TUNE_EPOCHS, target="dense")``: the default prune tunes,
        this function does only when asked)
    sparsity_map : {qualified layer name: pruned fraction}: those layers take ``pattern``'s
        kind with their own fraction (:mod:`.allocate`); the pattern must be a fraction
        (``per-row:F``, ``unstructured:F``, ``columns:F``) and every name a target layer

    Returns
    -------
    list of LayerRecord, in pruning order (masks attached, on CPU).

    Raises
    ------
    ProblemError : the pattern does not fit a layer (raised before any weight changes)
    SolverError : unknown or unable solver, override naming no layer
    PruningInterrupted : on Ctrl-C; the layers in ``.records`` have been written
    """
    _check_calibration_ids(calib_ids)
    if target not in TARGETS:
        raise ProblemError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    solver, objective = default_solver(solver, objective)
    overrides = dict(overrides or {})
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    blocks, path = find_blocks(model)
    plan = _plan(model, blocks, path, pattern, objective, solver, overrides, init, prune_lm_head, sparsity_map)
    settings = SolveSettings(pattern, objective, build_solvers(solver, overrides, init, solver_options, pattern, objective),
                             init, params or Params(), _checked_ridge(target, target_ridge), bool(reference))
    check_target(target, settings.solvers, pattern, objective, prune_lm_head)
    written = _Progress(plan.total, callback, progress)
    with _eval_mode(model), _interrupted_after(written), contextlib.closing(written):
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        dense_batches = [_Batch(b.hidden.clone(), b.args, b.kwargs) for b in batches] if target == "dense" else None
        tune_stream = _tune_stream(block_tuning, batches)
        for index, layers in enumerate(plan.blocks):
            state = BlockState(index, blocks[index], {layer.local: layer for layer in layers}, batches)
            written.block(index, len(blocks))
            with _on_device(state.module, device, home):
                if dense_batches is not None:
                    state.dense = DenseTwin(copy.deepcopy(state.module), dense_batches)
                targets = dense_targets(state.module, state.batches, tune_stream) if block_tuning is not None else None
                if tune_stream is not None:
                    tune_stream = targets     # the dense model's inputs to the next block
                _prune_block(state, settings, sequential_order, written)
                if targets is not None and state.masks:
                    written.block(index, len(blocks), "tuning")
                    tune_block(index, state.module, state.linears, state.masks, state.batches, targets, block_tuning)
                else:
                    _propagate(state.module, state.batches)
                if state.dense is not None:
                    _propagate(state.dense.module, state.dense.batches)
                    state.dense = None
            release_memory()  # the block's forward and solver temporaries
        if plan.lm_head is not None:
            written.add(_prune_lm_head(model, plan.lm_head, calib_ids, device, batch_size, settings))
    return written.records


def _tune_stream(tuning: Optional[BlockTuning], batches: list[_Batch]) -> Optional[list[torch.Tensor]]:
    """The dense model's hidden states at the first block (a copy of ``batches``'), followed block by
    block, where block tuning targets the dense model's outputs; else None."""
    if tuning is None or tuning.target != "dense":
        return None
    return [b.hidden.clone() for b in batches]


def check_target(target: str, solvers: dict[str, Solver], pattern: str, objective: str,
                 prune_lm_head: bool) -> None:
    """One line (``SolverError``) if ``target="dense"`` cannot run with these settings: a
    solver that does not take the objective with a dense target (``Solver.can_take``), or the
    output projection (its dense inputs are not followed)."""
    if target != "dense":
        return
    if prune_lm_head:
        raise SolverError("--target dense does not cover --prune-lm-head (the head's dense inputs are not "
                          "followed); prune lm_head with --target layer")
    kind = parse_pattern(pattern).name
    for solver in solvers.values():
        why = solver.can_take(kind, objective, pattern, target=True)
        if why:
            raise SolverError(f"--target dense: {why}")


def _checked_ridge(target: str, fraction: float) -> float:
    """The dense target's ridge fraction (0 for the layer target); one line if not ≥ 0."""
    fraction = check_ridge_fraction(fraction)
    return fraction if target == "dense" else 0.0


def _check_calibration_ids(calib_ids: torch.Tensor) -> None:
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0 or calib_ids.shape[1] < 2:
        raise ProblemError(f"calibration ids must be (nsamples, seqlen) with seqlen ≥ 2, got {tuple(calib_ids.shape)}")


@contextlib.contextmanager
def _interrupted_after(written: _Progress) -> Iterator[None]:
    """Ctrl-C becomes :class:`PruningInterrupted` carrying the layers written so far."""
    try:
        yield
    except KeyboardInterrupt:
        raise PruningInterrupted(written.records, written.total) from None


# ---------------------------------------------------------------------------- one block
def _prune_block(state: BlockState, settings: SolveSettings, sequential_order: bool,
                 written: _Progress) -> None:
    """Group the block's linears, then per group: its Gram matrix (and dense targets), each layer
    solved and written."""
    _group_linears(state)
    for group, acc in _group_grams(state, sequential_order):
        G = acc.gram()
        C, G0 = acc.targets()
        if C is not None:
            G, C, G0 = ridge_targets(G, C, G0, settings.target_ridge)
        for local in group:
            layer = state.layers[local]
            solved = _solve_layer(layer, G, acc.n, settings, C, G0)
            _write_back(layer.linear, solved.weights)
            state.masks[local] = solved.mask
            written.add(solved.record)
    written.skip(len(state.layers) - sum(len(g) for g in state.groups))  # never called: stay dense


def _group_linears(state: BlockState) -> None:
    """Set ``state.groups`` from a probe forward of the first sequence."""
    state.groups = linear_groups(state.module, state.linears, state.batches[0])


def _group_grams(state: BlockState, sequential_order: bool) -> Iterator[tuple[list[str], _GramAccumulator]]:
    """Each group with its Gram accumulator, in forward order.

    All groups' Gram matrices come from one pass over the block's inputs; with
    ``sequential_order`` each group's is captured only when the generator resumes, i.e. after
    the groups before it have been written back. With a dense twin (``state.dense``) each pass
    also runs the twin on the dense inputs, and the accumulators hold ``C`` and ``G0`` too.
    """
    def accumulate(groups, stop_early):
        if state.dense is None:
            return _accumulate(state.module, state.batches, state.linears, groups, stop_early=stop_early)
        return _accumulate_targets(state.module, state.dense.module, state.batches, state.dense.batches,
                                   state.linears, state.dense.linears, groups, stop_early=stop_early)

    if sequential_order:
        for group in state.groups:
            yield group, accumulate([group], True)[group[0]]
        return
    accs = accumulate(state.groups, False)
    for group in state.groups:
        yield group, accs[group[0]]


def _write_back(linear: nn.Linear, weights: torch.Tensor) -> None:
    """Copy the pruned (d_out, d_in) weights into the layer, in its device and dtype."""
    linear.weight.data.copy_(weights.to(device=linear.weight.device, dtype=linear.weight.dtype))


# ---------------------------------------------------------------------------- one layer
def _solve_layer(layer: _Layer, G: torch.Tensor, ntokens: int, settings: SolveSettings,
                 C: Optional[torch.Tensor] = None, G0: Optional[torch.Tensor] = None) -> _Solved:
    """Build the layer's problem (``G``: (d_in, d_in) float64 over ``ntokens`` tokens; with dense
    targets ``C``, ``G0`` alike), solve it with its solver, and return the weights to write and
    the layer's record."""
    problem = LayerProblem.create(layer.linear.weight.detach(), G, pattern=layer.pattern,
                                  objective=settings.objective, C=C, G0=G0)
    solver = settings.solvers[layer.solver]
    wanda = _wanda_reference(problem, settings.params, settings.reference or _plain_wanda(solver))
    init_mask = _start_mask(problem, solver, wanda, settings)
    res = _run_solver(layer, problem, solver, wanda, init_mask, settings.params)
    status, limit = res.status.value, res.limit
    if res.mask is None:  # e.g. a MIP stopped before its first incumbent: fall back, say so
        fallback = init_mask if settings.init is not None else (wanda.mask if wanda is not None else None)
        if fallback is None:
            raise SolverError(f"layer {layer.qualified}: solver {layer.solver!r} found no mask ({status})")
        info, mask = {}, fallback
        if settings.objective == "reconstruct":
            weights, value = refit_scored(problem, fallback, None, settings.params, info)
        else:
            weights = problem.W.to(torch.float64) * fallback
            value = float(problem.weight_errors(weights).sum())
        refit = info.get("refit")
        limit = f"{limit or status}; fell back to {'init' if settings.init is not None else 'wanda'} mask"
    else:
        weights, mask, value, refit = res.weights, res.mask, res.objective, res.info.get("refit")
    gap = res.gap if res.mask is not None else None
    record = LayerRecord(
        block=layer.block, name=layer.qualified, shape=tuple(layer.linear.weight.shape),
        pattern=str(problem.pattern), objective_kind=settings.objective, solver=layer.solver,
        objective=value, wanda_objective=None if wanda is None else wanda.objective,
        lower_bound=res.lower_bound, bound_source=res.bound_source, gap=gap, status=status, limit=limit,
        seconds=res.seconds, ntokens=ntokens, sparsity=1.0 - float(mask.double().mean()), refit=refit,
        packed_mask=pack_mask(mask))
    return _Solved(weights, record, mask)


def _wanda_reference(problem: LayerProblem, params: Params, scored: bool = True) -> Optional[Result]:
    """Wanda's result on the problem (every record's reference), or None where Wanda cannot.

    Not ``scored``: its mask only (a start or fallback), with ``objective`` None, so a
    ``reconstruct`` layer skips the reference's refit (Wanda's mask does not depend on the
    objective)."""
    try:
        if scored or problem.objective_kind == "mask":
            return make_solver("wanda").solve(problem, params=params)
        found = make_solver("wanda").solve(dataclasses.replace(problem, objective_kind="mask"), params=params)
    except SolverError:
        return None
    return dataclasses.replace(found, objective=None, weights=None, info={**found.info, "scored": False})


def _plain_wanda(solver: Solver) -> bool:
    """Wanda without options: its solve is the reference itself."""
    return solver.name == "wanda" and not solver.options


def _start_mask(problem: LayerProblem, solver: Solver, wanda: Optional[Result],
                settings: SolveSettings) -> Optional[torch.Tensor]:
    """The (d_out, d_in) bool mask the solve starts from: ``init``'s, or Wanda's reference when it
    is the start the solver would compute itself; None lets the solver start on its own."""
    if settings.init is not None:
        if settings.init == "wanda" and wanda is not None:
            return wanda.mask
        return settings.solvers[settings.init].solve(problem, params=settings.params).mask
    if wanda is not None and solver.init_solver == "wanda":
        return wanda.mask  # the start it would compute itself: reuse the reference
    return None


def _run_solver(layer: _Layer, problem: LayerProblem, solver: Solver, wanda: Optional[Result],
                init_mask: Optional[torch.Tensor], params: Params) -> Result:
    """The layer's solve; plain Wanda reuses the reference instead of solving again."""
    try:
        if wanda is not None and _plain_wanda(solver) and wanda.objective is not None:
            return wanda  # the reference is this solve
        return solver.solve(problem, params=params, init=init_mask)
    except SolverError as exc:
        raise SolverError(f"layer {layer.qualified}: {exc}") from None


# ---------------------------------------------------------------------------- lm_head
def _prune_lm_head(model: nn.Module, layer: _Layer, calib_ids: torch.Tensor, device: torch.device,
                   batch_size: int, settings: SolveSettings) -> LayerRecord:
    """Prune the output projection on the inputs it sees from the (already pruned) model."""
    _untie_output_embeddings(model)
    home = _model_device(model)
    with _on_device(model, device, home):
        acc = _head_inputs_gram(model, layer.linear, calib_ids, device, batch_size)
        solved = _solve_layer(layer, acc.gram(), acc.n, settings)
        _write_back(layer.linear, solved.weights)
        return solved.record


def _untie_output_embeddings(model: nn.Module) -> None:
    """Give a head tied to the input embeddings its own copy, so pruning it keeps them dense."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _head_inputs_gram(model: nn.Module, head: nn.Linear, calib_ids: torch.Tensor, device: torch.device,
                      batch_size: int) -> _GramAccumulator:
    """The Gram accumulator of ``head``'s inputs over the calibration ids (forwards stop there)."""
    acc = _GramAccumulator(head.in_features, device, stop=True)
    handle = head.register_forward_pre_hook(acc)
    try:
        with torch.no_grad():
            for chunk in calib_ids.split(batch_size):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return acc
