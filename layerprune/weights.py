"""Load a local safetensors checkpoint one tensor at a time, in the dtype asked for.

``from_pretrained`` maps the whole checkpoint into memory and converts it there: loading the
float32 SmolLM2 cache (513 MiB) in float16 peaked at about 1.17 GiB of resident memory, more
than three times the 257 MiB model. Here the model is built from its config without
initialising its weights, and each tensor is read from the file into a buffer of its own
size, copied (converted) into its parameter and dropped: the peak is the model plus one
tensor. :func:`load_streamed` returns None wherever the checkpoint does not map one to one
onto the model (sharded index without files, renamed keys, quantised configs), and the
caller falls back to ``from_pretrained``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["load_streamed", "read_safetensors"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one ``.safetensors`` file, read one at a time (no memory map).

    The format: an 8-byte little-endian header length, a JSON header mapping each name to
    ``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), the data.
    Raises ValueError on a dtype this reader does not know.
    """
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        start = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}")
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            fh.seek(start + begin)
            data = bytearray(fh.read(end - begin))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            yield name, flat.reshape(info["shape"])


def _no_init_weights():
    """transformers' context that skips weight initialisation (its module moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_streamed(directory: str, dtype: torch.dtype) -> Optional[nn.Module]:
    """The causal LM saved in ``directory``, its weights in ``dtype``, or None if the
    checkpoint is not a plain one-to-one safetensors copy of the model.

    Every parameter and persistent buffer of the model must come from the files, except
    those tied to another (``lm_head`` tied to the embeddings), which ``tie_weights`` sets.
    """
    import transformers

    folder = Path(directory)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    config = transformers.AutoConfig.from_pretrained(directory)
    if getattr(config, "quantization_config", None) is not None:
        return None
    with _no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for path in files:
            for name, tensor in read_safetensors(path):
                target = state.get(name)
                if target is None or target.shape != tensor.shape:
                    return None
                target.copy_(tensor)
                loaded.add(name)
    model.tie_weights()
    state = model.state_dict()
    pointers = {state[n].data_ptr() for n in loaded}
    if any(state[n].data_ptr() not in pointers for n in set(state) - loaded):
        return None  # a weight neither in the files nor tied to one that is
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    model.config._name_or_path = str(directory)
    return model
