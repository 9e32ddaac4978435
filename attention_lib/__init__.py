"""attention_lib: the companion package of the course "Attention, from the dot product up".

Every attention variant is a function with the signature of
``torch.nn.functional.scaled_dot_product_attention`` and the layout (B, H, L, E);
``attention_ref`` (float64) is the oracle they are all tested against.
"""

from . import masks
from .attention import attention_ref, attention_weights, scaled_dot_product_attention
from . import memory
from .memory import peak_memory
from .chunked import chunked_attention
from .flash import flash_attention
from .distributed import ring_attention
from .multi_head import MultiHeadAttention
from .local import sliding_window_attention
from .linear import LinearAttentionState, linear_attention, linear_attention_step
from .kv_cache import KVCache, cache_causal_mask, kv_cache_bytes
from . import flex
from .online_softmax import attention_block, merge_attention
from .positional import apply_rotary, rotary_angles, sinusoidal_encoding
from .softmax import logsumexp, naive_softmax, softmax

__version__ = "0.1.0"


def triton_flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """FlashAttention-2 as a Triton kernel (chapter 9); see :mod:`attention_lib.triton_flash`.

    A thin wrapper, so that ``import attention_lib`` never imports triton: the kernel
    module is imported on the first call. Triton decides at import whether kernels
    are compiled for the GPU or run in its interpreter (``TRITON_INTERPRET``). If the
    inputs are on the CPU and ``TRITON_INTERPRET`` is unset, it is set to ``1`` (and
    stays set), so CPU tensors just work, slowly: the interpreter is NumPy. This
    works if nothing imported triton before; otherwise set ``TRITON_INTERPRET=1``
    yourself before the first ``import triton``.
    """
    import importlib
    import os
    import sys

    name = __name__ + ".triton_flash"
    module = sys.modules.get(name)
    if module is None:
        on_cpu = getattr(getattr(query, "device", None), "type", None) == "cpu"
        if on_cpu and "TRITON_INTERPRET" not in os.environ:
            os.environ["TRITON_INTERPRET"] = "1"  # read when the module's @triton.jit run
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != "triton":
                raise
            raise ImportError("triton_flash_attention needs triton: pip install triton") from e
    return module.triton_flash_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

__all__ = [
    "scaled_dot_product_attention",
    "attention_ref",
    "attention_weights",
    "softmax",
    "naive_softmax",
    "logsumexp",
    "attention_block",
    "merge_attention",
    "masks",
    "MultiHeadAttention",
    "memory",
    "peak_memory",
    "chunked_attention",
    "flash_attention",
    "sliding_window_attention",
    "linear_attention",
    "linear_attention_step",
    "LinearAttentionState",
    "KVCache",
    "kv_cache_bytes",
    "cache_causal_mask",
    "flex",
    "sinusoidal_encoding",
    "rotary_angles",
    "apply_rotary",
    "triton_flash_attention",
    "ring_attention",
]
