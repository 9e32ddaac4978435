"""Ring attention (attention_lib.ring) on 2 and 4 CPU processes over gloo.

Outputs and gradients, gathered from every rank, are checked against single-process
``attention_ref`` with flash-attention's rule (``err <= 2 * err(naive, same dtype) +
floor``): causal and not, both layouts, odd local lengths, GQA. Further checks: the
number of rotations, causal block skipping and the zig-zag balance, each rank's score
memory, and that a failing rank ends the launch quickly instead of hanging.

Starting processes is the cost here, so every case for one world size runs in a
single launch (``_results``), and the tests read from it.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import attention_lib
from attention_lib import attention_ref, scaled_dot_product_attention
from attention_lib.launcher import launch
from attention_lib.memory import peak_memory
from attention_lib.ring import ring_attention, sequence_positions, shard_sequence, unshard_sequence
from attention_lib.ring_check import case_inputs, ring_check_worker
from helpers import FLOOR, max_err
from launch_workers import raise_on_rank_worker, sleep_worker

pytestmark = pytest.mark.timeout(300)  # a last guard against hangs; launch() has its own timeouts

WORLD_SIZES = [2, 4]
MEM_L = 256  # global length of the memory case, the same for every world size


def _cases(n: int) -> dict[str, dict]:
    """Every case for world size ``n``; ``L`` is the global length, ``L / n`` the local one."""
    return {
        "full_odd": dict(B=2, H=4, L=7 * n, D=16),
        "causal_odd": dict(B=2, H=4, L=7 * n, D=16, is_causal=True, seed=1),
        "causal_zigzag_odd_chunks": dict(B=2, H=3, L=10 * n, D=16, is_causal=True, layout="zigzag", seed=2),
        "full_zigzag_scale": dict(B=1, H=2, L=6 * n, D=16, layout="zigzag", scale=0.3, seed=3),
        "gqa_causal": dict(B=2, H=4, Hkv=2, L=9 * n, D=16, is_causal=True, seed=4),
        "gqa_mqa_zigzag_dv": dict(B=1, H=4, Hkv=1, L=8 * n, D=16, Dv=12, is_causal=True, layout="zigzag", seed=5),
        "bf16_causal": dict(B=1, H=2, L=7 * n, D=16, is_causal=True, dtype=torch.bfloat16, seed=6),
        "memory": dict(B=1, H=1, L=MEM_L, D=8, grad=False, memory=True, seed=7),
        "memory_causal_zigzag": dict(B=1, H=1, L=MEM_L, D=8, is_causal=True, layout="zigzag", grad=False, memory=True, seed=8),
    }


ACCURACY_CASES = [name for name in _cases(2) if not name.startswith("memory")]


@functools.lru_cache(maxsize=None)
def _results(n: int) -> dict[str, list[dict]]:
    """One launch per world size: case name -> [result of rank 0, ..., rank n-1]."""
    cases = _cases(n)
    per_rank = launch(ring_check_worker, n, list(cases.values()), timeout=120)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(cases)}


def _reference(case: dict, fn, dtype=None):
    """Output and gradients of single-process ``fn`` on the case's full sequence."""
    q, k, v, dout = case_inputs(case, "cpu")
    if dtype is not None:
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = dict(is_causal=case.get("is_causal", False), scale=case.get("scale"), enable_gqa=k.shape[1] != q.shape[1])
    out = fn(q, k, v, **kw)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("name", ACCURACY_CASES)
