"""Where per-model artifacts live: ``$OFFLOAD_CACHE`` or ``~/.cache/offload``, one folder per model identity."""
from __future__ import annotations

import os


def cache_root() -> str:
    root = os.environ.get("OFFLOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "offload")
    return root


def model_cache_dir(identity: str, create: bool = True) -> str:
    path = os.path.join(cache_root(), identity)
    if create:
        os.makedirs(path, exist_ok=True)
    return path
