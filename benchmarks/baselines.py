"""The baselines a user would otherwise run, each as (load, pp, tg) callables for benchmarks/decode.py
and benchmarks/sweep.py.

* transformers dense: AutoModelForCausalLM from the GGUF, fp32 on the CPU (fp16 on the GPU when the
  whole model fits the budget).
* accelerate ``device_map="auto"`` with ``max_memory={0: budget, "cpu": ...}`` (CUDA only).
* llama.cpp through llama-cpp-python on the same GGUF (optional: skipped when not importable), with
  ``n_gpu_layers`` from the same layer-split policy on a GPU.
* layer-split: llama.cpp's -ngl policy on our own engine (offload.layer_split), CUDA only.

Rates: pp = prompt tokens / time of one forward over them; tg = (n - 1) tokens / time after the
first new token (the first comes from the prompt forward), EOS ignored.
"""
from __future__ import annotations

import os
import time

import torch

PROMPT = "Write a short story about a robot who learns to paint."  # the chat prompt every decode run uses


def offload_rates(m, ids, new_tokens):
    """(decode tok/s, prefill tok/s) of an OffloadedModel generating ``new_tokens`` after ``ids``, EOS
    ignored (its own timings: decode = the tokens after the first, over the time after it)."""
    m.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    s = m.last_stats
    return s.decode_tokens_per_second, s.prefill_tokens_per_second


def hf_rates(model, ids, new_tokens):
    """(decode tok/s, prefill tok/s) of transformers' generate: a 1-token generate is the prefill, and
    its time is subtracted from an n-token one."""
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    total = time.perf_counter() - t0
    return (new_tokens - 1) / (total - prefill), ids.shape[1] / prefill


def load_transformers(path: str, device: str = "cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=path, dtype=dtype).eval()
    return m.to(device)


def load_accelerate(path: str, budget: int):
    """transformers + accelerate's device_map="auto" under ``budget`` bytes on GPU 0 (fp16)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=path, dtype=torch.float16, device_map="auto",
        max_memory={0: int(budget), "cpu": 10**12}).eval()


def transformers_pp(model, ids) -> float:
    ids = ids.to(model.device)
    t0 = time.perf_counter()
    model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return ids.shape[1] / (time.perf_counter() - t0)


def transformers_tg(model, ids, n) -> float:
    return hf_rates(model, ids.to(model.device), n)[0]


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """llama.cpp on the GGUF through llama-cpp-python, greedy, ``threads`` CPU threads."""

    def __init__(self, path: str, threads: int, n_ctx: int = 1024, n_gpu_layers: int = 0):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, n_gpu_layers=n_gpu_layers, verbose=False)

    def pp(self, ids: torch.Tensor) -> float:
        toks = ids[0].tolist()
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(toks)
        return len(toks) / (time.perf_counter() - t0)

    def tg(self, ids: torch.Tensor, n: int) -> float:
        toks = ids[0].tolist()
        self.llm.reset()
        made, t_first = 0, 0.0
        for _ in self.llm.generate(toks, temp=0.0, reset=True):
            made += 1
            if made == 1:
                t_first = time.perf_counter()
            if made >= n:
                break
        return (made - 1) / (time.perf_counter() - t_first)
