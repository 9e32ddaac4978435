"""attention_lib.memory.peak_memory: exact on known allocations, deterministic, honest about frees."""

import pytest
import torch

from attention_lib import scaled_dot_product_attention
from attention_lib.memory import StorageTracker, peak_memory
from helpers import make_qkv


def test_a_known_allocation_gives_its_exact_nbytes():
    out, peak = peak_memory(lambda: torch.empty(1000, dtype=torch.float32))
    assert peak == out.nbytes == 4000
    out, peak = peak_memory(lambda n: torch.ones(n, 7, dtype=torch.float64), 123)
    assert peak == 123 * 7 * 8


def test_inputs_views_and_in_place_writes_cost_nothing():
    x = torch.randn(64, 64)
    assert peak_memory(lambda t: t, x)[1] == 0
    assert peak_memory(lambda t: t.t()[3:].unsqueeze(0).expand(2, -1, -1), x)[1] == 0
    assert peak_memory(lambda t: t.mul_(2).add_(1), x)[1] == 0
    assert peak_memory(lambda t: t * 2, x)[1] == x.nbytes


def test_a_freed_temporary_counts_toward_the_peak_but_not_after():
    def fn():
        tmp = torch.zeros(2000)  # 8000 bytes, freed below
        small = tmp[:10].clone()  # 40 bytes, survives
        del tmp
        return small

    tracker = StorageTracker()
    with tracker:
        out = fn()
    assert tracker.peak == 8000 + 40
    assert tracker.current == out.nbytes == 40
    # a later allocation reuses the freed room: the peak does not grow
    def fn2():
        a = torch.zeros(2000)
        del a
        return torch.zeros(2000)

    assert peak_memory(fn2)[1] == 8000


def test_peak_is_deterministic_and_sees_the_score_matrix():
    q, k, v = make_qkv(1, 2, 256, 256, 32)
    peaks = [peak_memory(scaled_dot_product_attention, q, k, v)[1] for _ in range(3)]
    assert peaks[0] == peaks[1] == peaks[2]
    assert peaks[0] >= 2 * 256 * 256 * 4  # the (B, H, L, S) float32 scores, at least


def test_the_backward_pass_is_measured_too():
    q, k, v = make_qkv(1, 2, 128, 128, 32, requires_grad=True)

    def forward():
        return scaled_dot_product_attention(q, k, v).sum()

    def forward_backward():
        out = scaled_dot_product_attention(q, k, v).sum()
        out.backward()
        return out

    fwd = peak_memory(forward)[1]
    both = peak_memory(forward_backward)[1]
    assert both > fwd >= 2 * 128 * 128 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_counts_a_known_allocation_within_allocator_rounding():
    x = torch.ones(1, device="cuda")
    out, peak = peak_memory(lambda t: torch.empty(1000, 1000, device=t.device), x)
    assert out.nbytes <= peak <= out.nbytes + 512
