import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q4
from attention_lib.grading.public_a6 import expected_intensity


def test_intensity_with_and_without_scores(ns):
    """arithmetic_intensity over shapes, element sizes, and scores in memory or on chip."""
    f = get_function(ns, "arithmetic_intensity")
    for args, kw in [((2, 8, 1000, 3000, 64), {}), ((1, 1, 4096, 4096, 128), {"element_size": 4}),
                     ((3, 2, 512, 512, 64), {"scores_in_memory": True}),
                     ((1, 4, 7, 9, 80), {"element_size": 4, "scores_in_memory": True})]:
        got = call(f, *args, **kw)
        want = expected_intensity(*args, **kw)
        if not (isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * want):
            raise CheckFailure(f"arithmetic_intensity{args} with {kw} = {got!r:.20}, expected {want:.6g}.")


def test_roofline_both_sides_of_the_ridge(ns):
    """roofline is bandwidth × intensity below the ridge point and the peak above it."""
    f = get_function(ns, "roofline")
    for I, peak, bw, want in [(10.0, 312.0, 2000.0, 20.0), (500.0, 312.0, 2000.0, 312.0), (156.0, 312.0, 2000.0, 312.0),
                              (0.5, 65.0, 320.0, 0.16)]:
        got = call(f, I, peak, bw)
        if not (isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * want):
            raise CheckFailure(f"roofline({I}, {peak}, {bw}) = {got!r:.20}, expected {want:g} TFLOP/s "
                               "(min of the peak and intensity × bandwidth, GB/s → TFLOP/s is /1000).")
