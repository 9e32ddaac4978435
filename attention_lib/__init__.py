"""attention_lib: the companion package of the course "Attention, from the dot product up".

Every attention variant is a function with the signature of
``torch.nn.functional.scaled_dot_product_attention`` and the layout (B, H, L, E);
``attention_ref`` (float64) is the oracle they are all tested against.
"""

from . import masks
from .attention import attention_ref, attention_weights, scaled_dot_product_attention
from .multi_head import MultiHeadAttention
from .online_softmax import attention_block, merge_attention
from .softmax import logsumexp, naive_softmax, softmax

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
]
