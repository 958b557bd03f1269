"""Where the pruning targets are: decoder blocks, their linears, the model's device, and
moving the parts of a model outside its blocks."""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from layerprune.problems import ProblemError

__all__ = ["find_blocks", "find_linears"]


def find_blocks(model: nn.Module) -> tuple[Sequence[nn.Module], str]:
    """The decoder blocks of ``model`` and their attribute path (``models.decoder_layers``
    when it exists, else the longest ``ModuleList`` of identical modules holding linears)."""
    try:
        from layerprune.models import decoder_layers
    except ImportError:
        return _fallback_blocks(model)
    return decoder_layers(model)


def _fallback_blocks(model: nn.Module) -> tuple[Sequence[nn.Module], str]:
    best, best_path = None, None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best):
            best, best_path = mod, path
    if best is None:
        raise ProblemError(f"cannot find the decoder blocks of {type(model).__name__}")
    return list(best), best_path


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Target linears of one block, by name inside the block (``self_attn.q_proj``, …)."""
    try:
        from layerprune.models import target_linears
    except ImportError:
        return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    return target_linears(block)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(obj: Any, device) -> Any:
    """Move every tensor in a nested structure (tuple/list/dict) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device):
    """Move every parameter and buffer *not* in a decoder block to ``device`` (and back)."""
    inside = {id(m) for b in blocks for m in b.modules()}
    moved = []
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.device != device:
                    moved.append((t, t.data))
                    t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, old in moved:
            t.data = old



def _qualified(path: str, block: int, local: str) -> str:
    """A block linear's name in the model (``model.layers.3.mlp.down_proj``)."""
    return f"{path}.{block}.{local}" if path else f"{block}.{local}"


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode inside, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device, home: torch.device):
    """``module`` moved to ``device`` inside and back to ``home`` after (also on errors)."""
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


def resolve_device(name: Optional[str]) -> torch.device:
    """The compute device a job asks for: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to
    exist here; None is ``cuda`` when available, else ``cpu``.

    Raises
    ------
    SettingError
        An unknown device name, or one this machine does not have (one line).
    """
    from layerprune.settings import SettingError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SettingError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"--device {name}: no CUDA device is available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SettingError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SettingError(f"--device {name}: no MPS device is available on this machine")
        return device
    raise SettingError(f"--device: unsupported device {name!r} (cpu, cuda, cuda:N, mps)")