def test_output_and_gradients_match_single_process_reference(n, name):
    case, ranks = _cases(n)[name], _results(n)[name]
    layout = case.get("layout", "contiguous")
    ours = [unshard_sequence([r[key] for r in ranks], layout) for key in ("out", "dq", "dk", "dv")]
    ref = _reference(case, attention_ref, torch.float64)  # the oracle
    naive = _reference(case, scaled_dot_product_attention)  # the same dtype, one process
    dtype = case.get("dtype", torch.float32)
    floor = FLOOR[dtype]
    for what, o, r, b in zip(("out", "dq", "dk", "dv"), ours, ref, naive):
        assert o.shape == b.shape and o.dtype == dtype, f"{what}: {tuple(o.shape)} {o.dtype}"
        assert torch.isfinite(o).all(), f"{what} has NaN or inf"
        err, base = max_err(o, r), max_err(b, r)
        tol = 2 * base + (floor if what == "out" else 2 * floor)
        assert err <= tol, f"{what}: error {err:.3g} > 2 x naive {base:.3g} + floor"


def test_world_size_one_is_plain_attention():
    case = dict(B=2, H=4, Hkv=2, L=9, D=16, is_causal=True, seed=9)
    (r,) = (res[0] for res in launch(ring_check_worker, 1, [case]))
    ref = _reference(case, attention_ref, torch.float64)
    for what, ours, theirs in zip(("out", "dq", "dk", "dv"), (r["out"], r["dq"], r["dk"], r["dv"]), ref):
        assert max_err(ours, theirs) < 1e-5, what
    assert r["forward"]["forward_rotations"] == 0 and r["backward"]["backward_rotations"] == 0


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_forward_rotates_n_minus_1_times_and_backward_2n_minus_1(n):
    for name, ranks in _results(n).items():
        for rank, r in enumerate(ranks):
            assert r["forward"]["forward_rotations"] == n - 1, (name, rank, r["forward"])
            assert r["forward"]["backward_rotations"] == 0, (name, rank)
            if "backward" in r:  # N - 1 K/V rotations, and N hops that bring dK/dV home
                assert r["backward"]["backward_rotations"] == 2 * n - 1, (name, rank, r["backward"])
                assert r["backward"]["forward_rotations"] == 0, (name, rank)


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_causal_blocks_are_skipped_and_zigzag_balances_the_work(n):
    c = 7  # local length of "causal_odd"
    work = [r["forward"]["score_elements"] for r in _results(n)["causal_odd"]]
    # contiguous: rank r scores r full blocks below the diagonal and its diagonal block
    assert work == [(r + 1) * c * c for r in range(n)], work
    full = [r["forward"]["score_elements"] for r in _results(n)["full_odd"]]
    assert full == [n * c * c] * n, full  # without the mask nothing is skipped
    zig = [r["forward"]["score_elements"] for r in _results(n)["causal_zigzag_odd_chunks"]]
    half = 5  # chunk length: the local length 10 is two chunks
    # zig-zag: step 0 scores 3 chunk pairs, each later step 2: every rank the same
    assert zig == [(3 + 2 * (n - 1)) * half * half] * n, zig


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_score_memory_per_rank_scales_as_local_length_squared(n):
    c = MEM_L // n
    ranks = _results(n)["memory"]
    for r in ranks:
        assert r["forward"]["max_score_block"] == (c, c)  # never an L x L block
    zig = _results(n)["memory_causal_zigzag"]
    for r in zig:
        assert r["forward"]["max_score_block"] == (c // 2, c // 2)
    # measured: the peak tensor memory of the forward pass on each rank
    peaks = [r["peak_bytes"] for r in ranks]
    score_bytes = c * c * 4  # one float32 (L/N) x (L/N) block
    assert all(score_bytes <= p <= 8 * score_bytes for p in peaks), (peaks, score_bytes)
    q, k, v, _ = case_inputs(_cases(n)["memory"], "cpu")
    _, full_peak = peak_memory(scaled_dot_product_attention, q, k, v)
    assert full_peak >= MEM_L * MEM_L * 4  # one process holds all L x L scores
    assert max(peaks) <= 1.5 * full_peak / (n * n), (peaks, full_peak)


def test_peak_memory_falls_with_world_size_squared():
    p2 = max(r["peak_bytes"] for r in _results(2)["memory"])
    p4 = max(r["peak_bytes"] for r in _results(4)["memory"])
    assert 0.15 <= p4 / p2 <= 0.35, (p2, p4)  # (L/4)^2 / (L/2)^2 = 1/4


def test_a_rank_that_raises_fails_the_launch_quickly():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="first failure of 2 ranks: rank 1 raised:(.|\n)*rank 1 failed on purpose"):
        launch(raise_on_rank_worker, 2, 1, timeout=60)
    assert time.monotonic() - start < 30  # the healthy rank was stopped, not waited for


