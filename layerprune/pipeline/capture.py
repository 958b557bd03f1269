r"""What a block sees: its recorded inputs, its linears grouped by shared input, their Gram
matrices, and the block's outputs that feed the next block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from layerprune.problems import LayerProblem, ProblemError

from .structure import (_eval_mode, _model_device, _on_device, _outside_blocks_on, _qualified, _to, find_blocks,
                        find_linears)

__all__ = ["CALIB_BATCH", "capture_block_inputs", "linear_groups", "layer_problems", "iter_layer_problems"]

#: calibration sequences per forward mini-batch
CALIB_BATCH = 8


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""



@dataclass
class _Batch:
    """One mini-batch of a block's inputs: the hidden states and the rest of the real call."""

    hidden: torch.Tensor          # (B, T, H)
    args: tuple                   # extra positional arguments of the block's call
    kwargs: dict                  # attention mask, position ids / embeddings, cache position, …


def capture_block_inputs(model: nn.Module, blocks: Sequence[nn.Module], calib_ids: torch.Tensor,
                         device: torch.device, batch_size: int = CALIB_BATCH) -> list[_Batch]:
    """Run the calibration ids through the model up to the first block; record its calls.

    Parameters
    ----------
    calib_ids : (nsamples, seqlen) LongTensor

    Returns
    -------
    list of mini-batches, tensors on ``device``.
    """
    store: list[_Batch] = []

    def pre_hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items()}
        store.append(_Batch(hidden.detach().to(device), _to(rest, device), _to(kwargs, device)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with _outside_blocks_on(model, blocks, device), torch.no_grad():
            for chunk in calib_ids.split(batch_size):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    continue
                raise ProblemError("the first decoder block was never called by the model's forward")
    finally:
        handle.remove()
    return store


def _call_block(block: nn.Module, b: _Batch) -> torch.Tensor:
    out = block(b.hidden, *b.args, **b.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def linear_groups(block: nn.Module, linears: dict[str, nn.Linear], probe: _Batch) -> list[list[str]]:
    """Group the block's linears by shared input tensor, groups in forward order.

    A probe forward on one sequence records, for each linear's first call, its input tensor;
    linears handed the same tensor object (``q,k,v``; ``gate,up``) share one Gram matrix.
    Linears never called are left out.
    """
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, lin in linears.items():
        def hook(module, args, _name=name):
            if not any(n == _name for n, _ in seen):
                seen.append((_name, args[0]))
        handles.append(lin.register_forward_pre_hook(hook))
    one = _sequences(probe, 0, 1)
    try:
        with torch.no_grad():
            _call_block(block, one)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in seen:
        for g, xin in zip(groups, inputs):
            if xin is x:
                g.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    return groups


def _sequences(b: _Batch, start: int, stop: int) -> _Batch:
    """Sequences ``start:stop`` of a mini-batch: its hidden states and the batched tensors of its
    kwargs (those whose dim 0 has the batch's size; the others are shared by every sequence)."""
    batch = b.hidden.shape[0]

    def part(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            return v[start:stop]
        if isinstance(v, tuple):
            return tuple(part(o) for o in v)
        return v
    return _Batch(b.hidden[start:stop], b.args, {k: part(v) for k, v in b.kwargs.items()})


class _GramAccumulator:
    """Forward pre-hook accumulating ``Σ xᵀx`` over tokens in float64.

    ``stop=True`` ends the forward right after (the rest of the block is not needed).
    """

    def __init__(self, d_in: int, device: torch.device, stop: bool = False):
        self.sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.n = 0
        self.stop = stop

    def __call__(self, module, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]
        if self.stop:
            raise _Stop

    def gram(self) -> torch.Tensor:
        """``G = Σ xᵀx / n``: (d_in, d_in) float64."""
        if self.n == 0:
            raise ProblemError("no calibration tokens reached this layer")
        return self.sum / self.n

    def targets(self) -> tuple[None, None]:
        """No dense targets: the layer's own outputs are the target."""
        return None, None


class _TargetAccumulator(_GramAccumulator):
    """Pre-hooks on one linear of the pruned block and on the same linear of its dense twin,
    accumulating in float64, token by token in the same order,

    ``G = Σ x̃ᵀx̃ / n``, ``C = Σ x̃ᵀx / n`` and ``G0 = Σ xᵀx / n``

    with ``x̃`` the pruned model's inputs to the linear and ``x`` the dense model's (CONTRACT.md's
    dense targets). The pruned block runs first on a batch (its inputs are kept, in their own
    dtype, until the dense twin has run on the same batch); ``stop=True`` ends each forward
    right after the linear.
    """

    def __init__(self, d_in: int, device: torch.device, stop: bool = False):
        super().__init__(d_in, device, stop)  # ``sum``, ``n``, ``stop`` and ``gram()``
        self.cross = torch.zeros_like(self.sum)
        self.dense_sum = torch.zeros_like(self.sum)
        self._pending: list[torch.Tensor] = []

    def pruned_hook(self, module, args):
        self._pending.append(args[0].detach())
        if self.stop:
            raise _Stop

    __call__ = pruned_hook  # the hook on the pruned block (it accumulates with the dense one)

    def dense_hook(self, module, args):
        if not self._pending:
            raise ProblemError("the dense block called a linear the pruned block did not")
        xt = self._pending.pop(0)
        x = args[0].detach()
        if xt.shape != x.shape:
            raise ProblemError(f"the pruned and dense inputs of a linear differ in shape: "
                               f"{tuple(xt.shape)} vs {tuple(x.shape)}")
        xt = xt.reshape(-1, xt.shape[-1]).to(torch.float64)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(xt.T, xt)
        self.cross.addmm_(xt.T, x)
        self.dense_sum.addmm_(x.T, x)
        self.n += x.shape[0]
        if self.stop:
            raise _Stop

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, G0) = (Σ x̃ᵀx / n, Σ xᵀx / n)``: (d_in, d_in) float64 each."""
        self.gram()
        return self.cross / self.n, self.dense_sum / self.n


def _accumulate(block: nn.Module, batches: list[_Batch], linears: dict[str, nn.Linear],
                groups: list[list[str]], stop_early: bool) -> dict[str, _GramAccumulator]:
    """Run the block over all batches; return one Gram accumulator per group (keyed by its
    first member). With ``stop_early`` (a single group) the forward stops at that group."""
    accs, handles = {}, []
    for g in groups:
        lin = linears[g[0]]
        acc = _GramAccumulator(lin.in_features, lin.weight.device, stop=stop_early)
        accs[g[0]] = acc
        handles.append(lin.register_forward_pre_hook(acc))
    _run_hooked(handles, [[(block, b)] for b in batches])
    return accs


def _accumulate_targets(block: nn.Module, dense_block: nn.Module, batches: list[_Batch], dense_batches: list[_Batch],
                        linears: dict[str, nn.Linear], dense_linears: dict[str, nn.Linear], groups: list[list[str]],
                        stop_early: bool) -> dict[str, _TargetAccumulator]:
    """:func:`_accumulate` with dense targets: per batch the pruned block on the pruned model's
    hidden states, then its dense twin on the dense model's (same tokens); one
    :class:`_TargetAccumulator` per group, keyed by its first member."""
    accs, handles = {}, []
    for g in groups:
        lin = linears[g[0]]
        acc = _TargetAccumulator(lin.in_features, lin.weight.device, stop=stop_early)
        accs[g[0]] = acc
        handles.append(lin.register_forward_pre_hook(acc.pruned_hook))
        handles.append(dense_linears[g[0]].register_forward_pre_hook(acc.dense_hook))
    _run_hooked(handles, [[(block, b), (dense_block, db)] for b, db in zip(batches, dense_batches, strict=True)])
    return accs


def _run_hooked(handles: list, steps: list[list[tuple[nn.Module, _Batch]]]) -> None:
    """Run each step's ``(module, batch)`` calls in order without gradients (a call a hook
    stops with :class:`_Stop` ends early), then remove the hooks ``handles``."""
    try:
        with torch.no_grad():
            for step in steps:
                for module, batch in step:
                    try:
                        _call_block(module, batch)
                    except _Stop:
                        pass
    finally:
        for h in handles:
            h.remove()


def _propagate(block: nn.Module, batches: list[_Batch]) -> None:
    """Replace each batch's hidden states by the block's outputs (the next block's inputs)."""
    with torch.no_grad():
        for b in batches:
            b.hidden = _call_block(block, b)


def layer_problems(model: nn.Module, calib_ids: torch.Tensor, block: int, *, pattern: str = "per-row:0.5",
                   objective: str = "mask", device: Union[None, str, torch.device] = None,
                   batch_size: int = CALIB_BATCH) -> dict[str, LayerProblem]:
    """The layer problems of one decoder block of the (unchanged) model: real instances.

    The calibration ids run through the dense model up to block ``block``; each target linear
    of that block gets its problem with ``W`` its weights and ``G`` the mean ``xᵀx`` of its
    inputs (float64), as :func:`prune_model` would build them had the earlier blocks been kept
    dense. Nothing in the model changes. ``save_instance(path, p.W, p.G)`` (from
    ``layerprune.problems``) writes one as a CONTRACT instance file.

    Parameters
    ----------
    model : a Hugging Face causal LM
    calib_ids : (nsamples, seqlen) LongTensor
    block : index of the decoder block (negative counts from the end)
    pattern, objective : of the problems (fractions resolve per layer width)

    Returns
    -------
    {qualified module name: LayerProblem}, in forward order.
    """
    for _, problems in iter_layer_problems(model, calib_ids, [block], pattern=pattern, objective=objective,
                                           device=device, batch_size=batch_size):
        return problems
    raise AssertionError("iter_layer_problems yielded nothing for one block")


def iter_layer_problems(model: nn.Module, calib_ids: torch.Tensor, blocks: Sequence[int], *,
                        pattern: str = "per-row:0.5", objective: str = "mask",
                        device: Union[None, str, torch.device] = None, batch_size: int = CALIB_BATCH):
    """:func:`layer_problems` of several blocks in one pass through the model.

    The calibration ids go through the dense model once, up to the last requested block, so
    blocks ``[3, 14]`` cost 15 block forwards (plus one Gram pass per requested block) rather
    than 3 + 14 for two separate calls. Every index is checked before any work.

    Yields
    ------
    (block index, {qualified module name: LayerProblem}) in ascending block order; indices
    are normalised (negative ones count from the end) and repeats yield once.
    """
    all_blocks, path = find_blocks(model)
    n = len(all_blocks)
    for b in blocks:
        if not -n <= b < n:
            raise ProblemError(f"block {b} out of range: the model has {n} blocks")
    wanted = sorted({b % n for b in blocks})
    if not wanted:
        return
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    with _eval_mode(model):
        batches = capture_block_inputs(model, all_blocks, calib_ids, device, batch_size)
        for i in range(wanted[-1] + 1):
            out: dict[str, LayerProblem] = {}
            with _on_device(all_blocks[i], device, home):
                if i in wanted:
                    out = _block_problems(all_blocks[i], batches, path, i, pattern, objective)
                if i < wanted[-1]:
                    _propagate(all_blocks[i], batches)
            if i in wanted:
                yield i, out


def _block_problems(block: nn.Module, batches: list[_Batch], path: str, index: int, pattern: str,
                    objective: str) -> dict[str, LayerProblem]:
    """Every target linear's problem of one block, from its recorded inputs."""
    linears = find_linears(block)
    groups = linear_groups(block, linears, batches[0])
    accs = _accumulate(block, batches, linears, groups, stop_early=False)
    out: dict[str, LayerProblem] = {}
    for g in groups:
        G = accs[g[0]].gram()
        for local in g:
            out[_qualified(path, index, local)] = LayerProblem.create(linears[local].weight.detach(), G,
                                                                      pattern=pattern, objective=objective)
    return out
