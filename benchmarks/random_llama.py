"""Write a random-weight LLaMA-shaped checkpoint (HF directory: config.json, fp16 safetensors, and the
embedded SmolLM2 tokenizer) for GPU runs on a model larger than the budget.

    python benchmarks/random_llama.py OUT_DIR [--shape 1b|3b|tiny] [--seed 0] [--tokenizer DIR]

Shapes (vocab 49152, the tokenizer's): ``1b`` TinyLlama-1.1B's (d 2048, n 5632, 22 layers, 32/4
heads, ~1.1 B parameters, 2.2 GB fp16), ``3b`` an OpenLLaMA-3B-like one (d 3200, n 8640, 26 layers,
32 heads, ~3.4 B, 6.9 GB), ``tiny`` (d 256, 4 layers) to check the script. Weights are N(0, 0.02)
like transformers' init, so activations are not a trained model's: the sweep measures speed and
memory, not quality. The tokenizer comes from the embedded SmolLM2 GGUF, or from ``--tokenizer DIR``
(a saved tokenizer folder, e.g. ~/.cache/offload/<id>/tokenizer, where the GGUF is not installed).
Then e.g.::

    python benchmarks/sweep.py --model OUT_DIR --device cuda --fractions 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import os

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: the SmolLM2 GGUF's)")
    args = ap.parse_args(argv)

    import torch
    import transformers as tf

    from offload.tokenizer import load_tokenizer
    from offload.checkpoint import default_model_path, open_checkpoint

    if args.tokenizer:
        tok = tf.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = load_tokenizer(open_checkpoint(default_model_path()))
    cfg = tf.LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = tf.LlamaForCausalLM(cfg).to(torch.float16)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size="2GB")
    tok.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: random LLaMA {args.shape}, {params / 1e9:.2f} B parameters, "
          f"{params * 2 / 2**30:.2f} GiB in fp16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
