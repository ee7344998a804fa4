"""Hot-side FFN kernels: Triton on the GPU, torch references beside them.

    from offload.kernels.gather_gemv import gather_gemv
    from offload.kernels.sparse_down import sparse_down, ffn_hot_forward

    h = gather_gemv(x, w1, idx, w2, b1, activation)      # [b, k] fp32, reads only rows idx
    y = sparse_down(h, w3t, idx)                           # [b, d] fp32, reads only rows idx of W_downᵀ
    y = ffn_hot_forward(x, idx, w1=w1, w2=w2, w3t=w3t)     # both

    # packed 4-bit hot neurons (offload.formats.packed_rows.Q4Rows / Q4Down)
    from offload.kernels.sparse_down_q4 import ffn_hot_forward_q4
    y = ffn_hot_forward_q4(x, idx, rows=rows, down=down)    # gather_gemv_q4 + sparse_down_q4

Importing this package registers torch.ops.offload.gather_gemv, sparse_down, gather_gemv_q4 and
sparse_down_q4.
The backend choice (backend="auto" | "triton" | "torch") is documented in ``resolve_backend``.
The functions are not re-exported here under their own names, since ``gather_gemv`` and
``sparse_down`` would then shadow the submodules of the same names.
"""
if __name__ != "offload.kernels":
    # Imported as a top-level ``kernels`` (the repository root on sys.path, e.g. `python -m pytest`
    # or a script run from the root): transformers probes for Hugging Face's `kernels` package that
    # way. Registering the torch ops a second time would fail, so this copy stays empty.
    __all__: list[str] = []
else:
    from . import gather_gemv, gather_gemv_q4, sparse_down, sparse_down_q4  # noqa: F401  (registers the ops)
    from .gather_gemv import ACTIVATIONS, MAX_BATCH, interpreter_active, resolve_backend
    from .sparse_down import ffn_hot_forward

    __all__ = ["ACTIVATIONS", "MAX_BATCH", "ffn_hot_forward", "gather_gemv", "interpreter_active",
               "resolve_backend", "sparse_down"]
