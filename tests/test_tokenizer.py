"""Tokenizers (issue 12 item 4): a checkpoint folder without tokenizer files still loads and generates
from token ids; only text fails, naming the folder and the files looked for."""
from __future__ import annotations

import shutil

import pytest
import torch

from offload import OffloadedModel
from offload.errors import CheckpointError
from offload.tokenizer import TOKENIZER_FILES, MissingTokenizer


def test_checkpoint_without_tokenizer_generates_from_ids(tiny_checkpoint):
    path = tiny_checkpoint("llama_relu")  # weights and config only
    m = OffloadedModel.from_pretrained(path, progress=False)
    assert isinstance(m.tokenizer, MissingTokenizer)
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, 7)
    for use in (lambda: m.tokenizer("hi"), lambda: m.chat_ids("hi"), lambda: m.tokenizer.decode([1, 2])):
        with pytest.raises(CheckpointError) as e:
            use()
        assert path in str(e.value) and "no tokenizer files" in str(e.value) and "tokenizer.json" in str(e.value)


def test_cli_text_prompt_without_tokenizer_is_one_line(tiny_checkpoint, capsys):
    from offload.cli import main

    path = tiny_checkpoint("llama_relu")
    assert main(["generate", path, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("offload generate: error: " + path) and "tokenizer.json" in lines[0]


def test_what_the_checkpoint_has_is_loaded(tiny_checkpoint, tmp_path):
    """tokenizer.json alone (no tokenizer_config.json) is enough; an unreadable file is reported on use."""
    src = tiny_checkpoint("llama_chat")
    only_json = tmp_path / "only_json"
    shutil.copytree(tiny_checkpoint("llama"), only_json)
    shutil.copy(f"{src}/tokenizer.json", only_json)
    m = OffloadedModel.from_pretrained(only_json, progress=False)
    assert m.tokenizer("hi", add_special_tokens=False)["input_ids"] == [76, 77]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint("llama"), broken)
    (broken / "tokenizer.model").write_bytes(b"not sentencepiece")
    m = OffloadedModel.from_pretrained(broken, progress=False)
    with pytest.raises(CheckpointError, match=r"broken: its tokenizer files \(tokenizer.model\) could not be loaded"):
        m.tokenizer("hi")
    assert "tokenizer.model" in TOKENIZER_FILES


def test_converted_gguf_tokenizer_equals_autotokenizer(smollm2_gguf):
    """A GGUF's tokenizer, converted once and reloaded from the cache as the plain fast tokenizer, encodes,
    decodes and applies the chat template as transformers' AutoTokenizer does on the same files."""
    from transformers import AutoTokenizer

    from offload.checkpoint import open_checkpoint
    from offload.tokenizer import converted_tokenizer, load_tokenizer

    ckpt = open_checkpoint(smollm2_gguf)
    load_tokenizer(ckpt)  # converts and caches, the first time
    from offload.cache import model_cache_dir
    import os

    folder = os.path.join(model_cache_dir(ckpt.identity), "tokenizer")
    ours, ref = converted_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    text = "Hello world! <|im_end|> ünïcödé\n  spaces"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    ids = ref(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert (ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert ours.eos_token_id == ref.eos_token_id and ours.bos_token_id == ref.bos_token_id
