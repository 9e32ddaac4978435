"""The check harness of ring attention: a worker to launch, and a torchrun self-check.

Not part of the library's API (``attention_lib`` does not export it): chapter 17 and
``tests/test_ring_attention.py`` launch :func:`ring_check_worker` with
:func:`attention_lib.launcher.launch`. The worker lives in a module, not in the
notebook or the test file, because each new process must be able to import it.

From a terminal, the same check runs under torchrun (or starts its own processes)::

    torchrun --standalone --nproc-per-node 4 -m attention_lib.ring_check --causal
    python -m attention_lib.ring_check --nproc 2 --layout zigzag --causal
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from .launcher import init_from_env, launch, local_device
from .ring import LAYOUTS, get_ring_stats, reset_ring_stats, ring_attention, shard_sequence, unshard_sequence

__all__ = ["case_inputs", "ring_check_worker"]


def case_inputs(case: dict, device) -> tuple[torch.Tensor, ...]:
    """The full-sequence ``(q, k, v, dout)`` of a :func:`ring_check_worker` case.

    Seeded by ``case["seed"]``, so every rank (and the process that checks the
    results) builds the same tensors: q (B, H, L, D), k (B, Hkv, L, D),
    v (B, Hkv, L, Dv), dout (B, H, L, Dv).
    """
    g = torch.Generator().manual_seed(case.get("seed", 0))
    B, Hq, L, D = case["B"], case["H"], case["L"], case["D"]
    Hkv, Dv = case.get("Hkv", Hq), case.get("Dv", D)
    dtype = case.get("dtype", torch.float32)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, Dv, generator=g)
    dout = torch.randn(B, Hq, L, Dv, generator=g)
    return tuple(t.to(dtype).to(device) for t in (q, k, v, dout))


def ring_check_worker(cases: list[dict]) -> list[dict]:
    """Worker: for each case, run ring attention forward and backward on this rank's shard.

    A case is a dict with ``B, H, L, D`` (L is the *global* length) and optionally
    ``Hkv, Dv, dtype, seed, is_causal, scale, layout, grad`` (default True) and ``memory``
    (measure this rank's peak tensor memory of the forward pass with
    :func:`attention_lib.memory.peak_memory`). Every rank builds the same global
    tensors from ``seed`` and keeps its shard.

    Returns, per case: this rank's ``out`` and (if ``grad``) ``dq, dk, dv`` shards on the
    CPU, the :class:`RingStats` of the forward and of the backward pass as dicts, and
    ``peak_bytes`` (or None).
    """
    from .memory import peak_memory

    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = local_device()
    results = []
    for case in cases:
        layout, is_causal = case.get("layout", "contiguous"), case.get("is_causal", False)
        q, k, v, dout = (shard_sequence(t, rank, world_size, layout) for t in case_inputs(case, device))
        kw = {"is_causal": is_causal, "scale": case.get("scale"), "layout": layout, "enable_gqa": q.shape[1] != k.shape[1]}
        res: dict[str, Any] = {"peak_bytes": None}
        if case.get("memory", False):
            with torch.no_grad():
                _, res["peak_bytes"] = peak_memory(ring_attention, q, k, v, **kw)
        q, k, v = (t.requires_grad_(case.get("grad", True)) for t in (q, k, v))
        reset_ring_stats()
        out = ring_attention(q, k, v, **kw)
        res["forward"] = dataclasses.asdict(get_ring_stats())
        res["out"] = out.detach().cpu()
        if case.get("grad", True):
            reset_ring_stats()
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            res["backward"] = dataclasses.asdict(get_ring_stats())
            res["dq"], res["dk"], res["dv"] = dq.cpu(), dk.cpu(), dv.cpu()
        results.append(res)
    return results


def _main(argv: list[str] | None = None) -> int:
    """Self-check: ``torchrun --standalone --nproc-per-node N -m attention_lib.ring_check``
    (or ``python -m attention_lib.ring_check --nproc N`` to start the processes here)."""
    import argparse

    from .attention import attention_ref

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes to start when not under torchrun")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous")
    a = parser.parse_args(argv)
    case = {"B": 1, "H": 4, "L": a.seq_len, "D": 16, "dtype": torch.float64, "is_causal": a.causal, "layout": a.layout}
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        init_from_env()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, ring_check_worker([case])[0])
        shards, rank = gathered, dist.get_rank()
        dist.destroy_process_group()
    else:
        shards, rank = [r[0] for r in launch(ring_check_worker, a.nproc, [case])], 0
    if rank == 0:
        q, k, v, dout = case_inputs(case, "cpu")
        ref = attention_ref(q, k, v, is_causal=a.causal)
        out = unshard_sequence([s["out"] for s in shards], a.layout)
        err = (out - ref).abs().max().item()
        print(f"ring attention on {len(shards)} ranks, L={a.seq_len}, causal={a.causal}, layout={a.layout}: "
              f"max |ring - attention_ref| = {err:.2e}, forward rotations = {shards[0]['forward']['forward_rotations']}")
        if not err < 1e-10:
            return 1
    return 0


if __name__ == "__main__":
    # Run the copy imported as attention_lib.ring_check, so that the worker pickles under its
    # importable name, not as __main__.
    from attention_lib.ring_check import _main as _package_main

    raise SystemExit(_package_main())
