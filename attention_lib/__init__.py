"""attention_lib: the companion package of the course "Attention, from the dot product up".

Every attention variant is a function with the signature of
``torch.nn.functional.scaled_dot_product_attention`` and the layout (B, H, L, E);
``attention_ref`` (float64) is the oracle they are all tested against.
Modules follow the chapters: one module per idea. The imports below are in the
order of the chapters, not sorted (ruff's I001 is off for this file).
"""

# Where attention came from (chapter 0)
from .kernel_regression import kernel_scores, nadaraya_watson, nadaraya_watson_weights
from .additive import (
    AdditiveAttention,
    LuongAttention,
    additive_attention,
    additive_attention_weights,
    additive_scores,
    multiplicative_attention,
    multiplicative_attention_weights,
    multiplicative_scores,
)

# Foundations (chapters 1-7)
from .softmax import logsumexp, naive_softmax, softmax
from .attention import attention_ref, attention_weights, scaled_dot_product_attention
from . import masks
from .masks import cache_causal_mask
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
from .kv_cache import KVCache, kv_cache_bytes
from . import flex

# Kernel and sparse attention (chapter 12)
from .performer import favor_features, orthogonal_gaussian, performer_attention
from .block_sparse import (
    BlockTable,
    bigbird_mask_mod,
    block_mask_from_mask_mod,
    block_sparse_attention,
    block_sparse_flops,
    fixed_mask_mod,
    strided_mask_mod,
)

# Serving (chapter 13)
from .paged import PagedKVCache, paged_attention
from .split_k import split_k_attention

# Smaller caches (chapter 14)
from .mla import MultiHeadLatentAttention, mla_cache_bytes
from .sinks import SinkKVCache, streaming_mask
from . import kv_quant

# What attention learns (chapters 15-16)
from . import circuits
from .circuits import AttentionOnlyTransformer
from . import gpt
from .gpt import GPT, GPTConfig, generate

# Beyond one device (chapter 17)
from .ring import ring_attention

__version__ = "0.1.0"

__all__ = [
    "nadaraya_watson",
    "nadaraya_watson_weights",
    "kernel_scores",
    "additive_scores",
    "additive_attention",
    "additive_attention_weights",
    "AdditiveAttention",
    "multiplicative_scores",
    "multiplicative_attention",
    "multiplicative_attention_weights",
    "LuongAttention",
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
    "favor_features",
    "orthogonal_gaussian",
    "performer_attention",
    "BlockTable",
    "bigbird_mask_mod",
    "block_mask_from_mask_mod",
    "block_sparse_attention",
    "block_sparse_flops",
    "fixed_mask_mod",
    "strided_mask_mod",
    "PagedKVCache",
    "paged_attention",
    "split_k_attention",
    "MultiHeadLatentAttention",
    "mla_cache_bytes",
    "SinkKVCache",
    "streaming_mask",
    "kv_quant",
    "circuits",
    "AttentionOnlyTransformer",
    "gpt",
    "GPT",
    "GPTConfig",
    "generate",
    "ring_attention",
]
