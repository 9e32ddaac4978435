import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q3
def _masked_ref(s, mask):
    from attention_lib import softmax as ref_softmax
    return ref_softmax(s.double().masked_fill(~mask, float("-inf"))).to(s.dtype)


@weight(2)  # the point of the question: never NaN
def test_random_masks_with_empty_rows(ns):
    f = get_function(ns, "masked_softmax")
    g = torch.Generator().manual_seed(5)
    for B, L, S in [(2, 7, 9), (3, 1, 33), (1, 16, 16)]:
        s = 3 * torch.randn(B, L, S, generator=g)
        mask = torch.rand(B, L, S, generator=g) > 0.5
        mask[0, 0] = False  # one row sees nothing
        out = expect_tensor(call(f, s, mask), f"masked_softmax on shape {(B, L, S)}", shape=s.shape, dtype=s.dtype)
        expect_close(out, _masked_ref(s, mask), f"masked_softmax on shape {(B, L, S)}", hint=renormalise_hint(s, mask))


def test_broadcast_mask(ns):
    f = get_function(ns, "masked_softmax")
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 5, 5, generator=g)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()  # broadcasts over (B, H)
    expect_close(call(f, s, mask), _masked_ref(s, mask), "masked_softmax with a (L, S) mask on (B, H, L, S) scores",
                 hint=renormalise_hint(s, mask))
    pad = torch.tensor([True, True, False, False, False]).view(1, 1, 1, 5)
    expect_close(call(f, s, pad), _masked_ref(s, pad), "masked_softmax with a (1, 1, 1, S) padding mask")


def test_large_masked_scores(ns):
    f = get_function(ns, "masked_softmax")
    s = torch.tensor([[1e4, 5.0, 1.0], [2e4, 2e4, -2e4]])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    expect_close(call(f, s, mask), _masked_ref(s, mask), "masked_softmax with huge scores under the mask")


def test_gradient_is_finite(ns):
    f = get_function(ns, "masked_softmax")
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[2] = False
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    out = call(f, x, mask)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailure("the output of masked_softmax does not depend on scores through autograd (no gradient).")
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    expect_tensor(grad, "the gradient of masked_softmax", shape=s.shape)
    x_ref = s.clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad((_masked_ref(x_ref, mask) * w).sum(), x_ref)
    expect_close(grad, grad_ref, "the gradient of masked_softmax")
