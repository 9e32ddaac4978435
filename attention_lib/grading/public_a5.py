"""The public checks of assignment 5 (decoding with a KV cache), and their helpers.

The student writes a ``Cache`` class (q1), ``decode_attention`` (q2), a ``QuantCache``
(q3) and ``greedy_decode`` (q4). The grader cannot hold an object of the student's
class (only plain data crosses the sandbox), so the notebook ships a small driver,
``replay(chunks, quantized=False)``, that feeds ``(key, value)`` chunks to a new cache and
returns, after every update, ``(keys, values, len(cache), cache.nbytes, held)`` with
``held`` the tensors the cache object keeps (after the last update only). Every verdict is made here, on that data.

The model of q4 is a small character-level GPT shipped with the package
(``attention_lib/data/a5_char_gpt.pt``, written by ``coursework/a5_decoding/train_model.py``);
:func:`load_a5_model` reads it, and :func:`reference_greedy` gives the greedy tokens
from a float64 run of :func:`attention_lib.gpt.generate` without a cache.
"""

from __future__ import annotations

from importlib import resources

import torch

from ..attention import attention_ref
from ..masks import cache_causal_mask
from .public import public
from .testing import CheckFailure, call, expect_close, expect_tensor, get_function, random_qkv

__all__ = [
    "A5",
    "MODEL_FILE",
    "load_a5_model",
    "reference_greedy",
    "greedy_margin",
    "prompt_tokens",
    "expect_same_tokens",
    "random_chunks",
    "run_replay",
    "expect_exact_replay",
    "expect_quantised_replay",
    "decode_reference",
    "fp32_bytes",
]

A5 = "a5_decoding"
MODEL_FILE = "a5_char_gpt.pt"
QMAX = 127  # int8 absmax: codes in -127..127, |x - x̂| <= scale / 2 with scale = max|x| / 127


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# The model of question 4
# ---------------------------------------------------------------------------
def load_a5_model() -> dict:
    """The shipped model: ``{"config": dict, "chars": str, "state_dict": {name: tensor}, "trained": dict}``."""
    path = resources.files("attention_lib").joinpath("data").joinpath(MODEL_FILE)
    with resources.as_file(path) as p:
        return torch.load(p, weights_only=True)


def _model64(model_file: dict):
    from ..gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**model_file["config"])).double().eval()
    model.load_state_dict({k: v.double() for k, v in model_file["state_dict"].items()})
    return model


