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
from offload.errors import BudgetError, GenerationError, OffloadError, UsageError
from offload.generation import GenerationStats, SamplingConfig, _as_tuple, generate
from offload.loading import build_model
from offload.tokenizer import MissingTokenizer, load_tokenizer
from offload.units import parse_memory_size

# Weight storage formats of the CPU engine (an opaque name everywhere else: cache keys, CLI choices).
WEIGHT_FORMATS = ("float32", "float16")

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


def _fast_selector(predictor, selector, device: torch.device, spinning_pool: bool = False):
    """x [b, d] → sorted union over the batch of each token's selected neurons.

    Shadow predictors score from their packed int4/int8 bytes, never a dequantized fp32 copy (which
    reads 8x more and, on a GPU, would take memory the budget does not count): on the CPU with
    offload.lowbit's kernels, elsewhere with torch.ops.offload.shadow_scores_int{4,8} (Triton).
    Other predictors use their own mask. ``spinning_pool``: CPU-only decode where every kernel runs on
    numba's pool (offload.hybrid.uses_spinning_pool): score on all of its threads."""
    from offload.predict.shadow import ShadowPredictor

    if not isinstance(predictor, ShadowPredictor):
        return lambda x: selector.mask(x).any(0).nonzero().flatten()
    if device.type == "cpu":
        return _cpu_shadow_selector(predictor, spinning_pool)
    return device_shadow_selector(predictor, device)


def _cpu_shadow_selector(predictor, spinning_pool: bool):
    from offload.lowbit import shadow_from_predictor
    from offload.sparse import topk_count

    if spinning_pool:
        from offload.half import pool_threads

        shadow = shadow_from_predictor(predictor, threads=pool_threads(), pool="numba")
    else:
        shadow = shadow_from_predictor(predictor)
    k = topk_count(predictor.density, predictor.n)
    predictor.clear_cache()  # drop the fp32 copy the reference scorer may have built
    return CpuShadowSelector(shadow, k)


class CpuShadowSelector:
    """A selector with a NumPy entry point as well: ``ids(x [b, d] float32 ndarray)`` → sorted int64
    ndarray, which the hybrid FFN's CPU decode path calls without torch conversions. ``shadow`` (an
    offload.lowbit Int4Shadow / Int8Shadow) and ``k`` (neurons per token) are public so that the
    all-cold CPU path can run scores, top-k and the cold kernel in one call (offload.cold.fused)."""

    def __init__(self, shadow, k: int):
        from offload.lowbit import topk_indices

        self.shadow, self.k = shadow, k
        self.ids = lambda x: topk_indices(shadow.scores(x), k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.ids(x.detach().float().numpy()))


def device_shadow_selector(predictor, device: torch.device):
    """The shadow predictor's top-k on ``device`` through the registered scoring op (Triton on CUDA,
    the torch reference on the CPU). Returns sorted global ids [k..b·k] on ``device``."""
    from offload.kernels.shadow_scores import shadow_scores_int4, shadow_scores_int8
    from offload.sparse import topk_count

    score = shadow_scores_int4 if predictor.bits == 4 else shadow_scores_int8
    t = {name: v.to(device) for name, v in predictor.tensors().items()}
    k = topk_count(predictor.density, predictor.n)
    predictor.clear_cache()

    def select(x: torch.Tensor) -> torch.Tensor:
        s = score(x, t["q_gate"], t["s_gate"], t["q_up"], t["s_up"], t.get("gate_bias"), t.get("up_bias"),
                  predictor.kind)
        return torch.unique(s.topk(k, dim=-1).indices.flatten())  # sorted

    return select


