"""attention_lib.positional: sinusoidal encodings and rotary embeddings (RoPE)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import apply_rotary, attention_weights, rotary_angles, sinusoidal_encoding


# --- sinusoidal -------------------------------------------------------------------


@pytest.mark.parametrize("L,d", [(1, 2), (7, 16), (50, 64)])
def test_sinusoidal_matches_the_papers_formula(L, d):
    # Vaswani et al. 2017, section 3.5, written out with Python floats.
    expected = torch.tensor(
        [
            [
                math.sin(pos / 10000 ** (2 * (j // 2) / d)) if j % 2 == 0 else math.cos(pos / 10000 ** (2 * (j // 2) / d))
                for j in range(d)
            ]
            for pos in range(L)
        ],
        dtype=torch.float64,
    )
    got = sinusoidal_encoding(L, d, dtype=torch.float64)
    assert got.shape == (L, d) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_sinusoidal_dtype_and_known_values():
    pe = sinusoidal_encoding(3, 4, dtype=torch.float16)
    assert pe.dtype == torch.float16
    # position 0: sin 0 = 0 and cos 0 = 1 in every pair
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    # pair 0 has ω = 1: position 1 is (sin 1, cos 1)
    torch.testing.assert_close(pe[1, :2].float(), torch.tensor([math.sin(1.0), math.cos(1.0)]), rtol=0, atol=1e-3)


def test_sinusoidal_shift_is_a_rotation():
    # The paper's motivation: PE(pos + k) is a fixed linear map (a rotation per pair) of PE(pos).
    d, k = 16, 5
    pe = sinusoidal_encoding(40, d, dtype=torch.float64)  # (L, d)
    w = rotary_angles(torch.tensor([k]), d)[0]  # (d/2,): k · ω_i
    s, c = pe[:-k].unflatten(-1, (d // 2, 2)).unbind(-1)  # sin(pos ω), cos(pos ω): (L-k, d/2)
    shifted = torch.stack((s * w.cos() + c * w.sin(), c * w.cos() - s * w.sin()), dim=-1).flatten(-2)
    torch.testing.assert_close(shifted, pe[k:], rtol=0, atol=1e-12)


def test_sinusoidal_values_are_bounded_and_rows_distinct():
    pe = sinusoidal_encoding(128, 32)
    assert pe.abs().max() <= 1.0
    # each pair lies on the unit circle, so every row has norm sqrt(d/2)
    torch.testing.assert_close(pe.norm(dim=-1), torch.full((128,), 4.0), rtol=0, atol=1e-5)
    assert torch.cdist(pe, pe).add(torch.eye(128) * 10).min() > 0.1


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_positions=4, dim=3), dict(num_positions=4, dim=0), dict(num_positions=-1, dim=4), dict(num_positions=4, dim=4, base=1.0)],
)
def test_sinusoidal_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sinusoidal_encoding(**kwargs)


# --- rotary -------------------------------------------------------------------------


def _rope_complex(x, positions, base=10000.0):
    """Independent oracle: RoPE as complex multiplication by exp(i · pos · ω_j)."""
    D = x.shape[-1]
    omega = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    z = torch.view_as_complex(x.double().unflatten(-1, (D // 2, 2)).contiguous())  # (..., L, D/2)
    rot = torch.polar(torch.ones(len(positions), D // 2, dtype=torch.float64), positions.double()[:, None] * omega)
    return torch.view_as_real(z * rot).flatten(-2)  # (..., L, D)


@pytest.mark.parametrize("shape", [(1, 2), (7, 16), (2, 3, 9, 64), (2, 4, 1, 80)])
def test_rotary_matches_complex_multiplication(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(shape[-2]) * 3 + 2
    torch.testing.assert_close(apply_rotary(x, pos), _rope_complex(x, pos), rtol=0, atol=1e-12)


def test_rotary_preserves_norms():
    x = torch.randn(2, 3, 97, 64, generator=torch.Generator().manual_seed(1))
    y = apply_rotary(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # and it does change the vectors (except at position 0, which is the identity)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    assert (y[..., 1:, :] - x[..., 1:, :]).abs().max() > 0.1


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    t=st.integers(-500, 500),
    half_d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_rotary_score_depends_only_on_the_offset(m, n, t, half_d, seed):
    # (R(m) q) · (R(n) k) = (R(m + t) q) · (R(n + t) k) for every shift t.
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 2 * half_d, dtype=torch.float64, generator=g)  # (1, D) each
    m, n = max(m, -t), max(n, -t)  # keep m + t and n + t non-negative
    score = lambda a, b: (apply_rotary(q, torch.tensor([a])) @ apply_rotary(k, torch.tensor([b])).T).item()
    assert score(m, n) == pytest.approx(score(m + t, n + t), rel=1e-9, abs=1e-9)


def test_rotary_score_equals_relative_rotation():
    # (R(m) q) · (R(n) k) = q · (R(n - m) k): the absolute positions cancel.
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 1, 32, dtype=torch.float64, generator=g)
    for m, n in [(0, 0), (3, 10), (10, 3), (100, 57)]:
        lhs = apply_rotary(q, torch.tensor([m])) @ apply_rotary(k, torch.tensor([n])).T
        rhs = q @ apply_rotary(k, torch.tensor([n - m])).T
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)


def test_rotary_attention_weights_are_translation_invariant():
    # Shifting every position by the same amount leaves the attention weights unchanged,
    # including under a causal mask.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 16, dtype=torch.float64, generator=g)
    k = torch.randn(2, 4, 9, 16, dtype=torch.float64, generator=g)
    pq, pk = torch.arange(2, 9), torch.arange(9)
    w0 = attention_weights(apply_rotary(q, pq), apply_rotary(k, pk), is_causal=True)
    w1 = attention_weights(apply_rotary(q, pq + 1000), apply_rotary(k, pk + 1000), is_causal=True)
    torch.testing.assert_close(w0, w1, rtol=0, atol=1e-9)
    # while without RoPE the same q, k give different weights: the positions matter
    assert (attention_weights(q, k, is_causal=True) - w0).abs().max() > 1e-2


def test_rotary_with_offset_matches_a_slice_of_the_full_sequence():
    # Decoding with a KV cache: rotating the new tokens at offset + arange(L) gives the
    # same rows as rotating the whole sequence at once.
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(4))
    full = apply_rotary(x)
    torch.testing.assert_close(apply_rotary(x[..., 9:, :], torch.arange(9, 12)), full[..., 9:, :])


def test_rotary_inverse_and_gradient():
    # R(-m) undoes R(m); and since R is orthogonal, the gradient of <R x, g> is R(-m) g.
    x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(10)
    torch.testing.assert_close(apply_rotary(apply_rotary(x, pos), -pos), x.detach(), rtol=0, atol=1e-12)
    g = torch.randn_like(x)
    (apply_rotary(x, pos) * g).sum().backward()
    torch.testing.assert_close(x.grad, apply_rotary(g, -pos), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotary_low_precision_is_as_good_as_rounding(dtype):
    # Computed in float32: the only error is the final rounding to dtype.
    x = torch.randn(2, 2, 33, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    ref = _rope_complex(x, torch.arange(33))
    got = apply_rotary(x)
    assert got.dtype == dtype
    assert (got.double() - ref).abs().max() <= (ref.to(dtype).double() - ref).abs().max() + 1e-6


@pytest.mark.parametrize(
    "x,positions",
    [
        (torch.zeros(5), None),  # rank 1
        (torch.zeros(2, 5, 7), None),  # odd D
        (torch.zeros(2, 5, 8), torch.arange(4)),  # wrong length
        (torch.zeros(2, 5, 8), torch.zeros(5, 1)),  # not 1-D
    ],
)
def test_rotary_rejects_bad_arguments(x, positions):
    with pytest.raises(ValueError):
        apply_rotary(x, positions)
