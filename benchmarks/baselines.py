"""The baselines a user would otherwise run, each as (load, pp, tg) callables for benchmarks/decode.py
and benchmarks/sweep.py.

* transformers dense: AutoModelForCausalLM from the GGUF or HF directory, fp32 on the CPU, fp16 on the
  GPU (the whole model there, whatever the budget: the reference the budgeted engines are read against).
* accelerate ``device_map="auto"`` with ``max_memory={0: budget, "cpu": ...}`` (CUDA only).
* llama.cpp through llama-cpp-python on the same GGUF (optional: skipped when not importable), with
  ``n_gpu_layers`` from the same layer-split policy on a GPU.
* layer-split: llama.cpp's -ngl policy on our own engine (offload.layer_split), CUDA only.

Rates: pp = prompt tokens / time of one forward over them; tg = (n - 1) tokens / time after the
first new token (the first comes from the prompt forward), EOS ignored.
"""
from __future__ import annotations

import importlib.util
import os
import time

import torch

PROMPT = "Write a short story about a robot who learns to paint."  # the chat prompt every decode run uses


class DevicePeak:
    """The most CUDA memory each engine holds while it runs, with several engines loaded at once:
    ``built(name)`` after loading an engine takes the bytes allocated since the previous call as its
    own (resident); ``run(name, fn, *args)`` returns fn(*args) and keeps, in ``peak[name]``, its
    resident bytes plus the most the run allocated on top of what was held when it started. Without
    CUDA it only calls fn and ``peak`` stays empty."""

    def __init__(self, cuda: bool):
        self.cuda, self.resident, self.peak = cuda, {}, {}
        self.rebase()

    def rebase(self) -> None:
        """Count from here (after engines were freed)."""
        self.mark = torch.cuda.memory_allocated() if self.cuda else 0

    def built(self, name: str) -> None:
        if self.cuda:
            now = torch.cuda.memory_allocated()
            self.resident[name], self.mark = now - self.mark, now

    def run(self, name: str, fn, *args):
        if not self.cuda:
            return fn(*args)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(*args)
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base + self.resident.get(name, 0)
        self.peak[name] = max(self.peak.get(name, 0), used)
        return out


def add_prepare_options(ap) -> None:
    """--profile-tokens / --tune-tokens: passed to offload.prepare.prepare (None: its defaults). Every
    script that shares a model's cached artifacts must pass the same values, or prepare rebuilds them."""
    ap.add_argument("--profile-tokens", type=int, default=None,
                    help="calibration tokens prepare profiles (default: prepare's, 16384)")
    ap.add_argument("--tune-tokens", type=int, default=None,
                    help="validation tokens for prepare's operating-point search (default: prepare's, 2048)")


def prepare_options(args) -> dict:
    """The keywords for prepare() from add_prepare_options' arguments."""
    return {k: v for k, v in (("profile_tokens", args.profile_tokens), ("tune_tokens", args.tune_tokens))
            if v is not None}


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


def _from_pretrained(path: str, **kw):
    """AutoModelForCausalLM from a .gguf file (dequantized) or an HF directory (e.g. one made by
    benchmarks/random_llama.py)."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=path, **kw).eval()
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def load_transformers(path: str, device: str = "cpu", dtype=torch.float32):
    return _from_pretrained(path, dtype=dtype).to(device)


def load_accelerate(path: str, budget: int):
    """transformers + accelerate's device_map="auto" under ``budget`` bytes on GPU 0 (fp16)."""
    return _from_pretrained(path, dtype=torch.float16, device_map="auto", max_memory={0: int(budget), "cpu": 10**12})


def transformers_pp(model, ids) -> float:
    ids = ids.to(model.device)
    t0 = time.perf_counter()
    model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return ids.shape[1] / (time.perf_counter() - t0)


def transformers_tg(model, ids, n) -> float:
    return hf_rates(model, ids.to(model.device), n)[0]


def importable(module: str) -> bool:
    """Whether ``module`` (an optional baseline: llama_cpp, accelerate) is installed."""
    return importlib.util.find_spec(module) is not None


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
