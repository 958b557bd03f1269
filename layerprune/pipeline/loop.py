"""The pruning loop: block after block, solve every layer, write it back, propagate."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from layerprune.problems import LayerProblem, ProblemError
from layerprune.solvers import Params, Solver, SolverError, make_solver

from ..report import LayerRecord, pack_mask
from .capture import (CALIB_BATCH, _accumulate, _GramAccumulator, _propagate, _Stop,
                      capture_block_inputs, linear_groups)
from .measure import release_memory
from .plan import _check_solver_takes, _Layer, _plan, _resolve_solver
from .structure import _model_device, find_blocks

__all__ = ["PruningInterrupted", "prune_model"]


class PruningInterrupted(KeyboardInterrupt):
    """Pruning stopped by Ctrl-C. The model is left partially pruned: ``records`` lists the
    layers already written (each layer is written whole or not at all)."""

    def __init__(self, records: list, total: int):
        super().__init__(f"interrupted after {len(records)} of {total} layers")
        self.records = records
        self.total = total



def _wanda_result(problem: LayerProblem, params: Params):
    return make_solver("wanda").solve(problem, params=params)



def _solve_layer(layer: _Layer, G: torch.Tensor, ntokens: int, *, pattern: str, objective: str,
                 solvers: dict[str, Solver], init: Optional[str], params: Params) -> LayerRecord:
    """Build the layer's problem, solve it, write the pruned weights back, return its record."""
    lin = layer.linear
    problem = LayerProblem.create(lin.weight.detach(), G, pattern=pattern, objective=objective)
    try:
        wanda = _wanda_result(problem, params)
    except SolverError:
        wanda = None
    solver = solvers[layer.solver]
    init_mask = None
    if init is not None:
        init_mask = wanda.mask if (init == "wanda" and wanda is not None) else \
            solvers[init].solve(problem, params=params).mask
    elif wanda is not None and solver.init_solver == "wanda":
        init_mask = wanda.mask  # the start it would compute itself: reuse the reference
    try:
        if wanda is not None and solver.name == "wanda" and not solver.options:
            res = wanda  # the reference is this solve
        else:
            res = solver.solve(problem, params=params, init=init_mask)
    except SolverError as exc:
        raise SolverError(f"layer {layer.qualified}: {exc}") from None
    status, limit = res.status.value, res.limit
    if res.mask is None:  # e.g. a MIP stopped before its first incumbent: fall back, say so
        fallback = init_mask if init is not None else (wanda.mask if wanda is not None else None)
        if fallback is None:
            raise SolverError(f"layer {layer.qualified}: solver {layer.solver!r} found no mask ({status})")
        weights = problem.refit(fallback) if objective == "reconstruct" else problem.W.to(torch.float64) * fallback
        mask, value = fallback, problem.objective(fallback)
        limit = f"{limit or status}; fell back to {'init' if init is not None else 'wanda'} mask"
    else:
        weights, mask, value = res.weights, res.mask, res.objective
    lin.weight.data.copy_(weights.to(device=lin.weight.device, dtype=lin.weight.dtype))
    lower = res.lower_bound
    gap = res.gap if res.mask is not None else None
    return LayerRecord(
        block=layer.block, name=layer.qualified, shape=tuple(lin.weight.shape),
        pattern=str(problem.pattern), objective_kind=objective, solver=layer.solver,
        objective=value, wanda_objective=None if wanda is None else wanda.objective,
        lower_bound=lower, bound_source=res.bound_source, gap=gap, status=status, limit=limit,
        seconds=res.seconds, ntokens=ntokens, packed_mask=pack_mask(mask))


