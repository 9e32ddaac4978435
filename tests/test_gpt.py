"""The small GPT of chapter 16: equivalence with Hugging Face GPT-2, causality, cached
decoding, and the sampling filters (top-k, top-p, temperature)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib.gpt import (
    GPT,
    CharTokenizer,
    GPTConfig,
    generate,
    load_gpt2_state_dict,
    load_text,
    sample_next,
    top_k_filter,
    top_p_filter,
)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def hf_tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases and unit norms: make every weight count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def test_logits_equal_hugging_face_gpt2():
    hf = hf_tiny_gpt2()
    ours = GPT(GPTConfig.from_hf_config(hf.config)).eval()
    load_gpt2_state_dict(ours, hf.state_dict())
    tokens = torch.randint(0, 101, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits  # (3, 64, 101)
        got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.05  # not trivially small logits
    # a raw checkpoint's names (no "transformer." prefix, no lm_head) load the same way
    raw = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    again = load_gpt2_state_dict(GPT(GPTConfig.from_hf_config(hf.config)).eval(), raw)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), want, rtol=1e-5, atol=1e-5)


def test_hf_config_and_state_dict_errors():
    hf = hf_tiny_gpt2()
    cfg = GPTConfig.from_hf_config(hf.config)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 32, 64, 101)
    assert cfg.gelu_approximate == "tanh" and cfg.layer_norm_eps == 1e-5 and cfg.tie_weights
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\], unexpected \['extra'\]"):
        load_gpt2_state_dict(GPT(cfg), sd)
    wider = GPT(GPTConfig(**{**cfg.__dict__, "n_embd": 64}))
    with pytest.raises(ValueError, match=r"c_attn.weight must be \(E, 3E\) = \(64, 192\), got \(32, 96\)"):
        load_gpt2_state_dict(wider, hf.state_dict())
    hf.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPTConfig.from_hf_config(hf.config)


def test_causal_a_later_token_does_not_change_earlier_logits():
    model = tiny()
    x = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 37
    with torch.no_grad():
        lx, ly = model(x), model(y)
    torch.testing.assert_close(lx[:, :12], ly[:, :12], rtol=0, atol=0)
    assert (lx[:, 12:] - ly[:, 12:]).abs().amax() > 1e-3


@pytest.mark.parametrize("n_kv_head", [None, 1], ids=["MHA", "MQA"])
@pytest.mark.parametrize("prompt_len,steps", [(1, 30), (5, 40), (24, 6)])  # past block_size=24 too
def test_cached_and_uncached_greedy_decoding_agree(n_kv_head, prompt_len, steps):
    model = tiny(n_kv_head=n_kv_head).double()
    prompt = torch.randint(0, 37, (3, prompt_len), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, steps, temperature=0, use_cache=True)
    full = generate(model, prompt, steps, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + steps)
    assert torch.equal(cached, full) and torch.equal(cached[:, :prompt_len], prompt)
    # greedy decoding picks the argmax of the full forward pass at every step
    with torch.no_grad():
        for t in range(prompt_len, min(prompt_len + steps, 24)):
            assert torch.equal(model(cached[:, :t])[:, -1].argmax(-1), cached[:, t])


def test_cached_sampling_agrees_and_generate_restores_training_mode():
    model = tiny(dropout=0.1).train()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    a = generate(model, prompt, 30, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 30, temperature=1.0, top_p=0.9, use_cache=False,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and model.training


def test_top_k_one_and_temperature_zero_are_greedy():
    model = tiny(seed=3)
    prompt = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, prompt, 15, temperature=0)
    top1 = generate(model, prompt, 15, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)
    cold = generate(model, prompt, 15, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)  # temperature -> 0: the distribution collapses on the argmax
    hot = generate(model, prompt, 15, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(hot, greedy)


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 4000
    g = torch.Generator().manual_seed(0)
    freq = lambda t: torch.bincount(sample_next(logits.expand(n, 4), t, generator=g)[:, 0], minlength=4) / n
    for t in (0.5, 1.0, 2.0):
        want = (logits[0] / t).softmax(-1)
        assert (freq(t) - want).abs().max() < 0.03, t  # 4000 draws: sd of a frequency <= 0.008


@settings(max_examples=60, deadline=None)
@given(V=st.integers(1, 40), k=st.integers(1, 45), seed=st.integers(0, 10_000))
def test_top_k_keeps_the_k_largest(V, k, seed):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed))
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == min(k, V)).all()
    assert torch.equal(out[kept], logits[kept])
    if k < V:  # every kept logit >= every dropped one
        assert (logits.masked_fill(~kept, math.inf).amin(-1) >= logits.masked_fill(kept, -math.inf).amax(-1)).all()


@settings(max_examples=80, deadline=None)
@given(V=st.integers(1, 50), p=st.floats(0.01, 1.0), scale=st.floats(0.1, 5.0), seed=st.integers(0, 10_000))
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(V, p, scale, seed):
    logits = scale * torch.randn(2, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = top_p_filter(logits, p)
    kept = torch.isfinite(out)
    probs = logits.softmax(-1)
    for row in range(2):
        pr, keep = probs[row], kept[row]
        n = int(keep.sum())
        top = pr.sort(descending=True).values
        assert torch.equal(out[row][keep], logits[row][keep])
        assert pr[keep].sum() >= p - 1e-12  # enough mass ...
        assert n == 1 or top[: n - 1].sum() < p  # ... and no smaller set of top tokens has it
        if n < V:  # the kept tokens are the most likely ones
            assert pr[keep].min() >= pr[~keep].max()


def test_top_p_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.6) == [True, True, False, False]
    assert keep(0.9) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: top_k_filter(torch.zeros(2, 5), 0), r"top_k must be a positive int, got 0"),
        (lambda: top_k_filter(torch.zeros(2, 5), 2.5), r"top_k must be a positive int, got 2.5"),
        (lambda: top_p_filter(torch.zeros(2, 5), 0.0), r"top_p must be a number in \(0, 1\], got 0.0"),
        (lambda: top_p_filter(torch.zeros(2, 5), 1.5), r"top_p must be a number in \(0, 1\], got 1.5"),
        (lambda: top_p_filter(torch.zeros(2, 5, dtype=torch.long), 0.5), r"logits must be a floating-point.*int64"),
        (lambda: sample_next(torch.zeros(2, 5), -1.0), r"temperature must be a finite number >= 0.*-1.0"),
        (lambda: sample_next(torch.zeros(2, 5), math.nan), r"temperature must be a finite number >= 0.*nan"),
        (lambda: sample_next(torch.zeros(5), 1.0), r"logits must be \(B, V\), got shape \(5,\)"),
        (lambda: generate(tiny(), torch.zeros(2, 3, dtype=torch.long), 5, top_k=0), r"top_k must be None or a positive int"),
        (lambda: generate(tiny(), torch.zeros(2, 3, dtype=torch.long), -1), r"max_new_tokens must be an int >= 0"),
        (lambda: generate(tiny(), torch.zeros(2, 3), 5), r"idx must be a \(B, T >= 1\) int64 tensor.*float32"),
        (lambda: tiny()(torch.zeros(2, 25, dtype=torch.long)), r"0 cached \+ 25 new positions exceed block_size=24"),
        (lambda: tiny()(torch.zeros(2, 3, dtype=torch.long), caches=[]), r"one KVCache per layer \(2\), got 0"),
        (lambda: GPTConfig(vocab_size=0), r"vocab_size must be a positive int, got 0"),
        (lambda: GPTConfig(vocab_size=10, gelu_approximate="fast"), r"gelu_approximate must be 'tanh' or 'none'"),
        (lambda: GPTConfig(vocab_size=10, n_embd=30, n_head=4), r"n_embd \(30\) must be a multiple of n_head \(4\)"),
        (lambda: GPTConfig(vocab_size=10, n_head=4, n_kv_head=3), r"n_kv_head must be a positive int dividing n_head \(4\), got 3"),
        (lambda: tiny()(torch.full((2, 3), 10 ** 6)), r"token ids must lie in 0 \.\. \d+ \(vocab_size=\d+\); got 1000000"),
        (lambda: tiny()(torch.full((2, 3), -1)), r"token ids must lie in 0 \.\. \d+.*got -1"),
        (lambda: CharTokenizer("abc").decode([0, 3]), r"token ids must be ints in 0 \.\. 2; got \[3\]"),
        (lambda: load_text("hamlet"), r"name must be one of \['persuasion'\]"),
        (lambda: CharTokenizer("abc").encode("abz"), r"characters not in the vocabulary: \['z'\]"),
    ],
    ids=["k=0", "k float", "p=0", "p>1", "int logits", "T<0", "T nan", "rank 1", "generate top_k", "negative steps",
         "float idx", "too long", "caches", "vocab 0", "gelu", "heads", "kv heads", "token too large",
         "negative token", "decode", "text", "tokenizer"],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_text_and_the_tokenizer_round_trip():
    text = load_text()
    assert 200_000 < len(text) < 1_000_000 and text.startswith("Persuasion") and "Captain Wentworth" in text
    tok = CharTokenizer(text)
    assert tok.vocab_size == len(set(text)) and tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_tied_weights_and_cache_lengths():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    untied = tiny(tie_weights=False)
    assert untied.num_parameters() == model.num_parameters() + 37 * 16
    caches = model.new_caches(2)
    with torch.no_grad():
        model(torch.zeros(2, 7, dtype=torch.long), caches)
        model(torch.zeros(2, 1, dtype=torch.long), caches)
    assert [len(c) for c in caches] == [8, 8] and caches[0].keys().shape == (2, 2, 8, 8)
