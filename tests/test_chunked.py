"""chunked_attention (Rabe & Staats 2021): what is particular to it.

Its numbers (lengths, dtypes, masks, GQA, random shapes), its memory and its errors
are tested with flash_attention's in tests/test_tiled_variants.py. Here: each query
chunk runs under ``torch.utils.checkpoint``, so the forward pass saves its inputs
for the backward, never a block of probabilities, and without gradients nothing is
saved at all.
"""

import torch

from attention_lib import attention_ref, chunked_attention
from helpers import make_qkv


def _saved(fn):
    """The tensors autograd saves for the backward while ``fn()`` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_query_chunks_are_checkpointed_no_probabilities_are_saved():
    B, H, L, S, D = 1, 2, 96, 80, 8
    q, k, v = make_qkv(B, H, L, S, D, requires_grad=True)
    out, saved = _saved(lambda: chunked_attention(q, k, v, q_chunk=16, kv_chunk=32))
    largest_input = max(t.numel() for t in (q, k, v))
    assert saved and max(t.numel() for t in saved) <= largest_input, [tuple(t.shape) for t in saved]
    # autograd through the chunks would have kept probability blocks worth the whole score matrix
    _, plain = _saved(lambda: torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
    assert max(t.numel() for t in plain) == B * H * L * S
    # and the recomputing backward is still exact
    out.backward(torch.ones_like(out))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_ref(qr, kr, vr).backward(torch.ones_like(out).double())
    for ours, ref in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(ours.grad, ref.grad.float(), atol=1e-5, rtol=1e-4)


def test_no_grad_saves_nothing():
    q, k, v = make_qkv(1, 2, 37, 41, 16, requires_grad=True)
    with torch.no_grad():
        out, saved = _saved(lambda: chunked_attention(q, k, v, q_chunk=8, kv_chunk=8))
    assert saved == [] and out.grad_fn is None
