"""``triton_flash_attention`` without importing triton at ``import attention_lib``.

Triton decides, when its ``@triton.jit`` decorators run, whether kernels are compiled
for the GPU or run in its interpreter (``TRITON_INTERPRET``), so the kernel module
is imported on the first call, once the device of the inputs is known.
"""

from __future__ import annotations

__all__ = ["triton_flash_attention"]


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

    name = __package__ + ".triton_flash"
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
