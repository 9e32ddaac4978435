"""attention_lib: the companion package of the course "Attention, from the dot product up".

Every attention variant is a function with the signature of
``torch.nn.functional.scaled_dot_product_attention`` and the layout (B, H, L, E);
``attention_ref`` (float64) is the oracle they are all tested against.
Modules follow the chapters: one module per idea.
"""

# Foundations (chapters 1-7)
from .softmax import logsumexp, naive_softmax, softmax
from .attention import attention_ref, attention_weights, scaled_dot_product_attention
from . import masks
from .multi_head import MultiHeadAttention
from .positional import apply_rotary, rotary_angles, sinusoidal_encoding

# Efficient attention (chapters 8-11)
from . import memory
from .memory import peak_memory
from .online_softmax import attention_block, merge_attention
from .chunked import chunked_attention
from .flash import flash_attention
from ._lazy_triton import triton_flash_attention
from .local import sliding_window_attention
from .linear import LinearAttentionState, linear_attention, linear_attention_step
from .kv_cache import KVCache, cache_causal_mask, kv_cache_bytes
from . import flex

# Beyond one device (chapter 13)
from .distributed import ring_attention

__version__ = "0.1.0"

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
