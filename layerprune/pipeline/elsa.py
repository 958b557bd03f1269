r"""Whole-model ADMM on the language-modelling loss (Elsa: Lee, Jang, Lee, Alistarh, Lee; ICLR 2026).

Layer-wise methods minimise each linear's reconstruction error; past 60–70 % sparsity that
surrogate breaks down. Elsa prunes on the model's own loss instead:

.. math::

    \min_{w}\; L(w) \quad \text{s.t.}\quad w_\ell \in S_\ell \text{ for every decoder linear } \ell,

:math:`S_\ell` the layer's sparsity pattern (:mod:`layerprune.problems.patterns`). ADMM splits
:math:`w = z`, :math:`z \in S`, with the scaled dual :math:`u`; the augmented Lagrangian is
:math:`L(w) + \frac{\lambda}{2}\lVert w - z + u\rVert^2`. As in the authors' code (first commit
of the fork ``cosmos1030/elsa``, ``lib/optimizers.py``):

- **w-step**, every optimiser step: the loss gradient of a batch, clipped to norm ``clip``
  over all trainable parameters, plus the penalty's gradient :math:`\lambda(w - z + u)` (not
  clipped), then one Adam step (β = (0.9, 0.95), no weight decay, learning rate decaying
  linearly to 0 after ``warmup`` steps). Every other parameter (norms, embeddings) trains too.
- **z- and u-steps**, after steps 1, 1 + interval, 1 + 2·interval, …:
  :math:`z \leftarrow \mathrm{Proj}_S(w + u)`, :math:`u \leftarrow u + w - z`.
- **λ** constant (``lmda``) or on a schedule from ``lmda_init`` to ``lmda`` (linear, cosine,
  exponential over the steps), the dual rescaled by :math:`\lambda_\text{old}/\lambda_\text{new}`
  when λ changes so that :math:`\lambda u` (the unscaled dual) is kept.
- **At the end** :math:`w \leftarrow \mathrm{Proj}_S(w)`: the model satisfies the pattern
  exactly.

:math:`\mathrm{Proj}_S(v) = v \odot M`, :math:`M` the pattern's rounding of a score
(:meth:`~layerprune.problems.patterns.PerRow.round`: the top entries of each row, block of M,
layer, or the top columns by their summed score). With the score :math:`v^2` it is the
Euclidean projection onto :math:`S` (for ``columns`` too: a column's summed :math:`v^2` is its
squared norm). ``projection=second-moment`` scores :math:`\hat v \odot v^2`, :math:`\hat v`
Adam's second-moment estimate: the projection in the metric of Adam's diagonal preconditioner
(the authors' "objective-aware" option).

Start: :math:`z_0 = \mathrm{Proj}_S(w_0)`, :math:`u_0 = 0`, :math:`w_0` the model as given — the
dense model (as published) or a layer-wise pruned one (a warm start).

Cost per step: one forward and backward of ``batch`` windows (``micro_batch`` at a time) and
one Adam step; per z-update one pass over the pruned weights and a sort per layer. Memory:
the model, its gradient, Adam's two moments, and :math:`z, u` for the pruned weights (about
5 × the model's float32 size), plus the activations of ``micro_batch`` windows
(``checkpointing`` keeps one block's).

The residual :math:`\lVert w - z\rVert / \lVert w\rVert` over all pruned weights measures how far
the weights still are from the pattern; it falls as the run converges.

The **control** (``constrained=false``) is the same loop, windows and optimiser with no
penalty and no projection: the dense model fine-tuned on the same tokens. What Elsa gains
beyond it is what the sparsity-aware optimisation buys, not domain adaptation.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from layerprune.data import random_windows
from layerprune.problems import parse_pattern
from layerprune.settings import SettingError
from layerprune.solvers.options import Option, OptionError

from ..report import pack_mask

__all__ = ["ELSA", "DENSE_START", "DEFAULT_WARM_START", "ELSA_OPTIONS", "ElsaOptions", "ElsaResult", "ElsaLayer", "parse_elsa_options", "project",
           "global_admm", "training_windows", "check_checkpoint"]

#: the ``--solver`` name of whole-model ADMM
ELSA = "elsa"
#: ``--init`` of an Elsa run that starts from the dense model (as published)
DENSE_START = "dense"
#: the layer-wise warm start of an Elsa run without ``--init`` (docs/DECISIONS.md: from the dense
#: model the weights need far more steps than a CPU budget gives; from ADMM's prune Elsa ends far
#: below where it ends from Wanda's)
DEFAULT_WARM_START = "admm"

SCHEDULES = ("constant", "linear", "cosine", "exponential")
PROJECTIONS = ("magnitude", "second-moment")
AUTOCASTS = ("none", "bfloat16", "float16")

#: Elsa's options (``--solver elsa --solver-option KEY=VALUE``); defaults: the published ones
#: (lr 2e-4, λ 0.01, β = (0.9, 0.95), clip 1, linear decay) with steps, batch and interval
#: scaled to the bundled model on two CPU cores (docs/DECISIONS.md)
ELSA_OPTIONS: tuple[Option, ...] = (
    Option("steps", int, 128, "optimiser steps", low=1),
    Option("batch", int, 8, "windows (of --seqlen tokens) per step", low=1),
    Option("micro_batch", int, None, "windows per forward/backward (gradient accumulation; default: batch)",
           low=1),
    Option("lr", float, 2e-4, "Adam's learning rate (decays linearly to 0)", low=0, low_open=True),
    Option("warmup", int, 0, "steps of linear learning-rate warm-up", low=0),
    Option("lmda", float, 0.01, "penalty λ (the final one under a schedule)", low=0),
    Option("lmda_init", float, 0.0, "λ at step 0 under a schedule", low=0),
    Option("lmda_schedule", str, "constant", "how λ moves from lmda_init to lmda", choices=SCHEDULES),
    Option("interval", int, 8, "steps between z- and u-updates", low=1),
    Option("projection", str, "magnitude", "score of the projection: v² (Euclidean) or Adam's second "
           "moment × v²", choices=PROJECTIONS),
    Option("clip", float, 1.0, "gradient-norm clip of the loss gradient (0: none)", low=0),
    Option("beta1", float, 0.9, "Adam's β₁", low=0, high=1, high_open=True),
    Option("beta2", float, 0.95, "Adam's β₂", low=0, high=1, high_open=True),
    Option("checkpointing", bool, False, "gradient checkpointing (less activation memory, ~1.3× the time)"),
    Option("autocast", str, "none", "mixed-precision forward (weights and Adam stay float32)", choices=AUTOCASTS),
    Option("constrained", bool, True, "false: the control — the same loop without penalty or projection"),
    Option("checkpoint", str, None, "file for the run's state, written every checkpoint_every steps and on "
           "Ctrl-C; a run given an existing one resumes from it (removed when the run ends)"),
    Option("checkpoint_every", int, 16, "steps between checkpoint writes", low=1),
)
#: options that do not change what a run computes (a checkpoint resumes across them)
_BOOKKEEPING = ("checkpoint", "checkpoint_every")
_DEFAULTS = {o.name: o.default for o in ELSA_OPTIONS}


@dataclass(frozen=True)
class ElsaOptions:
    """Elsa's settings, one field per :data:`ELSA_OPTIONS` entry (its default declared there)."""

    steps: int = _DEFAULTS["steps"]
    batch: int = _DEFAULTS["batch"]
    micro_batch: Optional[int] = _DEFAULTS["micro_batch"]
    lr: float = _DEFAULTS["lr"]
    warmup: int = _DEFAULTS["warmup"]
    lmda: float = _DEFAULTS["lmda"]
    lmda_init: float = _DEFAULTS["lmda_init"]
    lmda_schedule: str = _DEFAULTS["lmda_schedule"]
    interval: int = _DEFAULTS["interval"]
    projection: str = _DEFAULTS["projection"]
    clip: float = _DEFAULTS["clip"]
    beta1: float = _DEFAULTS["beta1"]
    beta2: float = _DEFAULTS["beta2"]
    checkpointing: bool = _DEFAULTS["checkpointing"]
    autocast: str = _DEFAULTS["autocast"]
    constrained: bool = _DEFAULTS["constrained"]
    checkpoint: Optional[str] = _DEFAULTS["checkpoint"]
    checkpoint_every: int = _DEFAULTS["checkpoint_every"]

    @property
    def micro(self) -> int:
        """Windows per forward/backward."""
        return min(self.micro_batch or self.batch, self.batch)

    def lmda_at(self, step: int) -> float:
        """λ after ``step`` of :attr:`steps` steps."""
        if self.lmda_schedule == "constant":
            return self.lmda
        t = min(step / self.steps, 1.0)
        s0, s1 = self.lmda_init, self.lmda
        if self.lmda_schedule == "linear":
            return s0 + (s1 - s0) * t
        if self.lmda_schedule == "cosine":
            return s0 + (s1 - s0) * 0.5 * (1.0 - math.cos(math.pi * t))
        s0 = max(s0, 1e-12)        # exponential: from lmda_init (or 1e-12) to lmda
        return s0 * (s1 / s0) ** t

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step``: linear warm-up, then linear decay to 0."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.steps - step) / max(1, self.steps - self.warmup))