def prune_model(model: nn.Module, calib_ids: torch.Tensor, *, solver: Union[str, Solver] = "wanda",
                pattern: str = "per-row:0.5", objective: str = "mask",
                overrides: Optional[dict[str, str]] = None, solver_options: Optional[dict] = None,
                init: Optional[str] = None, params: Optional[Params] = None,
                device: Union[None, str, torch.device] = None, sequential_order: bool = False,
                prune_lm_head: bool = False, progress: bool = True,
                callback: Optional[Callable[[LayerRecord], Any]] = None,
                batch_size: int = CALIB_BATCH) -> list[LayerRecord]:
    """Prune every target linear of every decoder block, block after block.

    Parameters
    ----------
    model : a Hugging Face causal LM (``model(input_ids=…)``), modified in place
    calib_ids : (nsamples, seqlen) LongTensor of calibration tokens
    solver : registry name of the default backend, or a :class:`Solver` instance
    pattern : pattern string; fractions (``per-row:0.5``) resolve per layer width
    objective : ``mask`` or ``reconstruct``
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

    Returns
    -------
    list of LayerRecord, in pruning order (masks attached, on CPU).

    Raises
    ------
    ProblemError : the pattern does not fit a layer (raised before any weight changes)
    SolverError : unknown or unable solver, override naming no layer
    PruningInterrupted : on Ctrl-C; the layers in ``.records`` have been written
    """
    from tqdm.auto import tqdm

    overrides = dict(overrides or {})
    params = params or Params()
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0 or calib_ids.shape[1] < 2:
        raise ProblemError(f"calibration ids must be (nsamples, seqlen) with seqlen ≥ 2, got {tuple(calib_ids.shape)}")
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    blocks, path = find_blocks(model)
    instance = solver if isinstance(solver, Solver) else None
    if instance is not None:
        _check_solver_takes(instance, pattern, objective, "solver")
        solver = instance.name
    plan = _plan(model, blocks, path, pattern, objective, instance or solver, overrides, init, prune_lm_head)
    names = {*overrides.values()} | ({init} if init else set()) | ({solver} if instance is None else set())
    solvers = {n: make_solver(n, **((solver_options or {}) if n == solver else {})) for n in names}
    if instance is not None:
        solvers[solver] = instance
    total = sum(len(layers) for layers in plan) + int(prune_lm_head)
    records: list[LayerRecord] = []
    kw = dict(pattern=pattern, objective=objective, solvers=solvers, init=init, params=params)

    def done(rec: LayerRecord) -> None:
        records.append(rec)
        if callback is not None:
            callback(rec)

    was_training = model.training
    model.eval()
    current = None
    try:
        batches = capture_block_inputs(model, blocks, calib_ids, device, batch_size)
        bar = tqdm(total=total, disable=not progress, desc="pruning", unit="layer")
        for i, (block, layers) in enumerate(zip(blocks, plan)):
            bar.set_postfix_str(f"block {i + 1}/{len(blocks)}")
            current = block
            block.to(device)
            by_local = {lay.local: lay for lay in layers}
            linears = {lay.local: lay.linear for lay in layers}
            groups = linear_groups(block, linears, batches[0])
            if sequential_order:
                for g in groups:
                    acc = _accumulate(block, batches, linears, [g], stop_early=True)[g[0]]
                    G = acc.gram()
                    for local in g:
                        done(_solve_layer(by_local[local], G, acc.n, **kw))
                        bar.update(1)
            else:
                accs = _accumulate(block, batches, linears, groups, stop_early=False)
                for g in groups:
                    G = accs[g[0]].gram()
                    for local in g:
                        done(_solve_layer(by_local[local], G, accs[g[0]].n, **kw))
                        bar.update(1)
                del accs
            called = {n for g in groups for n in g}
            bar.update(len(layers) - len(called))  # linears the forward never calls stay dense
            _propagate(block, batches)
            block.to(home)
            current = None
            release_memory()  # the block's forward and solver temporaries
        if prune_lm_head:
            head_solver = _resolve_solver("lm_head", solver, overrides)
            done(_prune_lm_head(model, calib_ids, device, batch_size, head_solver, **kw))
            bar.update(1)
        bar.close()
    except KeyboardInterrupt:
        raise PruningInterrupted(records, total) from None
    finally:
        if current is not None:
            current.to(home)
        model.train(was_training)
    return records


def _prune_lm_head(model: nn.Module, calib_ids: torch.Tensor, device: torch.device, batch_size: int,
                   solver: str, **kw) -> LayerRecord:
    """Prune the output projection on the inputs it sees from the (already pruned) model."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ProblemError(f"the output projection is a {type(head).__name__}, not a Linear")
    emb = model.get_input_embeddings()
    if emb is not None and head.weight is emb.weight:  # tied: prune a copy, keep embeddings dense
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    home = _model_device(model)
    model.to(device)
    try:
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
        layer = _Layer(-1, "lm_head", "lm_head", head, solver)
        return _solve_layer(layer, acc.gram(), acc.n, **kw)
    finally:
        model.to(home)
