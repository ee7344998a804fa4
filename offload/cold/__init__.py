"""Cold neurons on the CPU: the sparse FFN kernel and the worker thread that overlaps it with the GPU."""
from .ffn import KINDS, ColdFFN, numba_available, reference_forward
from .worker import ColdFuture, ColdWorker

__all__ = ["KINDS", "ColdFFN", "ColdFuture", "ColdWorker", "numba_available", "reference_forward"]
