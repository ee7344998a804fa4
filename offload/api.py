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

from offload.checkpoint import Checkpoint, open_checkpoint
from offload.cpu.pool import check_threads, start_pool
from offload.errors import BudgetError, GenerationError, OffloadError, UsageError
from offload.generation import GenerationStats, SamplingConfig, as_tuple, generate
from offload.loading import build_model
from offload.models.ffn_kind import FFNKind
from offload.tokenizer import MissingTokenizer, load_tokenizer
from offload.units import parse_memory_size


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UsageError(f"dtype={dtype}: expected one of float32, float16, bfloat16")
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"dtype={dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def build_for_gpu_hybrid(ckpt: Checkpoint, weights: str, activations: str, progress: bool) -> torch.nn.Module:
    """The CPU model a GPU placement splits: a quantized GGUF with ``weights="auto"`` keeps its FFN blocks as
    stored (the hybrid packs hot rows from them losslessly and dequantizes the cold rows, layer by layer)
    and the rest dense in fp32 (it moves to the device); otherwise the dense fp32 model, its FFN weights
    rounded to fp16 for ``weights="float16"`` (the cold rows the CPU keeps)."""
    from offload.formats import dense_outside_ffn, store_ffn_weights_fp16

    if weights == "auto" and is_quantized_gguf(ckpt):
        return dense_outside_ffn(build_model(ckpt, progress=progress, weights="auto", activations=activations))
    net = build_model(ckpt, dtype=torch.float32, device="cpu", progress=progress)
    return store_ffn_weights_fp16(net) if weights == "float16" else net


