"""The tokenizer of a checkpoint: what the checkpoint has, or a stand-in when it has none.

``load_tokenizer(ckpt)`` returns transformers' tokenizer for a GGUF file (converted once and cached)
or a HF directory. A directory without tokenizer files (or with files transformers cannot read)
still gives a usable model: ``generate`` takes token ids. The stand-in, :class:`MissingTokenizer`,
raises CheckpointError naming the folder and the files looked for as soon as text is involved
(encoding a prompt, a chat template, decoding, stop strings).
"""
from __future__ import annotations

import os

from offload.cache import model_cache_dir
from offload.checkpoint import Checkpoint
from offload.errors import CheckpointError

# The files transformers builds a tokenizer from (tokenizers' JSON, sentencepiece, BPE vocab + merges,
# WordPiece vocab) and the config that names the class and carries the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")


class MissingTokenizer:
    """Stands in for the tokenizer of a checkpoint that has none: ids-only use works (``eos_token_id``
    is None, so generation stops on the config's eos ids), every text use raises CheckpointError."""

    eos_token_id = bos_token_id = pad_token_id = chat_template = None

    def __init__(self, folder: str, reason: str):
        self.folder, self.reason = folder, reason

    def __repr__(self) -> str:
        return f"MissingTokenizer({self.folder!r})"

    def _fail(self, *args, **kwargs):
        raise CheckpointError(f"{self.folder}: {self.reason}, so text cannot be encoded or decoded; pass token ids "
                              "to generate(), or add the tokenizer files to the folder")

    __call__ = encode = decode = batch_decode = apply_chat_template = convert_tokens_to_ids = tokenize = _fail


def converted_tokenizer(folder: str):
    """A tokenizer that transformers converted from a GGUF and saved (tokenizer.json, tokenizer_config.json,
    chat_template.jinja), loaded as the plain fast tokenizer those files define.

    Why not AutoTokenizer: its model-specific class keeps more Python state beside the same Rust tokenizer;
    for Qwen2.5's 152k-token vocabulary 158 MiB resident against 114 (the same encodings, decodings and
    chat template: tests/test_tokenizer.py)."""
    import json

    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    keep = ("bos_token", "eos_token", "pad_token", "unk_token", "clean_up_tokenization_spaces", "model_max_length")
    kwargs = {k: v for k, v in config.items() if k in keep and v is not None}
    template = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template):
        with open(template) as f:
            kwargs["chat_template"] = f.read()
    elif config.get("chat_template"):
        kwargs["chat_template"] = config["chat_template"]
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), **kwargs)


def load_tokenizer(ckpt: Checkpoint):
    """transformers' AutoTokenizer for the checkpoint, or a MissingTokenizer (module docstring).

    GGUF tokenizers take ~10 s to convert, so the converted one is saved once in the model's cache
    folder and reloaded from there."""
    from transformers import AutoTokenizer

    if ckpt.gguf_file is not None:
        cached = os.path.join(model_cache_dir(ckpt.identity), "tokenizer")
        if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
            return converted_tokenizer(cached)
        tok = AutoTokenizer.from_pretrained(ckpt.tokenizer_path, gguf_file=ckpt.gguf_file)
        try:
            tok.save_pretrained(cached)
        except OSError:
            pass  # a read-only cache only costs time
        return tok
    folder = ckpt.tokenizer_path
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    if present == [] or present == ["tokenizer_config.json"]:
        return MissingTokenizer(folder, f"no tokenizer files (looked for {', '.join(TOKENIZER_FILES[:-1])})")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises ValueError, OSError, ImportError… for files it cannot use
        first = " ".join(str(e).split())[:200]
        return MissingTokenizer(folder, f"its tokenizer files ({', '.join(present)}) could not be loaded "
                                        f"({type(e).__name__}: {first})")
