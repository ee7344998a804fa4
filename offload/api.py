"""The public entry point: ``OffloadedModel.from_pretrained(...).generate(...)``.

Example::

    from offload import OffloadedModel
    m = OffloadedModel.from_pretrained()            # the embedded SmolLM2-135M-Instruct
    ids = m.chat_ids("What is the capital of France?")
    out = m.generate(ids, max_new_tokens=32)
    print(m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print(m.last_stats)
"""
from __future__ import annotations

import os

import torch

from offload.cache import model_cache_dir
from offload.checkpoint import Checkpoint, open_checkpoint
from offload.cpu.pool import check_threads, start_pool
from offload.errors import BudgetError, GenerationError
from offload.generation import GenerationStats, SamplingConfig, as_tuple, generate
from offload.loading import build_model
from offload.units import parse_memory_size

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype}: expected one of float32, float16, bfloat16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def load_tokenizer(ckpt: Checkpoint):
    """transformers' AutoTokenizer for the checkpoint. GGUF tokenizers take ~10 s to convert, so the
    converted one is saved once in the model's cache folder and reloaded from there."""
    from transformers import AutoTokenizer

    if ckpt.gguf_file is None:
        return AutoTokenizer.from_pretrained(ckpt.tokenizer_path)
    cached = os.path.join(model_cache_dir(ckpt.identity), "tokenizer")
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(ckpt.tokenizer_path, gguf_file=ckpt.gguf_file)
    try:
        tok.save_pretrained(cached)
    except OSError:
        pass  # a read-only cache only costs time
    return tok