def reference_greedy(model_file: dict, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens (B, T + max_new_tokens) of :func:`attention_lib.gpt.generate` in float64.

    In float64 a cache changes the logits by about 1e-15, far below the smallest gap between
    the two most likely tokens of the prompts the tests use (see :func:`greedy_margin`), so
    these are also the tokens of decoding without a cache.
    """
    from ..gpt import generate

    return generate(_model64(model_file), prompt, max_new_tokens, temperature=0, use_cache=True)


@torch.no_grad()
def greedy_margin(model_file: dict, tokens: torch.Tensor, prompt_len: int) -> float:
    """The smallest gap between the two largest logits over the greedy steps of ``tokens``.

    A gap well above float32's rounding (1e-3 here) means a float32 cache cannot flip
    an argmax: the reference tokens are then the only right answer.
    """
    logits = _model64(model_file)(tokens[:, :-1])[:, prompt_len - 1:]  # (B, N, V): the steps that chose a token
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def prompt_tokens(model_file: dict, text: str) -> torch.Tensor:
    stoi = {c: i for i, c in enumerate(model_file["chars"])}
    return torch.tensor([[stoi[c] for c in text]], dtype=torch.long)


# ---------------------------------------------------------------------------
# Caches: the driver's data, checked here
# ---------------------------------------------------------------------------
def random_chunks(B, Hkv, sizes, D, *, dtype=torch.float32, seed=0, outliers=False):
    """[(key, value), ...]: one (B, Hkv, T, D) pair per chunk size T."""
    g = _gen(seed)
    out = []
    for T in sizes:
        k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
        if outliers:  # a few large channels in the keys, as in real models (KIVI)
            k[..., :2] *= 20
        out.append((k.to(dtype), v.to(dtype)))
    return out


def fp32_bytes(B, Hkv, S, D) -> int:
    """Bytes of S cached positions of float32 keys and values."""
    return 2 * B * Hkv * S * D * 4


def run_replay(ns, chunks, *, quantized=False) -> list:
    """Call the notebook's ``replay`` and check the form of what it returns."""
    f = get_function(ns, "replay")
    cls = "QuantCache" if quantized else "Cache"
    get_function(ns, cls)
    steps = call(f, chunks, quantized=quantized) if quantized else call(f, chunks)
    if not isinstance(steps, (list, tuple)) or len(steps) != len(chunks):
        raise CheckFailure(f"replay should return one entry per update ({len(chunks)}); got {type(steps).__name__}.")
    for step in steps:
        if not isinstance(step, (list, tuple)) or len(step) != 5:
            raise CheckFailure("replay should return (keys, values, len(cache), cache.nbytes, held) after each update.")
    return list(steps)


def _nbytes(n, what) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise CheckFailure(f"{what} should be an int (bytes), got {type(n).__name__} {n!r:.40}.")
    return n


def expect_exact_replay(steps, chunks, what: str) -> None:
    """After each update: every key and value so far, bit for bit; len and nbytes exact."""
    B, Hkv, _, D = chunks[0][0].shape
    ks, vs, S = [], [], 0
    for i, ((k, v), (K, V, n, nbytes, _)) in enumerate(zip(chunks, steps)):
        ks.append(k)
        vs.append(v)
        S += k.shape[2]
        at = f"{what}, after update {i + 1} (S = {S})"
        for name, got, want in (("keys", K, torch.cat(ks, 2)), ("values", V, torch.cat(vs, 2))):
            expect_tensor(got, f"the {name} returned {at}", shape=want.shape, dtype=want.dtype)
            if not torch.equal(got, want):
                bad = int((got != want).sum())
                raise CheckFailure(f"the {name} returned {at} differ from the ones appended in {bad} of "
                                   f"{want.numel()} entries: a cache must return them unchanged, oldest first.")
        if n != S:
            raise CheckFailure(f"len(cache) {at} is {n!r}, expected {S}.")
        want_b = 2 * B * Hkv * S * D * k.element_size()
        if _nbytes(nbytes, f"cache.nbytes {at}") != want_b:
            raise CheckFailure(f"cache.nbytes {at} is {nbytes}, expected 2·B·Hkv·S·D·{k.element_size()} = {want_b} "
                               "(the filled positions only, not spare capacity).")


def expect_quantised_replay(steps, chunks, what: str, *, ratio: float = 0.3) -> None:
    """Within half a scale step of each token's absmax scale; int8 storage; bytes <= ratio × float32."""
    B, Hkv, _, D = chunks[0][0].shape
    ks, vs, S = [], [], 0
    for i, ((k, v), (K, V, n, nbytes, _)) in enumerate(zip(chunks, steps)):
        ks.append(k)
        vs.append(v)
        S += k.shape[2]
        at = f"{what}, after update {i + 1} (S = {S})"
        for name, got, want in (("keys", K, torch.cat(ks, 2)), ("values", V, torch.cat(vs, 2))):
            expect_tensor(got, f"the {name} returned {at}", shape=want.shape, dtype=want.dtype)
            w64 = want.double()
            bound = w64.abs().amax(-1, keepdim=True) / QMAX / 2  # (B, Hkv, S, 1): half a step
            err = (got.double() - w64).abs()
            over = err > bound * (1 + 1e-3) + 1e-30
            if over.any():
                idx = tuple(int(j) for j in over.nonzero()[0])
                raise CheckFailure(
                    f"the {name} returned {at} are off by {err[idx].item():.3g} at index {idx}, more than half a "
                    f"step ({bound[idx[:-1]].item():.3g} = max|x| / 254 over that token's {D} channels): quantise "
                    "each token with its own scale max|x| / 127 and round to the nearest code.")
        if n != S:
            raise CheckFailure(f"len(cache) {at} is {n!r}, expected {S}.")
        nbytes = _nbytes(nbytes, f"cache.nbytes {at}")
        full = fp32_bytes(B, Hkv, S, D)
        if not 2 * B * Hkv * S * D <= nbytes <= ratio * full:
            raise CheckFailure(f"cache.nbytes {at} is {nbytes} bytes; an int8 cache should need between one byte "
                               f"per entry ({2 * B * Hkv * S * D}) and {ratio} × float32's {full} bytes (codes plus scales).")
    # what the cache object really keeps after the last update: int8 codes, and little in floating point
    held = steps[-1][4]
    flat = [t for t in held if isinstance(t, torch.Tensor)] if isinstance(held, (list, tuple)) else []
    codes = sum(t.numel() for t in flat if t.dtype in (torch.int8, torch.uint8))
    floats = sum(t.numel() * t.element_size() for t in flat if t.is_floating_point())
    if codes < 2 * B * Hkv * S * D:
        raise CheckFailure(f"{what}: the cache object holds {codes} int8/uint8 entries, fewer than the "
                           f"{2 * B * Hkv * S * D} codes of {S} keys and values. Store the codes as int8 tensors.")
    if floats > 0.25 * full:
        raise CheckFailure(f"{what}: the cache object holds {floats} bytes of floating-point tensors, over a quarter of "
                           f"the {full} bytes of the float32 keys and values: keep only the codes and the scales.")


# ---------------------------------------------------------------------------
# decode_attention: the float64 oracle with a bottom-right causal mask
# ---------------------------------------------------------------------------
def decode_reference(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The oracle for decoding: query ``i`` of ``L`` sees keys ``j <= i + S - L`` if ``is_causal``."""
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = cache_causal_mask(L, S, attn_mask)
    return attention_ref(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)


# ---------------------------------------------------------------------------
# The public checks
# ---------------------------------------------------------------------------
@public(A5, "q1")
def cache_returns_everything(ns):
    """A Cache fed chunks of 3, 1 and 2 positions returns every key and value so far, unchanged."""
    chunks = random_chunks(1, 2, [3, 1, 2], 8, seed=1)
    expect_exact_replay(run_replay(ns, chunks), chunks, "a Cache(1, 2, 8)")


@public(A5, "q1")
def cache_counts_bytes(ns):
    """len(cache) and cache.nbytes count the cached positions: 2·B·Hkv·S·D·4 bytes in float32."""
    chunks = random_chunks(2, 1, [5, 1], 16, seed=2)
    steps = run_replay(ns, chunks)
    _, _, n, nbytes, _ = steps[-1]
    if n != 6 or nbytes != fp32_bytes(2, 1, 6, 16):
        raise CheckFailure(f"after 6 positions of a Cache(2, 1, 16): len {n!r}, nbytes {nbytes!r}; expected 6 and "
                           f"{fp32_bytes(2, 1, 6, 16)}.")


@public(A5, "q2")
def decode_one_query(ns):
    """decode_attention of one new query over 7 cached keys matches the oracle."""
    f = get_function(ns, "decode_attention")
    q, k, v = random_qkv(1, 2, 1, 7, 8, seed=3)
    out = expect_tensor(call(f, q, k, v, is_causal=True), "decode_attention(q, k, v, is_causal=True) with L=1, S=7",
                        shape=(1, 2, 1, 8), dtype=q.dtype)
    expect_close(out, decode_reference(q, k, v, is_causal=True), "decode_attention with L=1, S=7")


@public(A5, "q2")
def decode_bottom_right(ns):
    """A chunk of 3 new queries over 7 keys is bottom-right aligned: query i sees keys j <= i + 4."""
    f = get_function(ns, "decode_attention")
    q, k, v = random_qkv(1, 2, 3, 7, 8, seed=4)
    out = call(f, q, k, v, is_causal=True)
    top_left = attention_ref(q, k, v, is_causal=True)
    ref = decode_reference(q, k, v, is_causal=True)
    try:
        expect_close(out, ref, "decode_attention(q, k, v, is_causal=True) with L=3, S=7")
    except CheckFailure as exc:
        if isinstance(out, torch.Tensor) and out.shape == top_left.shape and torch.allclose(out, top_left, atol=1e-5):
            raise CheckFailure(f"{exc} Your mask is top-left aligned (query i sees keys j <= i, PyTorch's is_causal): "
                               "with a cache the queries are the last L positions, so query i sees j <= i + S - L.") from None
        raise


@public(A5, "q3")
def quant_cache_error_bound(ns):
    """QuantCache returns keys and values within half a step (max|x| / 254 per token) of the originals."""
    chunks = random_chunks(1, 2, [4, 1, 3], 16, seed=5, outliers=True)
    steps = run_replay(ns, chunks, quantized=True)
    expect_quantised_replay(steps, chunks, "a QuantCache(1, 2, 16)", ratio=0.5)


@public(A5, "q3")
def quant_cache_bytes(ns):
    """An int8 QuantCache of 64-channel heads needs at most 0.3 × the bytes of float32, scales included."""
    chunks = random_chunks(1, 2, [9, 1], 64, seed=6)
    steps = run_replay(ns, chunks, quantized=True)
    expect_quantised_replay(steps, chunks, "a QuantCache(1, 2, 64)", ratio=0.3)


@public(A5, "q4")
def greedy_matches_reference(ns):
    """greedy_decode of the shipped model gives the reference greedy tokens for one prompt (12 new tokens)."""
    f = get_function(ns, "greedy_decode")
    model_file = load_a5_model()
    prompt = prompt_tokens(model_file, "Anne said")
    want = reference_greedy(model_file, prompt, 12)
    got = expect_tensor(call(f, model_file["state_dict"], model_file["config"], prompt, 12),
                        "greedy_decode(weights, config, prompt, 12)", shape=want.shape, dtype=torch.long)
    expect_same_tokens(got, want, model_file, "greedy_decode from the prompt 'Anne said'")


def expect_same_tokens(got, want, model_file, what: str) -> None:
    """Token ids equal; the message shows both continuations as text."""
    if torch.equal(got, want):
        return
    chars = model_file["chars"]

    def text(row):
        return "".join(chars[i] if 0 <= i < len(chars) else "?" for i in row.tolist())

    first = int((got != want).nonzero()[0, 1]) if got.shape == want.shape else -1
    raise CheckFailure(f"{what}: the tokens differ from the reference from position {first} on: got {text(got[0])!r}, "
                       f"expected {text(want[0])!r}. Greedy decoding with a cache must give exactly the tokens of "
                       "decoding without one.")