class OffloadedModel:
    """A loaded model with its tokenizer. Until the hybrid runtime is applied it runs dense.

    Attributes: ``model`` (the nn.Module), ``tokenizer``, ``config`` (the family config dataclass),
    ``checkpoint``, ``device``, ``dtype``, ``gpu_memory`` (bytes or None), ``last_stats``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, checkpoint: Checkpoint, *, device: torch.device,
                 gpu_memory: int | None = None):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.config = model.config
        self.device, self.dtype = device, model.dtype
        self.gpu_memory = gpu_memory
        self.weights = "float32"  # the weight storage format (WEIGHT_FORMATS); prepared artifacts are kept per format
        self.last_stats = GenerationStats()
        self.placement = None  # set by offload(): the Placement in use
        self.hybrid_stats = None  # HybridStats of the hybrid layers, reset by each generate

    def offload(self, budget: int, *, device: torch.device | None = None, hot_dtype: torch.dtype | None = None,
                context: int = 4096, text=None, progress: bool = True, prepared=None) -> None:
        """Profile → predict → place → run: build (or reuse from the cache) the profile, predictors and
        operating point, solve the placement of hot neurons for ``budget`` bytes on ``device``, and
        swap every FFN for a HybridFFN. With device='cpu' the hot side runs on CPU torch, and
        ``budget=0`` means no device memory at all: every FFN neuron is cold (the fastest CPU-only
        setting; with weights="float16" one numba call per layer computes the FFN).
        ``prepared``: artifacts from offload.prepare.prepare / prepare_from_tokens (default: prepare)."""
        from offload.prepare import prepare
        from offload.hybrid import apply_placement, uses_spinning_pool
        from offload.place.memory import plan_memory
        from offload.place.report import plan_and_place

        device = device or self.device
        hot_dtype = hot_dtype or self.dtype
        if budget == 0 and device.type != "cpu":
            raise BudgetError("gpu_memory=0 (no device memory) is only for device='cpu': every FFN neuron cold")
        if budget and prepared is None:  # a budget too small fails before minutes of preparation
            self._check_fixed_part_fits(budget, device, hot_dtype, context)
        prepared = prepared or prepare(self, text, progress=progress)
        preds = prepared.predictors
        layers = len(self.model.layers)
        if budget == 0:
            plan = plan_memory(self.checkpoint.config, dtype=str(hot_dtype).removeprefix("torch."), device="cpu",
                               context=min(context, self.max_context), predictor_bytes=preds.nbytes // layers,
                               shapes=self.checkpoint.shapes)
            budget = plan.fixed_bytes + 1  # the non-FFN part and not one hot row
        _, placement, _ = plan_and_place(
            self.checkpoint.config, budget=budget, frequencies=prepared.profile.frequencies,
            context=min(context, self.max_context), dtype=str(hot_dtype).removeprefix("torch."),
            predictor_bytes=preds.nbytes // layers, identity=self.checkpoint.identity,
            device=device.type, shapes=self.checkpoint.shapes)
        spinning = uses_spinning_pool(self.model, device)
        selectors = [_fast_selector(preds[i], preds.selector(i), device, spinning) for i in range(layers)]
        self.hybrid_stats = apply_placement(self.model, placement.hot, selectors, device=device, hot_dtype=hot_dtype)
        self.placement, self.device, self.dtype = placement, device, self.model.dtype

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
                        local_files_only: bool = False, revision: str | None = None,
                        context: int = 4096, progress: bool = True, weights: str = "float32",
                        before_offload=None) -> "OffloadedModel":
        """Load ``model`` (hub repo id, local HF directory, ``.gguf`` file, or None for the embedded
        SmolLM2-135M-Instruct). Hub access honours ``HF_HUB_OFFLINE`` and ``local_files_only``.

        Without ``gpu_memory`` the model runs dense on ``device``. With it (bytes or accelerate-style
        strings, "8GiB" = 8·2^30, "8GB" = 8·10^9) the hybrid runtime is applied: the profile and
        predictors are reused from the cache or built (progress bars), the placement is solved for the
        budget with a KV cache of ``context`` tokens, and every FFN is split into hot rows on
        ``device`` and cold rows on the CPU (see :meth:`offload`). With ``device="cpu"``,
        ``gpu_memory=0`` runs the hybrid with every neuron cold: the CPU-only sparse engine.

        ``weights="float16"``: weight matrices are stored in fp16 and widened in the kernels
        (:mod:`offload.half`), half the bytes a token reads. On the CPU (fp32 activations) it applies to
        the whole model; with a GPU budget, to the cold rows the CPU reads (the device side takes
        ``dtype``). The default ``"float32"`` keeps transformers' fp32 numbers exactly.

        ``before_offload(model)``, if given, is called once the model and tokenizer are loaded and before
        the hybrid's preparation (which can take minutes the first time), so that cheap checks such as a
        prompt's length fail first. Invalid arguments raise UsageError / BudgetError before anything loads."""
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
        if weights == "float16" and device.type == "cpu" and dtype != torch.float32:
            raise UsageError("weights='float16' on the CPU stores fp16 under fp32 activations: use dtype='float32' "
                             "(the default on the CPU)")
        if weights == "float16" and device.type != "cpu" and gpu_memory is None:
            raise UsageError("weights='float16' on a GPU applies to the hybrid's cold rows (give gpu_memory=); "
                             "for a dense GPU model choose dtype='float16'")
        if weights == "float16":
            from offload.half import store_weights_fp16  # numba: imported only when used
        ckpt = open_checkpoint(model, revision=revision, local_files_only=local_files_only)
        if budget is None:  # dense: the whole model on the device
            net = build_model(ckpt, dtype=dtype, device=device, progress=progress)
            if weights == "float16":
                store_weights_fp16(net)
            m = cls(net, load_tokenizer(ckpt), ckpt, device=device)
            m.weights = weights
            if before_offload is not None:
                before_offload(m)
            return m
        # Hybrid: load dense on the CPU in fp32, then split every FFN between the device and the CPU.
        net = build_model(ckpt, dtype=torch.float32, device="cpu", progress=progress)
        if weights == "float16":
            store_weights_fp16(net)
        m = cls(net, load_tokenizer(ckpt), ckpt, device=torch.device("cpu"), gpu_memory=budget)
        m.weights = weights
        if before_offload is not None:
            before_offload(m)
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
                             eos_token_id=_as_tuple(eos_token_id, int), stop_strings=_as_tuple(stop_strings, str),
                             pad_token_id=pad_token_id, seed=seed)
        if self.hybrid_stats is not None:
            self.hybrid_stats.reset()
        ids, self.last_stats = generate(self.model, input_ids, cfg, max_context=self.max_context,
                                        streamer=streamer, tokenizer=self.tokenizer)
        return ids

    def _default_eos(self) -> list[int]:
        eos = set(_as_tuple(self.config.eos_token_id, int))
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            eos.add(tok_eos)
        return sorted(eos)
