"""softmax, naive_softmax and logsumexp."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import logsumexp, naive_softmax, softmax


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_matches_torch(dtype):
    x = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)).to(dtype) * 4
    torch.testing.assert_close(softmax(x), torch.softmax(x.double(), -1).to(dtype))
    torch.testing.assert_close(softmax(x, dim=1), torch.softmax(x.double(), 1).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_large_inputs_stay_exact(dtype, magnitude):
    x = torch.tensor([[magnitude, -magnitude, 0.0, magnitude - 1.0]], dtype=dtype)
    out = softmax(x)
    assert torch.isfinite(out).all()
    expected = torch.softmax(x.double(), -1).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-6)


def test_naive_softmax_overflows_where_stable_does_not():
    x = torch.tensor([1000.0, 0.0])
    assert torch.isnan(naive_softmax(x)).any()
    torch.testing.assert_close(softmax(x), torch.tensor([1.0, 0.0]))


def test_fully_masked_row_is_zero_with_zero_gradient():
    x = torch.tensor([[float("-inf")] * 4, [0.0, 1.0, float("-inf"), 2.0]], requires_grad=True)
    out = softmax(x)
    assert torch.equal(out[0], torch.zeros(4))
    torch.testing.assert_close(out[1].sum(), torch.tensor(1.0))
    (out * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0], torch.zeros(4))


def test_gradcheck():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softmax, (x,))


def test_logsumexp():
    x = torch.randn(4, 9) * 50
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, -1))
    assert logsumexp(torch.full((3,), float("-inf"))).item() == float("-inf")
    torch.testing.assert_close(torch.exp(x - logsumexp(x, keepdim=True)), softmax(x))


def test_rejects_integer_input():
    with pytest.raises(ValueError, match="floating-point"):
        softmax(torch.arange(3))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40),
    st.sampled_from([torch.float16, torch.float32]),
)
def test_property_sums_to_one_and_matches_float64(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    out = softmax(x)
    assert torch.isfinite(out).all() and (out >= 0).all()
    ref = torch.softmax(x.double(), -1)
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    assert (out.double() - ref).abs().max().item() <= tol
    assert abs(out.double().sum().item() - 1.0) <= 10 * tol * len(values)
