"""Workers for the tests of :func:`attention_lib.launcher.launch` (not part of the library).

They live in a module of their own, not in a test file, so that the processes that
``launch`` starts can import them cheaply (``tests/`` is on ``sys.path`` under pytest,
and ``torch.multiprocessing`` passes ``sys.path`` on to the new processes).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def raise_on_rank_worker(bad_rank: int) -> int:
    """Rank ``bad_rank`` raises; the others wait for it in a collective (which never comes)."""
    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"rank {bad_rank} failed on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # blocks: the failed rank never joins
    return int(t.item())


def sleep_worker(seconds: float) -> float:
    """Every rank sleeps (a stand-in for a hang, to test the launcher's timeout)."""
    time.sleep(seconds)
    return seconds
