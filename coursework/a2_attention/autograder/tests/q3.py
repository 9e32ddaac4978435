import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q3
from attention_lib.grading.public import mha_inputs, mha_reference


def test_mha_shapes_and_gqa(ns):
    f = get_function(ns, "multi_head_attention")
    for B, L, E, H, Hkv in [(1, 1, 8, 2, 1), (2, 7, 24, 6, 2), (3, 9, 32, 8, 8), (2, 5, 16, 4, 1)]:
        args = mha_inputs(B, L, E, H, Hkv, seed=L)
        out = expect_tensor(call(f, *args, H, Hkv), f"multi_head_attention with E={E}, H={H}, Hkv={Hkv}", shape=(B, L, E), dtype=torch.float32)
        expect_close(out, mha_reference(*args, H, Hkv), f"multi_head_attention with E={E}, H={H}, Hkv={Hkv}")


def test_mha_causal_is_causal(ns):
    """Changing the last token does not change the outputs at earlier positions (is_causal=True)."""
    f = get_function(ns, "multi_head_attention")
    x, *ws = mha_inputs(2, 8, 16, 4, 2, seed=3)
    out = call(f, x, *ws, 4, 2, is_causal=True)
    expect_close(out, mha_reference(x, *ws, 4, 2, is_causal=True), "multi_head_attention(is_causal=True)")
    x2 = x.clone()
    x2[:, -1] += 1.0
    out2 = call(f, x2, *ws, 4, 2, is_causal=True)
    expect_close(out2[:, :-1], out[:, :-1], "outputs before the changed last token")
