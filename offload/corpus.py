"""Calibration and evaluation text, split so that evaluation never sees calibration or training text.

The default text is Python's ``pydoc_data.topics`` (English prose about Python, ~465 KB, shipped
with every Python). It is split *by topic*, deterministically: with the topic keys sorted and
duplicate topic texts dropped (``if`` and ``else`` share one), topic number ``i`` goes to

- ``evaluation`` when ``i % 5 == 0``   (held out: used only by ``offload eval``; ~15 % of the text),
- ``validation`` when ``i % 10 == 6``  (choosing operating points, predictor recall; ~11 %),
- ``calibration`` otherwise            (profiling and predictor training).

A user's text file is split by paragraph blocks the same way (block i of ~2 KB goes where topic i
would), so the three parts are disjoint and all cover the file.

``load_corpus(path=None) → Corpus``; ``tokenize(tokenizer, text) → LongTensor [t]``;
``require_tokens(ids, needed, what)`` raises :class:`CorpusError` saying how many tokens are needed
and how many the text has; ``windows(ids, size, max_tokens)`` → [m, size] non-overlapping windows.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from offload.errors import OffloadError

DEFAULT_SOURCE = "pydoc_data.topics"
_BLOCK_CHARS = 2000  # user text: paragraphs are grouped into blocks of about this many characters


class CorpusError(OffloadError, ValueError):
    """A text file that does not exist, cannot be read, or is too short for what was asked."""


@dataclass(frozen=True)
class Corpus:
    """Three disjoint parts of one text source; ``digest`` identifies the source (sha256 prefix)."""

    source: str
    digest: str
    calibration: str
    validation: str
    evaluation: str

    def part(self, name: str) -> str:
        if name not in ("calibration", "validation", "evaluation"):
            raise ValueError(f"corpus part {name!r}: expected calibration, validation or evaluation")
        return getattr(self, name)


def _bucket(i: int) -> str:
    if i % 5 == 0:
        return "evaluation"
    if i % 10 == 6:
        return "validation"
    return "calibration"


def _split(pieces: list[str], source: str, digest: str) -> Corpus:
    parts: dict[str, list[str]] = {"calibration": [], "validation": [], "evaluation": []}
    for i, piece in enumerate(pieces):
        parts[_bucket(i)].append(piece)
    if len(pieces) < 10:  # too few blocks for the round robin: split the one text by position
        text = "\n\n".join(pieces)
        a, b = int(len(text) * 0.7), int(len(text) * 0.8)
        parts = {"calibration": [text[:a]], "validation": [text[a:b]], "evaluation": [text[b:]]}
    return Corpus(source, digest, *("\n\n".join(parts[k]).strip() for k in ("calibration", "validation", "evaluation")))


def default_corpus() -> Corpus:
    """``pydoc_data.topics`` split by topic key (see the module docstring)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    digest = hashlib.sha256("\0".join(f"{k}\0{topics[k]}" for k in keys).encode()).hexdigest()[:16]
    bodies = list(dict.fromkeys(topics[k].strip() for k in keys))  # some topics are copies ("if", "else")
    return _split(bodies, DEFAULT_SOURCE, digest)


def read_text(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file; CorpusError when it is missing, unreadable or empty."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CorpusError(f"{path}: text file not found")
    if os.path.isdir(path):
        raise CorpusError(f"{path}: is a directory; expected a UTF-8 text file")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the text file ({e.strerror or e})") from None
    if not text.strip():
        raise CorpusError(f"{path}: the text file is empty; calibration needs English (or target-domain) text")
    return text


def file_corpus(path: str | os.PathLike) -> Corpus:
    """A user's text file split into paragraph blocks of ~2 KB, dealt round robin (module docstring)."""
    text = read_text(path)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    blocks, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= _BLOCK_CHARS:
            blocks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        blocks.append("\n\n".join(cur))
    return _split(blocks, os.fspath(path), digest)


def load_corpus(path: str | os.PathLike | None = None) -> Corpus:
    """The default corpus (``path=None``) or a text file's, split into calibration/validation/evaluation."""
    return default_corpus() if path is None else file_corpus(path)


def text_digest(path: str | os.PathLike | None) -> str:
    """The digest load_corpus(path) would carry (to tell whether an eval text was the calibration text)."""
    return load_corpus(path).digest


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [t] (int64) of plain text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def require_tokens(ids: torch.Tensor, needed: int, what: str) -> None:
    """Raise CorpusError unless ``ids`` holds at least ``needed`` tokens."""
    have = int(ids.numel())
    if have < needed:
        raise CorpusError(f"{what} is too short: {have} tokens, at least {needed} are needed "
                          f"(give a longer text file with --text)")


def windows(ids: torch.Tensor, size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [m, size] from the start of ``ids`` (the remainder is dropped), at most
    ``max_tokens`` tokens in all (rounded down to whole windows, at least one window)."""
    if size < 2:
        raise ValueError(f"window={size}: expected at least 2 tokens")
    ids = ids.reshape(-1)
    m = ids.numel() // size
    if max_tokens is not None:
        m = min(m, max(1, max_tokens // size))
    if m == 0:
        raise CorpusError(f"text too short for one window: {ids.numel()} tokens, a window is {size}")
    return ids[: m * size].view(m, size)
