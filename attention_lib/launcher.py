"""Run a function on N local processes joined in one ``torch.distributed`` group.

Chapter 17 runs ring attention (:mod:`attention_lib.ring`) for real on several CPU
processes; this module starts them. It is the plumbing, not the idea: the
FlashAttention and Triton tutorials keep their harnesses apart from the kernel in
the same way.

* :func:`launch` starts ``world_size`` processes with ``torch.multiprocessing`` on
  127.0.0.1, joins them in a gloo (CPU) or NCCL (one GPU per rank) group, runs
  ``fn(*args)`` on each and returns the results in rank order. A rank that raises
  fails the launch with that rank's traceback; a timeout guards against hangs.
* :func:`init_from_env` joins the group that ``torchrun`` describes in the environment.
* :func:`local_device` is the device a rank should compute on.

Importing this module initialises nothing.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "launch", "local_device"]


def local_device() -> torch.device:
    """The device this rank should compute on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout: float = 300.0) -> None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    Uses NCCL when this machine has at least as many GPUs as local ranks, else gloo.
    """
    if dist.is_initialized():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= local_size
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_nccl else "gloo", timeout=datetime.timedelta(seconds=timeout))


def _run_rank(rank, fn, args, world_size, port, backend, timeout, threads, outdir) -> None:
    """Entry point of each process started by :func:`launch`."""
    torch.set_num_threads(threads)
    td = datetime.timedelta(seconds=timeout)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=td)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
    try:
        result = fn(*args)
        torch.save(result, pathlib.Path(outdir) / f"rank{rank}.pt")
        dist.barrier()
    except Exception:
        # Number the failures: when one rank raises, its peers fail next ("connection closed"),
        # and the launcher reports the first one, the cause.
        n = store.add("failures", 1)
        store.set(f"failure/{n}", f"rank {rank} raised:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    device: str = "cpu",
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes joined in one process group.

    The processes are started with ``torch.multiprocessing`` (spawn) on 127.0.0.1 and
    rendezvous through a ``TCPStore`` that this process opens on a free port. They use
    gloo on the CPU (``device="cpu"``) and NCCL, one GPU per rank, for ``device="cuda"``.
    ``fn`` must be importable (defined in a module, not a notebook) so that it can be
    pickled; inside it, ``torch.distributed.get_rank()`` says which rank it is.

    ``start_method`` defaults to ``"forkserver"`` where the platform has it: a server
    process imports torch and this module once, and every rank is forked from it, which
    saves N imports of torch per launch. ``"spawn"`` (a fresh interpreter per rank) is
    the portable alternative.

    Returns:
        ``[result of rank 0, ..., result of rank N-1]`` (results travel via ``torch.save``).

    Raises:
        RuntimeError: a rank raised; the others are stopped. The message holds the
            traceback of the first rank that raised (its peers fail after it).
        TimeoutError: the ranks did not all finish within ``timeout`` seconds (the process
            group uses the same timeout, so a rank blocked on a dead peer gives up too).
    """
    import torch.multiprocessing as mp

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"device='cuda' needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPUs")
    backend = "nccl" if device == "cuda" else "gloo"
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        # import torch once, fork N times; torch._dynamo too, which torch's dispatch modes (and so
        # attention_lib.memory.peak_memory) import on first use: seconds per rank otherwise
        preload = ["attention_lib.ring", "torch._dynamo"]
        if getattr(fn, "__module__", "__main__") != "__main__":
            preload.insert(0, fn.__module__)  # the worker's module, e.g. attention_lib.ring_check
        mp.get_context("forkserver").set_forkserver_preload(preload)
    td = datetime.timedelta(seconds=timeout)
    # The store binds port 0 (the OS picks a free port) and keeps it: no race with other launches.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=td, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="ring_") as outdir:
        ctx = mp.start_processes(
            _run_rank,
            args=(fn, args, world_size, store.port, backend, timeout, threads_per_rank, outdir),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                    raise TimeoutError(f"launch: ranks {alive} of {world_size} still running after {timeout:g} s")
        except mp.ProcessRaisedException as e:
            if store.check(["failure/1"]):
                first = store.get("failure/1").decode()
                raise RuntimeError(f"launch: the first failure of {world_size} ranks: {first}") from e
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        results = [torch.load(pathlib.Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    del store
    return results
