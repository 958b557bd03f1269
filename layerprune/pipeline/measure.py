"""Measuring a model: perplexity, sparsity, and handing freed memory back."""
from __future__ import annotations

import ctypes
import functools
import gc
import math
import sys
from typing import Optional

import torch
from torch import nn

from layerprune.problems import ProblemError

from .structure import _model_device, find_blocks, find_linears

__all__ = ["EVAL_BATCH", "EVAL_LOGITS_BYTES", "NLL_CHUNK_ELEMENTS", "perplexity", "sparsity",
           "release_memory"]

#: evaluation windows per forward mini-batch (at most)
EVAL_BATCH = 4
#: at most this many bytes of float32 logits per evaluation forward (fewer windows per batch
#: for large vocabularies / long windows, never fewer than one)
EVAL_LOGITS_BYTES = 64 * 2 ** 20
#: logits per slice of the NLL computation (16 MiB of float32)
NLL_CHUNK_ELEMENTS = 4 * 2 ** 20


def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, device=None,
               batch_size: Optional[int] = None) -> float:
    r"""Perplexity on non-overlapping windows of ``seqlen`` tokens.

    :math:`\exp\big(\frac{1}{N}\sum -\log p(t_{k+1} \mid t_{\le k})\big)`, the next-token NLL
    averaged over every predicted token of every window (``seqlen − 1`` per window); the
    trailing ``T mod seqlen`` tokens are dropped.

    Memory: the logits of one forward are ``batch × seqlen × vocab`` floats (SmolLM2: 48 MiB
    per 256-token window), often more than a decoder block's activations. Windows are batched
    only while their logits stay under :data:`EVAL_LOGITS_BYTES`, and the NLL is taken over
    slices of at most :data:`NLL_CHUNK_ELEMENTS` logits, so no full-size ``log_softmax`` or
    reshaped copy of the logits is made.

    Parameters
    ----------
    ids : (1, T) or (T,) LongTensor
    batch_size : windows per forward (default: as many as fit :data:`EVAL_LOGITS_BYTES`, at
        most :data:`EVAL_BATCH`, at least 1)
    """
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if seqlen < 2 or n == 0:
        raise ProblemError(f"evaluation text has {ids.numel()} tokens: fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].reshape(n, seqlen)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    if batch_size is None:
        vocab = _vocab_size(model)
        batch_size = EVAL_BATCH if vocab is None else \
            max(1, min(EVAL_BATCH, EVAL_LOGITS_BYTES // (seqlen * vocab * 4)))
    was_training = model.training
    model.eval()
    if device != home:
        model.to(device)
    total, count = 0.0, 0
    try:
        with torch.no_grad():  # not inference_mode: buffers a model caches here stay usable later
            for chunk in windows.split(batch_size):
                chunk = chunk.to(device)
                logits = model(input_ids=chunk, use_cache=False).logits
                total += _nll_sum(logits, chunk)
                count += chunk.shape[0] * (seqlen - 1)
                del logits
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)
        release_memory()
    return math.exp(total / count)


def _vocab_size(model: nn.Module) -> Optional[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if n else None


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """``Σ −log softmax(logits[b, t])[ids[b, t+1]]`` over ``t < T−1``, in float32 slices.

    logits : (B, T, V); ids : (B, T). Each slice holds at most :data:`NLL_CHUNK_ELEMENTS`
    logits (plus its ``log_softmax``), whatever ``B·T·V``.
    """
    B, T, V = logits.shape
    step = max(1, NLL_CHUNK_ELEMENTS // V)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)  # one sync per batch
    for b in range(B):
        for s in range(0, T - 1, step):
            e = min(T - 1, s + step)
            total += torch.nn.functional.cross_entropy(
                logits[b, s:e].float(), ids[b, s + 1:e + 1], reduction="sum").double()
    return float(total)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system.

    glibc keeps freed chunks below its (adaptive, up to 32 MiB) ``mmap`` threshold in its
    arenas; after a forward pass that is tens to hundreds of MiB of resident memory nobody
    uses. ``malloc_trim(0)`` returns it (a no-op where the C library is not glibc).
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return getattr(libc, "malloc_trim", None)
    except (OSError, AttributeError):
        return None


def sparsity(model: nn.Module, *, include_lm_head: bool = False) -> float:
    """Fraction of exact zeros in the target linears of the decoder blocks (and ``lm_head``)."""
    blocks, _ = find_blocks(model)
    zeros, total = 0, 0
    weights = [lin.weight for block in blocks for lin in find_linears(block).values()]
    if include_lm_head:
        head = model.get_output_embeddings()
        if head is not None:
            weights.append(head.weight)
    for w in weights:
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0
