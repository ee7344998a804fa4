"""What the Triton kernels share: the backend choice (compiled, interpreted or the torch reference) and
the argument checks their launchers run. The checks read only metadata, so they also run on the fake
tensors torch.compile traces with; nothing here syncs with the device."""
from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.jit import JITFunction

BACKENDS = ("auto", "triton", "torch")
# Decode-sized batches only: the batch is padded to a power of two inside one program and held in
# registers next to the weight tile. Larger batches (prefill) belong to a dense GEMM.
MAX_BATCH = 8
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _probe():
    pass


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------
def interpreter_active() -> bool:
    """True when this module's Triton kernels run in Triton's CPU interpreter.

    Triton decides at import time: ``@triton.jit`` returns an interpreted function, for our kernels
    and for triton.language's own helpers (``tl.sum``, ``tl.sigmoid``), only if
    ``TRITON_INTERPRET=1`` was in the environment when triton and this module were imported.
    Setting the variable later has no effect, so this checks what actually happened.
    """
    return not isinstance(_probe, JITFunction)


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """Which implementation runs for tensors on ``device``: "triton" or "torch".

    ``backend="auto"`` (what the registered ``torch.ops.offload.*`` operators do):

    ================================  ===========================================================
    CUDA tensors                      "triton": the compiled Triton kernel
    CPU tensors, interpreter active   "triton": the same kernel in Triton's interpreter (tests;
                                      ~10 ms per program instance, so small shapes only)
    CPU tensors otherwise             "torch": the torch reference (the hot side when the runtime
                                      runs with ``device="cpu"``)
    ================================  ===========================================================

    ``backend="triton"`` / ``"torch"`` force one; "triton" on CPU without the interpreter raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"tensors must be on a CUDA or CPU device, got {device}")
    if backend != "auto":
        return backend
    if device.type == "cuda" or interpreter_active():
        return "triton"
    return "torch"


def require_triton_device(device: torch.device, op: str) -> None:
    if device.type == "cpu" and not interpreter_active():
        raise ValueError(
            f"{op}: the Triton kernel got CPU tensors but Triton is not in interpreter mode "
            "(set TRITON_INTERPRET=1 before importing triton to run it on CPU for tests); "
            "use backend='torch' (or 'auto') for the CPU reference path")


def use_fixed_config(device: torch.device) -> bool:
    # The interpreter has no timings worth tuning on (and autotuning there takes minutes).
    return device.type == "cpu" or interpreter_active()


def device_guard(device: torch.device):
    # Triton launches on the *current* CUDA device; make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, tuned, grid, args: tuple, meta: dict, fixed_config: dict, device: torch.device) -> None:
    """Launch a hot-side kernel on ``grid(config)`` (config: its block sizes): with ``fixed_config`` where
    use_fixed_config (CPU / the interpreter), else ``tuned()``, its autotuned version, with the config the
    tuner picks."""
    with device_guard(device):
        if use_fixed_config(device):
            kernel[grid(fixed_config)](*args, **meta, **fixed_config)
        else:
            tuned()[grid](*args, **meta)


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous along its last dimension (stride(-1) == 1), got strides "
            f"{tuple(t.stride())}; call .contiguous()")


def check_idx(idx, device: torch.device) -> None:
    check_tensor("idx", idx, 1)
    if idx.dtype != torch.int32:
        raise TypeError(f"idx must be torch.int32, got {idx.dtype}; convert with idx.to(torch.int32)")
    check_last_dim_contiguous("idx", idx)
    check_same_device("idx", idx, device)


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name}: tensors must be on a CUDA or CPU device, got {device}")


def check_no_grad(op: str, **tensors) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{op}: {name} requires grad, but the sparse FFN kernels are inference-only (no "
                    "autograd formula); call under torch.inference_mode() or torch.no_grad()")


def check_batch(name: str, b: int) -> None:
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(
            f"{name} must have 1..{MAX_BATCH} rows (tokens), got {b}; the sparse kernels are for "
            "decode, use a dense matmul for larger batches")


def check_token_rows(name: str, t) -> tuple[int, int]:
    """The per-token input of a decode kernel: a 2-D float tensor [b ≤ MAX_BATCH, d] on a CPU or CUDA
    device, contiguous along d. Returns (b, d)."""
    check_tensor(name, t, 2)
    check_float(name, t)
    check_last_dim_contiguous(name, t)
    check_same_device(name, t, t.device)
    check_batch(name, t.shape[0])
    return t.shape[0], t.shape[1]
