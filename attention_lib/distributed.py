"""The former home of ring attention (chapter 17), kept so that old imports work.

Ring attention now lives in :mod:`attention_lib.ring`, the process launcher in
:mod:`attention_lib.launcher`, and the worker that the chapter and the tests launch
(with the torchrun self-check) in :mod:`attention_lib.ring_check`. New code imports
from those; ``python -m attention_lib.distributed`` still runs the self-check.
"""

from __future__ import annotations

from .launcher import init_from_env, launch, local_device
from .ring import (
    LAYOUTS,
    RingStats,
    get_ring_stats,
    reset_ring_stats,
    ring_attention,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "LAYOUTS",
    "RingStats",
    "get_ring_stats",
    "init_from_env",
    "launch",
    "local_device",
    "reset_ring_stats",
    "ring_attention",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
]

if __name__ == "__main__":
    from attention_lib.ring_check import _main

    raise SystemExit(_main())
