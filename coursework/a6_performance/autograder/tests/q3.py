import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q3
from attention_lib.grading.public_a6 import expect_report_consistent, expected_tflops


@weight(2)
def test_every_row_is_consistent(ns):
    """Every row: TFLOP/s = flops / time, fraction of peak = TFLOP/s / stated peak; sdpa and one more kernel."""
    rep = call(get_function(ns, "report"))
    expect_report_consistent(rep)
    if {bool(r["causal"]) for r in rep["rows"]} != {False, True}:
        raise CheckFailure("the table should time both causal=False and causal=True.")


def test_measure_row_times_on_the_grader(ns):
    """measure_row('sdpa', ...) run by the grader gives a row whose numbers follow from its time."""
    f = get_function(ns, "measure_row")
    peak = call(get_function(ns, "report"))["peak_tflops"]
    for causal in (False, True):
        row = call(f, "sdpa", 1, 2, 128, 32, "float32", causal)
        expect_report_consistent({"device": "grader", "peak_tflops": peak, "rows": [row]}, min_rows=1, all_rows=False)
        if (row["Lq"], row["D"], bool(row["causal"])) != (128, 32, causal):
            raise CheckFailure(f"measure_row('sdpa', 1, 2, 128, 32, 'float32', {causal}) returned a row for "
                               f"L = {row['Lq']}, D = {row['D']}, causal = {row['causal']}.")
