import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q3
from attention_lib.grading.public import measured_peaks


def test_tiled_memory_grows_linearly(ns):
    """Your tiled_attention's peak memory grows about linearly in L (x4 L: at most x6 memory)."""
    f = get_function(ns, "tiled_attention")
    _, small = measured_peaks(f, 512)
    naive, big = measured_peaks(f, 2048)
    if not big < 6 * small:
        raise CheckFailure(
            f"tiled_attention's peak memory went from {small / 2**20:.2f} MiB at L = 512 to "
            f"{big / 2**20:.2f} MiB at L = 2048 (x{big / small:.1f}); linear growth would be x4."
        )
    if not big < naive / 8:
        raise CheckFailure(f"at L = 2048 tiled_attention used {big / 2**20:.2f} MiB, over 1/8 of naive's {naive / 2**20:.2f} MiB.")


def test_measure_peaks_agrees_with_grader(ns):
    """measure_peaks([1024]) agrees with the grader's own measurement (within a factor 1.5)."""
    f = get_function(ns, "measure_peaks")
    rows = call(f, [1024])
    naive, tiled = measured_peaks(get_function(ns, "tiled_attention"), 1024)
    try:
        _, n_b, t_b = rows[0]
    except Exception:
        raise CheckFailure(f"measure_peaks([1024]) should return [(1024, naive_bytes, tiled_bytes)], got {rows!r:.80}.")
    for what, got, want in (("naive", n_b, naive), ("tiled", t_b, tiled)):
        if not (want / 1.5 <= got <= want * 1.5):
            raise CheckFailure(f"measure_peaks reports {got} bytes for {what} at L = 1024; the grader measures {want}.")