def test_a_hanging_launch_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        launch(sleep_worker, 2, 600.0, timeout=4)
    assert time.monotonic() - start < 30  # the sleeping ranks were terminated


def test_launch_results_come_back_in_rank_order():
    assert launch(raise_on_rank_worker, 3, -1) == [3, 3, 3]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("n,L", [(1, 6), (2, 12), (3, 18), (4, 40)])
def test_shard_unshard_roundtrip(layout, n, L):
    x = torch.randn(2, 3, L, 5)
    shards = [shard_sequence(x, r, n, layout) for r in range(n)]
    assert all(s.shape == (2, 3, L // n, 5) for s in shards)
    assert torch.equal(unshard_sequence(shards, layout), x)
    covered = torch.cat([sequence_positions(r, n, L, layout) for r in range(n)]).sort().values
    assert torch.equal(covered, torch.arange(L))


def test_zigzag_positions():
    assert sequence_positions(0, 2, 8, "zigzag").tolist() == [0, 1, 6, 7]
    assert sequence_positions(1, 2, 8, "zigzag").tolist() == [2, 3, 4, 5]
    assert sequence_positions(1, 2, 8).tolist() == [4, 5, 6, 7]


def test_zigzag_equals_pytorch_head_tail_load_balancer():
    lb = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")
    L, n = 24, 3
    theirs = lb._HeadTailLoadBalancer(L, n, "cpu")._generate_indices()[0]
    ours = torch.cat([sequence_positions(r, n, L, "zigzag") for r in range(n)])
    assert torch.equal(theirs, ours)


def test_errors_at_the_boundary():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="rank 4"):
        ring_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same positions"):
        ring_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="even"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], layout="zigzag")
    with pytest.raises(ValueError, match="enable_gqa"):
        ring_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="divisible"):
        shard_sequence(torch.randn(1, 1, 10, 2), 0, 3)
    # SDPA's signature: attn_mask and dropout_p come fourth and fifth; group is keyword-only
    with pytest.raises(ValueError, match="no attn_mask"):
        ring_attention(q, q, q, torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="no attn_mask"):
        ring_attention(q, q, q, object())  # e.g. a process group passed where group used to be
    with pytest.raises(ValueError, match="dropout"):
        ring_attention(q, q, q, None, 0.1)
    assert inspect.signature(ring_attention).parameters["group"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ring_attention(q, q, q)  # valid arguments, but no process group


def test_old_import_path_still_works():
    import attention_lib.distributed as old
    import attention_lib.launcher
    import attention_lib.ring

    assert old.ring_attention is attention_lib.ring.ring_attention and old.launch is attention_lib.launcher.launch
    # the workers are not part of the library's API
    assert not hasattr(attention_lib.ring, "ring_check_worker") and not hasattr(old, "sleep_worker")


def test_importing_attention_lib_initialises_nothing_distributed():
    code = "import attention_lib, torch.distributed as d; print(d.is_initialized(), attention_lib.ring_attention.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "ring_attention"]
    assert attention_lib.ring_attention is ring_attention
    assert not dist.is_initialized()


@pytest.mark.slow  # three fresh interpreters import torch: the launcher, and one per rank
def test_torchrun_standalone():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "attention_lib.ring_check", "--causal", "--layout", "zigzag", "--seq-len", "24"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 2 ranks" in out.stdout and "forward rotations = 1" in out.stdout, out.stdout