class OffloadedModel:
    """A loaded model with its tokenizer. Until the hybrid runtime is applied it runs dense.

    Attributes: ``model`` (the nn.Module), ``tokenizer``, ``config`` (the family config dataclass),
    ``checkpoint``, ``device``, ``dtype``, ``gpu_memory`` (bytes or None), ``threads`` (CPU decode
    threads), ``last_stats``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, checkpoint: Checkpoint, *, device: torch.device,
                 gpu_memory: int | None = None, threads: int | None = None):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.threads = check_threads(threads)
        self.config = model.config
        self.device, self.dtype = device, model.dtype
        self.gpu_memory = gpu_memory
        self.last_stats = GenerationStats()
        self.placement = None  # set by offload(): the Placement in use
        self.hybrid_stats = None  # HybridStats of the hybrid layers, reset by each generate

    def offload(self, budget: int, *, device: torch.device | None = None, hot_dtype: torch.dtype | None = None,
                context: int = 4096, text=None, progress: bool = True, prepared=None) -> None:
        """Profile → predict → place → run: build (or reuse from the cache) the profile, predictors and
        operating point, solve the placement of hot neurons for ``budget`` bytes on ``device``, and
        swap every FFN for a HybridFFN. With device='cpu' the hot side runs on CPU torch, and
        ``budget=0`` means no device memory at all: every FFN neuron is cold (the fastest CPU-only
        setting: one numba call per layer computes the FFN).
        ``prepared``: artifacts from offload.prepare.prepare / prepare_from_tokens (default: prepare).
        Once per model: a second call raises (load the model again to place it for another budget)."""
        from offload.cpu.decode import warm_up
        from offload.hybrid import HybridFFN, apply_placement, uses_spinning_pool
        from offload.place.report import plan_and_place
        from offload.prepare import prepare
        from offload.select import runtime_selector

        if any(isinstance(layer.mlp, HybridFFN) for layer in self.model.layers):
            raise BudgetError("this model's FFNs are already placed (offload() was called); load the model again "
                              "with from_pretrained(gpu_memory=...) to place it for another budget")
        device = device or self.device
        hot_dtype = hot_dtype or self.dtype
        prepared = prepared or prepare(self, text, progress=progress)
        preds = prepared.predictors
        layers = len(self.model.layers)
        if budget == 0:
            if device.type != "cpu":
                raise BudgetError("gpu_memory=0 (no device memory) is only for device='cpu': every FFN neuron cold")
            from offload.place.memory import plan_memory

            plan = plan_memory(self.checkpoint.config, dtype=str(hot_dtype).removeprefix("torch."), device="cpu",
                               context=min(context, self.max_context), predictor_bytes=preds.nbytes // layers,
                               shapes=self.checkpoint.shapes)
            budget = plan.fixed_bytes + 1  # the non-FFN part and not one hot row
        _, placement, _ = plan_and_place(
            self.checkpoint.config, budget=budget, frequencies=prepared.profile.frequencies,
            context=min(context, self.max_context), dtype=str(hot_dtype).removeprefix("torch."),
            predictor_bytes=preds.nbytes // layers, identity=self.checkpoint.identity,
            device=device.type, shapes=self.checkpoint.shapes)
        pool = "numba" if uses_spinning_pool(device) else "team"
        threads = start_pool(self.threads) if pool == "numba" else 1
        selectors = [runtime_selector(preds[i], preds.selector(i), device, threads, pool) for i in range(layers)]
        self.hybrid_stats = apply_placement(self.model, placement.hot, selectors, device=device, hot_dtype=hot_dtype,
                                            cold_threads=self.threads)
        self.placement, self.device, self.dtype = placement, device, self.model.dtype
        if device.type == "cpu":
            warm_up(self.model)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, gpu_memory: int | str | None = None,
                        local_files_only: bool = False, revision: str | None = None, context: int = 4096,
                        progress: bool = True, weights: str = "float32", threads: int | None = None
                        ) -> "OffloadedModel":
        """Load ``model`` (hub repo id, local HF directory, ``.gguf`` file, or None for the embedded
        SmolLM2-135M-Instruct). Hub access honours ``HF_HUB_OFFLINE`` and ``local_files_only``.

        Without ``gpu_memory`` the model runs dense on ``device``. With it (bytes or accelerate-style
        strings, "8GiB" = 8·2^30, "8GB" = 8·10^9) the hybrid runtime is applied: the profile and
        predictors are reused from the cache or built (progress bars), the placement is solved for the
        budget with a KV cache of ``context`` tokens, and every FFN is split into hot rows on
        ``device`` and cold rows on the CPU (see :meth:`offload`). With ``device="cpu"``,
        ``gpu_memory=0`` runs the hybrid with every neuron cold: the CPU-only sparse engine.

        ``weights``: how weight matrices are stored for the CPU (offload.formats): "float32" (exact to
        transformers' fp32 model) or "float16" (half the bytes a token reads, fp32 arithmetic). On the CPU
        it applies to the whole model; with a GPU budget, to the cold rows (the device side takes
        ``dtype``). ``threads``: CPU threads for the decode kernels (default: every CPU this process may
        use; on a machine shared with other busy processes ``threads=1`` keeps decode steady)."""
        from offload.cpu.decode import fuse_decode_blocks, warm_up
        from offload.formats import apply_weight_format, check_weight_format, store_ffn_weights_fp16

        device = torch.device(device if device is not None else "cpu")
        if gpu_memory in (0, "0") and device.type == "cpu":
            budget = 0  # no device memory: every FFN neuron cold (see offload())
        else:
            budget = parse_memory_size(gpu_memory) if gpu_memory is not None else None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU; use device='cpu'")
        dtype = _resolve_dtype(dtype, device)
        check_weight_format(weights)
        threads = check_threads(threads)
        if device.type == "cpu" and dtype != torch.float32:
            raise ValueError(f"dtype={dtype}: CPU decode computes in float32; choose how weights are stored "
                             "with weights= instead")
        if weights != "float32" and device.type != "cpu" and gpu_memory is None:
            raise ValueError(f"weights={weights!r} applies to the CPU side (give gpu_memory= for a hybrid run); "
                             "for a dense GPU model choose dtype=")
        ckpt = open_checkpoint(model, revision=revision, local_files_only=local_files_only)
        if budget is None and device.type != "cpu":  # dense on a GPU: torch modules in dtype
            net = build_model(ckpt, dtype=dtype, device=device, progress=progress)
            return cls(net, load_tokenizer(ckpt), ckpt, device=device, threads=threads)
        net = build_model(ckpt, dtype=torch.float32, device="cpu", progress=progress)
        if device.type == "cpu":
            apply_weight_format(net, weights, start_pool(threads))
            fuse_decode_blocks(net)
        elif weights == "float16":  # the cold rows the CPU will hold: fp16 (the hybrid keeps their dtype)
            store_ffn_weights_fp16(net)
        m = cls(net, load_tokenizer(ckpt), ckpt, device=torch.device("cpu"), gpu_memory=budget, threads=threads)
        if budget is None:
            warm_up(net)
            return m
        m.offload(budget, device=device, hot_dtype=dtype, context=context, progress=progress)
        return m

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def chat_ids(self, prompt: str, system: str | None = None) -> torch.Tensor:
        """Token ids [1, t] of ``prompt`` as one user turn in the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        return ids

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, t, V] of one full forward over input_ids [b, t]."""
        return self.model(input_ids.to(self.device))

    def generate(self, input_ids, *, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 stop_strings: str | list[str] | None = None, streamer=None, seed: int | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Generate like transformers' ``generate``: returns ids [b, prompt + new] (prompt included).

        ``eos_token_id`` defaults to the model's; ``seed`` makes sampling reproducible; ``streamer``
        gets ``put(ids)`` / ``end()`` calls, so ``transformers.TextStreamer`` works unchanged.
        Timings of the call are in ``last_stats``.
        """
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise GenerationError("attention_mask: padded batches are not supported; pass prompts of equal length")
        if eos_token_id is None:
            eos_token_id = self._default_eos()
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                             eos_token_id=as_tuple(eos_token_id, int), stop_strings=as_tuple(stop_strings, str),
                             pad_token_id=pad_token_id, seed=seed)
        if self.hybrid_stats is not None:
            self.hybrid_stats.reset()
        ids, self.last_stats = generate(self.model, input_ids, cfg, max_context=self.max_context,
                                        streamer=streamer, tokenizer=self.tokenizer)
        return ids

    def _default_eos(self) -> list[int]:
        eos = set(as_tuple(self.config.eos_token_id, int))
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            eos.add(tok_eos)
        return sorted(eos)
