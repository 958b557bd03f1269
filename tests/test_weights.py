"""The streamed checkpoint loader gives exactly ``from_pretrained``'s model, or declines."""
from __future__ import annotations

import pytest
import torch

from layerprune.weights import load_streamed, read_safetensors

transformers = pytest.importorskip("transformers")


def _save_tiny(path, tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=64, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_streamed_model_equals_from_pretrained(tmp_path, tied, dtype):
    _save_tiny(tmp_path, tied)
    streamed = load_streamed(str(tmp_path), dtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype)
    assert streamed is not None
    got, want = streamed.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    for (name, buf), (_, ref) in zip(streamed.named_buffers(), reference.named_buffers()):
        assert torch.equal(buf, ref), name
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tied
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(streamed.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def test_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "c": torch.randn(5, dtype=torch.float64).to(torch.bfloat16), "empty": torch.zeros(0, 2)}
    save_file(tensors, tmp_path / "x.safetensors")
    got = dict(read_safetensors(tmp_path / "x.safetensors"))
    want = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_a_checkpoint_that_does_not_map_one_to_one_is_declined(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_tiny(tmp_path, tied=False)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["model.renamed.weight"] = state.pop("model.norm.weight")
    save_file(state, path)
    assert load_streamed(str(tmp_path), torch.float32) is None
    state.pop("model.renamed.weight")
    save_file(state, path)  # a weight missing, not tied to another
    assert load_streamed(str(tmp_path), torch.float32) is None
