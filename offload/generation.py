"""Token generation with transformers' ``generate`` keyword names and meanings.

``generate(model, input_ids, cfg, …)`` runs one prefill forward over the prompt, then one cached
forward per new token, and returns (ids [b, prompt + new], stats). It is the engine's only decode
loop: ``OffloadedModel.generate``, ``offload eval`` (greedy agreement) and the tests all go through it
(``logits=`` collects what each forward returned).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from offload.errors import GenerationError


@dataclass
class GenerationStats:
    """Timings of the last generate call. Prefill = the prompt forward; decode = every token after."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first new token comes from the prefill's logits; the decode forwards make the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        def bad(arg, value, expected):
            raise GenerationError(f"{arg}={value!r}: expected {expected}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 0")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0 or self.temperature != self.temperature:
            bad("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 disables top-k)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if self.min_p is not None and (not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1):
            bad("min_p", self.min_p, "a number in [0, 1] (or None: off)")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1.0 means no penalty)")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                bad("stop_strings", self.stop_strings, "non-empty strings")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def as_tuple(value, kind) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind):
        return (value,)
    return tuple(value)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top_k, then outside the smallest set with mass ≥ top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """transformers' MinPLogitsWarper: set to -inf every logit whose probability is below min_p times the
    most likely token's (the most likely token always stays)."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: torch.Tensor, ids: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token for each row of logits [b, V] given the ids so far [b, t]."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ids, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.min_p:  # after temperature, top-k and top-p, as transformers orders its warpers
        logits = filter_min_p(logits, cfg.min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after. CPU decode keeps torch's
    own ops (embedding, norms, sampling) on one thread: the weight products run on numba's pool, and two
    pools of spinning workers on the same cores slow each other down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_prompt_fits(prompt_len: int, max_new_tokens: int, max_context: int) -> None:
    """GenerationError unless a prompt of ``prompt_len`` tokens and ``max_new_tokens`` fit the context
    (callers check this before expensive work too)."""
    if prompt_len >= max_context:
        raise GenerationError(f"input_ids: the prompt has {prompt_len} tokens but the model's context is "
                              f"{max_context} tokens (max_position_embeddings); shorten the prompt")
    if prompt_len + max_new_tokens > max_context:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: the prompt ({prompt_len} tokens) plus the new "
                              f"tokens exceed the context of {max_context}; at most "
                              f"{max_context - prompt_len} new tokens fit")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, cfg: SamplingConfig, *, max_context: int,
             streamer=None, tokenizer=None, logits: list | None = None) -> tuple[torch.Tensor, GenerationStats]:
    """Prefill the prompt, then decode up to cfg.max_new_tokens tokens with the KV cache.

    ``model(ids, cache, start, last_only=...)`` returns logits [b, t, V]; ``model.new_cache(b, n)`` a
    cache for n positions; ``model.device`` where ids go. Finished rows (eos or stop string) are padded
    with pad_token_id. ``logits``: a list that receives the prompt's logits [b, t, V] (every position),
    then each decode step's [b, 1, V].
    """
    if not torch.is_tensor(input_ids):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(f"input_ids: expected a non-empty integer tensor [batch, tokens], got "
                              f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if cfg.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings: needs a tokenizer to decode the generated text")
    b, prompt_len = input_ids.shape
    check_prompt_fits(prompt_len, cfg.max_new_tokens, max_context)
    stats = GenerationStats(prompt_tokens=b * prompt_len)
    ids = input_ids.to(torch.int64)
    if streamer is not None:
        streamer.put(ids.cpu())
    if cfg.max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return ids, stats

    generator = None
    if cfg.seed is not None and not cfg.greedy:
        generator = torch.Generator().manual_seed(cfg.seed)
    device = model.device
    cache = model.new_cache(b, prompt_len + cfg.max_new_tokens)
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.int64) if cfg.eos_token_id else None
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)
    finished = torch.zeros(b, dtype=torch.bool)

    t0 = time.perf_counter()
    out = model(ids.to(device), cache, 0, last_only=logits is None)
    if logits is not None:
        logits.append(out)
    last = out[:, -1]
    t_decode = time.perf_counter()
    stats.prefill_seconds = t_decode - t0
    with torch_threads(1) if device.type == "cpu" else contextlib.nullcontext():
        for step in range(cfg.max_new_tokens):
            token = next_tokens(last, ids.to(last.device), cfg, generator).cpu()
            token = torch.where(finished, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            stats.new_tokens += 1
            if streamer is not None:
                streamer.put(token)
            if eos is not None:
                finished |= torch.isin(token, eos)
            if cfg.stop_strings:
                for row in range(b):
                    if not finished[row]:
                        text = tokenizer.decode(ids[row, prompt_len:])
                        if any(s in text for s in cfg.stop_strings):
                            finished[row] = True
            if bool(finished.all()) or step == cfg.max_new_tokens - 1:
                break
            out = model(token[:, None].to(device), cache, prompt_len + step, last_only=True)
            if logits is not None:
                logits.append(out)
            last = out[:, -1]
    stats.decode_seconds = time.perf_counter() - t_decode
    if streamer is not None:
        streamer.end()
    return ids, stats