def parse_elsa_options(options: Optional[dict]) -> ElsaOptions:
    """``--solver-option`` values for ``elsa`` checked and converted.

    Raises
    ------
    SettingError
        One line: an unknown key, a value out of its range, or a schedule without its ends.
    """
    specs = {o.name: o for o in ELSA_OPTIONS}
    values = {}
    for key, value in (options or {}).items():
        if key not in specs:
            raise SettingError(f"--solver-option {key}: elsa has no such option (it takes "
                               f"{', '.join(specs)})")
        try:
            values[key] = specs[key].parse(value)
        except OptionError as exc:
            raise SettingError(f"--solver-option {key}: {exc}") from None
    out = ElsaOptions(**values)
    if out.lmda_schedule == "exponential" and out.lmda <= 0:
        raise SettingError("--solver-option lmda: an exponential λ schedule needs lmda > 0")
    if out.warmup >= out.steps:
        raise SettingError(f"--solver-option warmup={out.warmup}: must be below steps={out.steps}")
    return out


def project(v: torch.Tensor, pattern: str, weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection of ``v`` onto a pattern and its mask.

    Parameters
    ----------
    v : (d_out, d_in) tensor
    pattern : pattern string (:func:`~layerprune.problems.parse_pattern`), bound to the shape
    weight : (d_out, d_in) non-negative metric or None; scores are ``weight · v²`` (``v²``
        without: the Euclidean projection)

    Returns
    -------
    (d_out, d_in) tensor ``v ⊙ M`` in ``v``'s dtype, and the (d_out, d_in) bool mask M.
    """
    score = v.detach().float().square()
    if weight is not None:
        score = score * weight.float()
    mask = parse_pattern(pattern).round(score)
    return v * mask.to(v.dtype), mask


@dataclass
class ElsaLayer:
    """One pruned linear: its name in the model, the module and its pattern string."""

    name: str
    linear: nn.Linear
    pattern: str


@dataclass
class ElsaResult:
    """What a run did.

    Attributes
    ----------
    options : the settings (:class:`ElsaOptions` as a dict)
    steps_done : optimiser steps run (fewer than ``options["steps"]`` when interrupted), those
        of an earlier run resumed from a checkpoint included
    resumed_at : the step a checkpoint resumed the run from (0: a fresh run)
    tokens : training tokens seen (steps_done × batch × window length)
    interrupted : stopped by Ctrl-C; the final projection still ran
    seconds : wall time of the loop and the final projection
    history : one entry per step: ``step``, ``loss``, ``grad_norm`` (before clipping), ``lr``,
        ``lmda``, and at z-updates ``residual`` (‖w − z‖/‖w‖ over the pruned weights, after
        the update) and ``mask_change`` (fraction of the pruned weights' mask that flipped)
    final_residual : ‖w − Proj(w)‖/‖w‖ just before the final projection (0 for the control)
    masks : {layer name: packed mask} of the final weights (none for the control)
    """

    options: dict
    steps_done: int = 0
    resumed_at: int = 0
    tokens: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    history: list = field(default_factory=list)
    final_residual: Optional[float] = None
    masks: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("masks")
        return d


def training_windows(ids: torch.Tensor, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``seqlen`` consecutive tokens of ``ids`` (1-D), seeded by
    ``seed + 1`` (not the calibration set's windows, :func:`layerprune.data.random_windows`).

    Windows may repeat: a long run passes over a short text several times.

    Returns
    -------
    (count, seqlen) LongTensor
    """
    return random_windows(ids, count, seqlen, int(seed) + 1)


class _Split:
    """The ADMM variables of the pruned linears: z, u (float32, on the model's device)."""

    def __init__(self, layers: list[ElsaLayer]):
        self.layers = layers
        self.z, self.u = [], []
        for layer in layers:
            w = layer.linear.weight.detach().float()
            self.z.append(project(w, layer.pattern)[0])
            self.u.append(torch.zeros_like(w))

    @torch.no_grad()
    def add_penalty_gradients(self, lmda: float) -> None:
        """grad += λ(w − z + u) on every pruned weight."""
        for layer, z, u in zip(self.layers, self.z, self.u):
            w = layer.linear.weight
            w.grad.add_((w.detach().float() - z + u).to(w.grad.dtype), alpha=lmda)

    @torch.no_grad()
    def update(self, metric: Callable[[nn.Parameter], Optional[torch.Tensor]]) -> tuple[float, float]:
        """``z ← Proj(w + u)``; ``u ← u + w − z``. Returns the residual ‖w − z‖/‖w‖ and the
        fraction of mask entries that changed."""
        diff2 = norm2 = flips = total = 0.0
        for i, layer in enumerate(self.layers):
            w = layer.linear.weight.detach().float()
            old = self.z[i] != 0
            self.z[i], mask = project(w + self.u[i], layer.pattern, metric(layer.linear.weight))
            self.u[i].add_(w - self.z[i])
            diff2 += float((w - self.z[i]).square().sum())
            norm2 += float(w.square().sum())
            flips += float((old ^ mask).sum())
            total += mask.numel()
        return math.sqrt(diff2 / max(norm2, 1e-300)), flips / max(total, 1)

    @torch.no_grad()
    def rescale(self, old: float, new: float) -> None:
        """λ changes from ``old`` to ``new``: ``u ← u·old/new`` keeps the unscaled dual λu."""
        if new > 0 and old != new:
            for u in self.u:
                u.mul_(old / new)


def global_admm(model: nn.Module, windows: torch.Tensor, layers: list[ElsaLayer], options: ElsaOptions, *,
                device: Optional[torch.device] = None, progress: bool = True,
                callback: Optional[Callable[[dict], Any]] = None) -> ElsaResult:
    """Run Elsa's ADMM (or the control) on ``model`` in place.

    Parameters
    ----------
    model : a Hugging Face causal LM (``model(input_ids=…, labels=…).loss``), float32 weights
    windows : (steps · batch, seqlen) LongTensor: the training windows, ``batch`` per step in order
    layers : the pruned linears with their patterns
    options : the settings
    device : where the model trains (default: where it is); it goes back after
    progress : a tqdm bar with the loss and the residual
    callback : called with each step's history entry (raising ``KeyboardInterrupt`` in it
        stops the run as Ctrl-C does)

    Returns
    -------
    ElsaResult. Ctrl-C stops the loop after the current step; the final projection runs
    either way, so the model always satisfies every layer's pattern (the control excepted).
    """
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    need = options.steps * options.batch
    if windows.shape[0] < need:
        raise SettingError(f"{need} training windows needed, {windows.shape[0]} given")
    result = ElsaResult(options=asdict(options))
    started = time.perf_counter()
    trainable = _trainable(model)
    model.to(device)
    was_training, cache = model.training, getattr(model.config, "use_cache", None)
    try:
        model.train()
        model.config.use_cache = False
        if options.checkpointing:
            _checkpointing(model, True)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=options.lr,
                               betas=(options.beta1, options.beta2), weight_decay=0.0)
        split = _Split(layers) if options.constrained else None
        state = _Checkpoint(options, layers, windows)
        lmda = state.resume(model, opt, split, result) if state.exists() else options.lmda_at(0)
        _train(model, opt, split, state, windows, options, result, lmda, device, progress, callback)
        if split is not None:
            result.final_residual, result.masks = _final_projection(layers, _metric(opt, options))
        else:
            result.final_residual = 0.0
        del opt
    finally:
        if options.checkpointing:
            _checkpointing(model, False)
        model.zero_grad(set_to_none=True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.train(was_training)
        if cache is not None:
            model.config.use_cache = cache
        model.to(home)
    result.seconds = time.perf_counter() - started
    return result


def _train(model: nn.Module, opt, split: Optional["_Split"], state: "_Checkpoint", windows: torch.Tensor,
           options: ElsaOptions, result: ElsaResult, lmda: float, device: torch.device, progress: bool,
           callback: Optional[Callable[[dict], Any]]) -> None:
    """The steps from ``result.steps_done`` on: each an Adam step, every ``interval`` the z/u
    update (and λ's change), the history, the checkpoint. Ctrl-C (or ``callback`` raising
    ``KeyboardInterrupt``) ends it with ``result.interrupted`` and the state saved; a run that
    completes removes its checkpoint."""
    from tqdm.auto import tqdm

    bar = tqdm(total=options.steps, initial=result.steps_done, disable=not progress, desc="elsa", unit="step")
    try:
        for step in range(result.steps_done, options.steps):
            batch = windows[step * options.batch:(step + 1) * options.batch]
            entry = _step(model, opt, batch, options, step, lmda, split, device)
            if split is not None and step % options.interval == 0:
                new = options.lmda_at(step + 1)
                entry["residual"], entry["mask_change"] = split.update(_metric(opt, options))
                split.rescale(lmda, new)
                lmda = new
            result.history.append(entry)
            result.steps_done = step + 1
            result.tokens = result.steps_done * batch.numel()
            bar.update(1)
            bar.set_postfix_str(_postfix(entry, result.history))
            if result.steps_done % options.checkpoint_every == 0 and result.steps_done < options.steps:
                state.save(model, opt, split, result, lmda)
            if callback is not None:
                callback(entry)
    except KeyboardInterrupt:
        result.interrupted = True
        state.save(model, opt, split, result, lmda)
    finally:
        bar.close()
    if not result.interrupted:
        state.remove()


def _metric(opt, options: ElsaOptions) -> Callable[[nn.Parameter], Optional[torch.Tensor]]:
    """The projection's metric per weight: Adam's second moment, or none (Euclidean)."""
    return _second_moment(opt) if options.projection == "second-moment" else (lambda p: None)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of a Hugging Face model on or off, by the name its
    ``transformers`` release gives it."""
    verb = "enable" if on else "disable"
    method = getattr(model, f"activation_checkpointing_{verb}", None) or getattr(model, f"gradient_checkpointing_{verb}")
    method()


class _Checkpoint:
    """The run's state in ``options.checkpoint`` (nothing without one): the step, every
    parameter, Adam's state, z, u, λ and the history, with a fingerprint of what the run
    computes (options but the checkpoint's own, each layer's name and pattern, the training
    windows). Written atomically; a run resumes only from its own fingerprint."""

    def __init__(self, options: ElsaOptions, layers: list[ElsaLayer], windows: torch.Tensor):
        import hashlib

        self.path = None if options.checkpoint is None else Path(options.checkpoint).expanduser()
        settings = {k: v for k, v in asdict(options).items() if k not in _BOOKKEEPING}
        digest = hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()
        self.fingerprint = {"options": settings, "layers": [[layer.name, layer.pattern] for layer in layers],
                            "windows": [list(windows.shape), digest]}

    def exists(self) -> bool:
        return self.path is not None and self.path.is_file()

    def load(self, *, patterns: bool = True) -> dict:
        """The saved state, checked to be this run's (``patterns=False``: every layer's name but
        not its pattern, for a check made before an allocation gives the patterns; the tensors
        are then memory-mapped, not read).

        Raises
        ------
        SettingError
            The file cannot be read or was written by another run.
        """
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False, mmap=not patterns)
        except Exception as exc:  # noqa: BLE001 — any unreadable file is one line
            raise SettingError(f"--solver-option checkpoint={self.path}: cannot be read ({exc})") from None
        mine, theirs = self.fingerprint, state.get("fingerprint") if isinstance(state, dict) else None
        if not patterns and isinstance(theirs, dict):
            mine = dict(mine, layers=[name for name, _ in mine["layers"]])
            theirs = dict(theirs, layers=[name for name, _ in theirs.get("layers", [])])
        if mine != theirs:
            raise SettingError(f"--solver-option checkpoint={self.path}: written by another run (other options, "
                               f"layers, patterns or training windows); remove it or give another path")
        return state

    def resume(self, model: nn.Module, opt, split: Optional["_Split"], result: ElsaResult) -> float:
        """Load the state into the run; the λ it had."""
        state = self.load()
        with torch.no_grad():
            for p, saved in zip(model.parameters(), state["parameters"]):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        if split is not None:
            split.z = [z.to(w.device) for z, w in zip(state["z"], split.z)]
            split.u = [u.to(w.device) for u, w in zip(state["u"], split.u)]
        result.history = state["history"]
        result.steps_done = result.resumed_at = state["step"]
        result.tokens = state["tokens"]
        return state["lmda"]

    def save(self, model: nn.Module, opt, split: Optional["_Split"], result: ElsaResult, lmda: float) -> None:
        if self.path is None:
            return
        from layerprune.problems import atomic_write

        state = {"fingerprint": self.fingerprint, "step": result.steps_done, "tokens": result.tokens,
                 "lmda": lmda, "history": result.history, "optimizer": opt.state_dict(),
                 "parameters": [p.detach().cpu() for p in model.parameters()],
                 "z": [] if split is None else [z.cpu() for z in split.z],
                 "u": [] if split is None else [u.cpu() for u in split.u]}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def remove(self) -> None:
        if self.exists():
            self.path.unlink()


def check_checkpoint(options: ElsaOptions, layers: list[ElsaLayer], windows: torch.Tensor) -> Optional[int]:
    """Before any long work: the step an existing ``checkpoint`` file would resume from, or None
    without one. Checks the file is this run's (options, windows, layer names; patterns are
    checked again when the run resumes). Raises SettingError otherwise."""
    state = _Checkpoint(options, layers, windows)
    return state.load(patterns=False)["step"] if state.exists() else None


def _trainable(model: nn.Module) -> dict[nn.Parameter, bool]:
    """Every parameter's ``requires_grad`` as it was; all are made trainable for the run."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(True)
    return flags


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, options: ElsaOptions, step: int,
          lmda: float, split: Optional[_Split], device: torch.device) -> dict:
    """One optimiser step on ``batch`` (micro-batches accumulated); its history entry."""
    opt.zero_grad(set_to_none=True)
    micro, loss_sum = options.micro, 0.0
    for start in range(0, batch.shape[0], micro):
        ids = batch[start:start + micro].to(device)
        with _autocast(options.autocast, device):
            loss = model(input_ids=ids, labels=ids).loss
        (loss * (ids.shape[0] / batch.shape[0])).backward()
        loss_sum += float(loss.detach()) * ids.shape[0]
    params = [p for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, options.clip if options.clip > 0 else math.inf))
    if split is not None:
        split.add_penalty_gradients(lmda)
    lr = options.lr * options.lr_factor(step)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return {"step": step + 1, "loss": loss_sum / batch.shape[0], "grad_norm": norm, "lr": lr,
            "lmda": lmda if split is not None else 0.0}