def is_quantized_gguf(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is a GGUF holding quantized tensors (its raw blocks readable, offload.checkpoint)."""
    return ckpt.raw is not None and any(ckpt.raw(name) is not None for name in ckpt.shapes)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device={device!r}: expected 'cpu' or 'cuda' (or 'cuda:N')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={device!r}, but this torch ({torch.__version__}) sees no CUDA GPU; use device='cpu' "
                         "(with gpu_memory=0 for the CPU-only sparse engine)")
    return dev


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
        self.weights = "float32"  # the storage format (offload.formats.WEIGHT_FORMATS); artifacts are kept per format
        self.last_stats = GenerationStats()
        self.placement = None  # set by offload(): the Placement in use
        self.hybrid_stats = None  # HybridStats of the hybrid layers, reset by each generate

    def offload(self, budget: int, *, device: torch.device | None = None, hot_dtype: torch.dtype | None = None,
                context: int = 4096, text=None, progress: bool = True, prepared=None) -> None:
        """Profile → predict → place → run: build (or reuse from the cache) the profile, predictors and
        operating point, solve the placement of hot neurons for ``budget`` bytes on ``device``, and
        swap every FFN for a HybridFFN. With device='cpu' the hot side runs on CPU torch, and
        ``budget=0`` means no device memory at all: every FFN neuron is cold (one numba call per layer
        computes the FFN; on SmolLM2 it runs at 0.95-1.13x the dense engine with the same fp16 weights
        depending on the CPU and the run, see the README's Performance).
        ``prepared``: artifacts from offload.prepare.prepare / prepare_from_tokens (default: prepare).
        Once per model: a second call raises (load the model again to place it for another budget)."""
        from offload.cpu.decode import warm_up
        from offload.hybrid import HybridFFN, apply_placement, uses_spinning_pool
        from offload.packed_hot import packed_hot_format
        from offload.place.memory import plan_memory
        from offload.place.report import plan_and_place
        from offload.prepare import prepare
        from offload.select import runtime_selector

        if any(isinstance(layer.mlp, HybridFFN) for layer in self.model.layers):
            raise BudgetError("this model's FFNs are already placed (offload() was called); load the model again "
                              "with from_pretrained(gpu_memory=...) to place it for another budget")
        FFNKind.of(self.model.layers[0].mlp.kind).check_kernels("the hybrid (offload())")
        device = device or self.device
        hot_dtype = hot_dtype or self.dtype
        if budget == 0 and device.type != "cpu":
            raise BudgetError("gpu_memory=0 (no device memory) is only for device='cpu': every FFN neuron cold")
        if budget and prepared is None:  # a budget too small fails before minutes of preparation
            self._check_fixed_part_fits(budget, device, hot_dtype, context)
        prepared = prepared or prepare(self, text, progress=progress)
        preds = prepared.predictors
        layers = len(self.model.layers)
        # quantized FFN weights: hot rows packed 4-bit (offload.packed_hot), counted so by the plan
        layouts = packed_hot_format(self.model)
        if budget == 0:
            plan = plan_memory(self.checkpoint.config, dtype=str(hot_dtype).removeprefix("torch."), device="cpu",
                               context=min(context, self.max_context), predictor_bytes=preds.nbytes // layers,
                               shapes=self.checkpoint.shapes)
            budget = plan.fixed_bytes + 1  # the non-FFN part and not one hot row
        _, placement, _ = plan_and_place(
            self.checkpoint.config, budget=budget, frequencies=prepared.profile.frequencies,
            context=min(context, self.max_context), dtype=str(hot_dtype).removeprefix("torch."),
            predictor_bytes=preds.nbytes // layers, identity=self.checkpoint.identity,
            device=device.type, shapes=self.checkpoint.shapes, hot_format=layouts)
        pool = "numba" if uses_spinning_pool(device) else "team"
        threads = start_pool(self.threads) if pool == "numba" else 1
        selectors = [runtime_selector(preds[i], preds.selector(i), device, threads, pool) for i in range(layers)]
        self.hybrid_stats = apply_placement(self.model, placement.hot, selectors, device=device, hot_dtype=hot_dtype,
                                            cold_threads=self.threads, hot_format="int4" if layouts else None)
        self.placement, self.device, self.dtype = placement, device, self.model.dtype
        if device.type == "cpu":
            warm_up(self.model)

    def _check_fixed_part_fits(self, budget: int, device: torch.device, hot_dtype: torch.dtype, context: int) -> None:
        """BudgetError if the non-FFN part does not fit ``budget``, with the predictors counted as
        ``offload report`` counts them: the cached ones, if any (not yet built: none)."""
        from offload.place.memory import plan_memory
        from offload.place.report_cli import cached_predictor_bytes

        try:
            pred = cached_predictor_bytes(self.checkpoint.identity, len(self.model.layers), self.weights)
        except OffloadError:
            pred = 0  # a damaged file: prepare() names it, with the fix
        plan_memory(self.checkpoint.config, dtype=str(hot_dtype).removeprefix("torch."), device=device.type,
                    context=min(context, self.max_context), shapes=self.checkpoint.shapes,
                    predictor_bytes=pred).check_fits(budget)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, gpu_memory: int | str | None = None,
                        local_files_only: bool = False, revision: str | None = None, context: int = 4096,
                        progress: bool = True, weights: str = "auto", threads: int | None = None,
                        activations: str = "int8", kv_cache: str = "float32",
                        before_offload=None) -> "OffloadedModel":
        """Load ``model`` (hub repo id, local HF directory, ``.gguf`` file, or None for the embedded
        SmolLM2-135M-Instruct). Hub access honours ``HF_HUB_OFFLINE`` and ``local_files_only``.

        Without ``gpu_memory`` the model runs dense on ``device``. With it (bytes or accelerate-style
        strings, "8GiB" = 8·2^30, "8GB" = 8·10^9) the hybrid runtime is applied: the profile and
        predictors are reused from the cache or built (progress bars), the placement is solved for the
        budget with a KV cache of ``context`` tokens, and every FFN is split into hot rows on
        ``device`` and cold rows on the CPU (see :meth:`offload`). With ``device="cpu"``,
        ``gpu_memory=0`` runs the hybrid with every neuron cold: the CPU-only sparse engine.

        ``weights``: how weight matrices are stored for CPU decode (offload.formats): "auto" (the default:
        what the checkpoint stores; a GGUF's quantized blocks as they are), "float32" (transformers' fp32
        numbers), "float16", "int8" or "int4" (round to nearest, groups of 32). With a GPU budget it applies
        to the cold rows the CPU keeps ("float16" rounds them to fp16; the device side takes ``dtype``),
        and "auto" on a quantized GGUF keeps its FFN blocks: the hot rows go to the device packed in 4 bits
        (lossless from Q4_0 / Q4_1 / Q4_K, other types rounded to int4; offload.packed_hot) and the cold
        rows are dequantized to fp32.
        ``activations``: how quantized weight matrices ("auto" on a quantized GGUF, "int8", "int4") take a
        token's input: "int8" (the default, as llama.cpp: x rounded to int8 per group of 32, integer dot
        products, several times faster; logits move by about as much as llama.cpp's) or "float32" (x as is:
        transformers' numbers to float32 rounding).
        ``threads``: CPU threads for the decode kernels (default: every CPU this process may use; on a
        machine shared with other busy processes ``threads=1`` keeps decode steady).
        ``kv_cache``: the KV cache's dtype for CPU decode, "float32" (the default: transformers' numbers) or
        "float16" (LLaMA family, device="cpu": keys and values rounded to fp16 as they are stored, as
        llama.cpp keeps them; one-token attention reads half the bytes, which counts at long contexts).

        ``before_offload(model)``, if given, is called once the model and tokenizer are loaded and before
        the hybrid's preparation (which can take minutes the first time), so that cheap checks such as a
        prompt's length fail first. Invalid arguments raise UsageError / BudgetError before anything loads."""
        from offload.cpu.decode import KV_CACHE_DTYPES, fuse_decode_blocks, warm_up
        from offload.formats import ACTIVATIONS, WEIGHT_FORMATS, format_name
        from offload.models import family_for
        from offload.models.llama import LlamaModel

        budget = parse_memory_size(gpu_memory, allow_zero=True) if gpu_memory is not None else None
        device = _resolve_device(device)
        if budget == 0 and device.type != "cpu":  # 0 = no device memory: every FFN neuron cold (see offload())
            raise BudgetError(f"gpu_memory=0 (no device memory, every FFN neuron on the CPU) is only for device='cpu'; "
                              f"on {device} give a positive budget such as '8GiB'")
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise UsageError(f"context={context!r}: expected a positive number of tokens (the KV cache the budget "
                             "reserves)")
        dtype = _resolve_dtype(dtype, device)
        if weights not in WEIGHT_FORMATS:
            raise UsageError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
        if activations not in ACTIVATIONS:
            raise UsageError(f"activations={activations!r}: expected one of {', '.join(ACTIVATIONS)}")
        if kv_cache not in KV_CACHE_DTYPES:
            raise UsageError(f"kv_cache={kv_cache!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
        if kv_cache != "float32" and device.type != "cpu":
            raise UsageError(f"kv_cache={kv_cache!r} is for CPU decode (device='cpu'); on {device} the cache "
                             "takes the model's dtype")
        if device.type == "cpu" and dtype != torch.float32:
            raise UsageError(f"dtype={str(dtype).removeprefix('torch.')!r}: CPU decode computes in fp32; use "
                             "dtype='float32' (the default on the CPU) and choose how weights are stored with weights=")
        if weights not in ("auto", "float32", "float16") and device.type != "cpu":
            raise UsageError(f"weights={weights!r} is a CPU storage format; with a GPU the cold rows take "
                             "'float32' or 'float16'")
        if weights == "float16" and device.type != "cpu" and gpu_memory is None:
            raise UsageError("weights='float16' on a GPU applies to the hybrid's cold rows (give gpu_memory=); "
                             "for a dense GPU model choose dtype='float16'")
        try:
            threads = check_threads(threads)
        except ValueError as e:
            raise UsageError(str(e)) from None
        ckpt = open_checkpoint(model, revision=revision, local_files_only=local_files_only)
        if kv_cache != "float32" and not issubclass(family_for(ckpt.config.get("model_type"))[2], LlamaModel):
            raise UsageError(f"kv_cache={kv_cache!r} needs a LLaMA-family model (the fused CPU decode path), not "
                             f"model_type {ckpt.config.get('model_type')!r}")
        if budget is None and device.type != "cpu":  # dense on a GPU: torch modules in dtype
            net = build_model(ckpt, dtype=dtype, device=device, progress=progress)
            m = cls(net, load_tokenizer(ckpt), ckpt, device=device, threads=threads)
            m.weights = weights
            if before_offload is not None:
                before_offload(m)
            return m
        if device.type == "cpu":  # every weight matrix in its CPU storage format, built tensor by tensor
            net = fuse_decode_blocks(build_model(ckpt, progress=progress, weights=weights, activations=activations,
                                                 threads=start_pool(threads)), kv_cache)
        else:  # hybrid on a GPU: the model on the CPU, then every FFN split between the two
            net = build_for_gpu_hybrid(ckpt, weights, activations, progress)
        m = cls(net, load_tokenizer(ckpt), ckpt, device=torch.device("cpu"), gpu_memory=budget, threads=threads)
        m.weights = format_name(net)  # "auto" resolved to what was loaded: the key of the prepared artifacts
        if before_offload is not None:
            before_offload(m)
        if budget is None:
            warm_up(net)
            return m
        m.offload(budget, device=device, hot_dtype=dtype, context=context, progress=progress)
        return m

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def chat_ids(self, prompt: str | list[dict], system: str | None = None) -> torch.Tensor:
        """Token ids [1, t] of ``prompt`` as one user turn in the model's chat template, or of a whole
        conversation: a list of {"role", "content"} messages (multi-turn chat), ending with a user turn."""
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        if getattr(self.tokenizer, "chat_template", "") is None and not isinstance(self.tokenizer, MissingTokenizer):
            raise GenerationError(f"{self.checkpoint.source}: the tokenizer has no chat template; give the prompt as "
                                  "plain text (without --chat)")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        return ids

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, t, V] of one full forward over input_ids [b, t]."""
        return self.model(input_ids.to(self.device))

    def generate(self, input_ids, *, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, min_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 stop_strings: str | list[str] | None = None, streamer=None, seed: int | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Generate like transformers' ``generate``: returns ids [b, prompt + new] (prompt included).

        ``min_p`` (transformers' meaning): when sampling, drop tokens less likely than min_p times the
        most likely one. ``eos_token_id`` defaults to the model's; ``seed`` makes sampling reproducible; ``streamer``
        gets ``put(ids)`` / ``end()`` calls, so ``transformers.TextStreamer`` works unchanged.
        Timings of the call are in ``last_stats``.
        """
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise GenerationError("attention_mask: padded batches are not supported; pass prompts of equal length")
        if eos_token_id is None:
            eos_token_id = self._default_eos()
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
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
