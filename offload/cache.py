"""Where per-model artifacts live: ``$OFFLOAD_CACHE`` or ``~/.cache/offload``, one folder per model identity."""
from __future__ import annotations

import os
import shutil
import string
import time


def cache_root() -> str:
    root = os.environ.get("OFFLOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "offload")
    return root


def model_cache_dir(identity: str, create: bool = True) -> str:
    path = os.path.join(cache_root(), identity)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def prune_versions(parent: str, current: str, max_age_days: float = 30.0) -> list[str]:
    """Mark ``parent/current`` used now (its mtime) and remove the sibling version folders (named like
    ``current``: as many lowercase hex digits) not used for ``max_age_days``: every upgrade of the package
    starts a new folder of compiled kernels (offload.cpu names it by a hash of its sources), and the old
    ones would otherwise stay forever. A folder another install still uses keeps being touched, so it
    stays. Returns the removed paths; a read-only or missing cache is left as it is."""
    removed = []
    try:
        os.makedirs(os.path.join(parent, current), exist_ok=True)
        os.utime(os.path.join(parent, current))
        names = os.listdir(parent)
    except OSError:
        return removed
    cutoff = time.time() - max_age_days * 86400
    for name in names:
        path = os.path.join(parent, name)
        if name == current or len(name) != len(current) or not set(name) <= set(string.hexdigits.lower()):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path) and os.stat(path).st_mtime < cutoff:
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            pass  # pruned by another process meanwhile, or not ours to remove
    return removed