def _autocast(kind: str, device: torch.device):
    import contextlib

    if kind == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, kind))


def _second_moment(opt: torch.optim.Optimizer) -> Callable[[nn.Parameter], Optional[torch.Tensor]]:
    """The metric of ``projection=second-moment``: Adam's bias-corrected second moment."""
    beta2 = opt.param_groups[0]["betas"][1]

    def metric(p: nn.Parameter) -> Optional[torch.Tensor]:
        state = opt.state.get(p, {})
        v = state.get("exp_avg_sq")
        if v is None:
            return None
        t = float(state["step"])
        return v / (1.0 - beta2 ** max(t, 1.0))
    return metric


@torch.no_grad()
def _final_projection(layers: list[ElsaLayer], metric) -> tuple[float, dict]:
    """``w ← Proj(w)`` on every pruned linear; the residual before it and the packed masks."""
    diff2 = norm2 = 0.0
    masks = {}
    for layer in layers:
        w = layer.linear.weight
        projected, mask = project(w.detach().float(), layer.pattern, metric(w))
        diff2 += float((w.detach().float() - projected).square().sum())
        norm2 += float(w.detach().float().square().sum())
        w.copy_(projected.to(w.dtype))
        masks[layer.name] = pack_mask(mask)
    return math.sqrt(diff2 / max(norm2, 1e-300)), masks


def _postfix(entry: dict, history: list) -> str:
    residual = next((h["residual"] for h in reversed(history) if "residual" in h), None)
    text = f"loss {entry['loss']:.3f}"
    return text if residual is None else f"{text} residual {residual:.3g}"
