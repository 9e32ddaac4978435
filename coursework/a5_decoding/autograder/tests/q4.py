import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q4
from attention_lib.grading.public_a5 import prompt_tokens, expect_same_tokens, load_a5_model, reference_greedy

_MODEL = load_a5_model()


def _decode(f, prompt, n, **kw):
    return expect_tensor(call(f, _MODEL["state_dict"], _MODEL["config"], prompt, n, **kw),
                         f"greedy_decode(weights, config, prompt, {n})", shape=(prompt.shape[0], prompt.shape[1] + n),
                         dtype=torch.long)


@weight(2)  # the tokens, exactly
def test_long_continuations(ns):
    f = get_function(ns, "greedy_decode")
    for text, n in [("Elizabeth was", 60), ("Captain Wentworth", 40)]:
        prompt = prompt_tokens(_MODEL, text)
        expect_same_tokens(_decode(f, prompt, n), reference_greedy(_MODEL, prompt, n), _MODEL,
                           f"greedy_decode from {text!r}, {n} new tokens")


def test_a_batch_of_two_prompts(ns):
    f = get_function(ns, "greedy_decode")
    prompt = torch.cat([prompt_tokens(_MODEL, "Anne said"), prompt_tokens(_MODEL, "Elizabeth")])  # (2, 9)
    got, want = _decode(f, prompt, 20), reference_greedy(_MODEL, prompt, 20)
    for b in range(2):
        expect_same_tokens(got[b:b + 1], want[b:b + 1], _MODEL, f"greedy_decode of a batch of 2 prompts, row {b}")


def test_int8_cache_keeps_the_first_tokens(ns):
    f = get_function(ns, "greedy_decode")
    prompt = prompt_tokens(_MODEL, "Anne said")
    got, want = _decode(f, prompt, 10, quantized=True), reference_greedy(_MODEL, prompt, 10)
    expect_same_tokens(got, want, _MODEL, "greedy_decode(..., quantized=True) from 'Anne said', 10 new tokens")
