import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q1
from attention_lib.grading.public_a6 import expect_methodology


@weight(2)  # the methodology is the point of the assignment
def test_time_kernel_uses_a_harness_and_warms_up(ns):
    """time_kernel uses a harness and warms up (read from the submitted source)."""
    expect_methodology(ns, "time_kernel")


def test_no_unsynchronised_clock_in_any_cell(ns):
    """No cell reads time.time() / perf_counter() twice without a torch.cuda.synchronize() between."""
    expect_methodology(ns, "time_kernel", whole_notebook=True)
