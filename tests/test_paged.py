"""PagedKVCache, paged_attention and the fragmentation simulator.

The paged cache must hold exactly what chapter 11's contiguous KVCache holds, for
any stream of appends of odd lengths and any block size; paged_attention must equal
the float64 oracle over those keys (GQA, masks, bottom-right causal). Forking shares
blocks, and copy-on-write keeps every other owner's tokens unchanged.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import KVCache, attention_ref, cache_causal_mask
from attention_lib.paged import (
    POLICIES,
    BlockAllocator,
    OutOfBlocksError,
    PagedKVCache,
    Request,
    paged_attention,
    random_requests,
    simulate_serving,
)


def kv(Hkv, T, D, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Hkv, T, D, generator=g).to(dtype), torch.randn(Hkv, T, Dv or D, generator=g).to(dtype)


def fill(cache, contiguous, chunks, seed=0):
    """Append the same random chunks to a paged sequence and to a KVCache of batch 1 each."""
    ids = [cache.add_sequence() for _ in contiguous]
    for step, lens in enumerate(chunks):
        for s, T in enumerate(lens):
            k, v = kv(cache.num_kv_heads, T, cache.head_dim, cache.value_dim, seed=seed + 100 * step + s)
            cache.append(ids[s], k, v)
            if T:
                contiguous[s].update(k[None], v[None])
    return ids


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("Hkv,Dv", [(4, 8), (2, 5), (1, 8)], ids=["MHA", "GQA-Dv5", "MQA"])
def test_paged_cache_holds_what_the_contiguous_cache_holds(block_size, Hkv, Dv):
    g = torch.Generator().manual_seed(block_size)
    chunks = torch.randint(0, 8, (6, 3), generator=g).tolist()  # 6 rounds of appends to 3 sequences, 0..7 tokens
    cache = PagedKVCache(64, block_size, Hkv, 8, value_dim=Dv, dtype=torch.float64)
    contiguous = [KVCache(1, Hkv, 8, value_dim=Dv, dtype=torch.float64) for _ in range(3)]
    ids = fill(cache, contiguous, chunks)
    cache.check_invariants()
    for s, c in zip(ids, contiguous):
        k, v = cache.gather(s)
        assert cache.seq_len(s) == len(c)
        assert torch.equal(k, c.keys()[0]) and torch.equal(v, c.values()[0])
        assert len(cache.block_table(s)) == -(-len(c) // block_size)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_paged_attention_equals_the_oracle(T, Hq, Hkv, is_causal):
    torch.manual_seed(0)
    lengths = [7, 1, 13, 4]  # the T new tokens are already appended; causal rows before key 0 give 0
    cache = PagedKVCache(32, 3, Hkv, 16, value_dim=8, dtype=torch.float64)
    ids = []
    for i, n in enumerate(lengths):
        ids.append(cache.add_sequence())
        cache.append(ids[-1], *kv(Hkv, n, 16, 8, seed=i))
    ids[0], ids[2] = ids[2], ids[0]  # the batch order need not be the allocation order
    q = torch.randn(len(ids), Hq, T, 16, dtype=torch.float64)
    out = paged_attention(q, cache, ids, is_causal=is_causal, enable_gqa=Hq != Hkv)
    assert out.shape == (len(ids), Hq, T, 8)
    for b, s in enumerate(ids):
        k, v = cache.gather(s)
        mask = cache_causal_mask(T, k.shape[1]) if is_causal else None
        ref = attention_ref(q[b : b + 1], k[None], v[None], attn_mask=mask, enable_gqa=Hq != Hkv)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_paged_attention_with_a_mask_and_fully_masked_rows(kind):
    torch.manual_seed(0)
    cache = PagedKVCache(16, 4, 2, 8, dtype=torch.float64)
    ids = [cache.add_sequence() for _ in range(3)]
    for i, n in enumerate([9, 5, 0]):  # the third sequence is empty: every row fully masked
        cache.append(ids[i], *kv(2, n, 8, seed=i))
    S = 9
    allowed = torch.rand(3, 4, 2, S) > 0.4
    allowed[0, 1, 0] = False  # one fully masked row
    mask = allowed if kind == "bool" else torch.zeros(3, 4, 2, S, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    q = torch.randn(3, 4, 2, 8, dtype=torch.float64)
    out = paged_attention(q, cache, ids, attn_mask=mask, is_causal=True, enable_gqa=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1, 0], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(out[2], torch.zeros(4, 2, 8, dtype=torch.float64))
    for b in range(2):
        k, v = cache.gather(ids[b])
        n = k.shape[1]
        m = mask[b : b + 1, ..., :n]
        causal = cache_causal_mask(2, n)
        m = m & causal if kind == "bool" else m.masked_fill(~causal, float("-inf"))
        ref = attention_ref(q[b : b + 1], k[None], v[None], attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-12, atol=1e-12)


def test_paged_attention_float32_and_a_broadcast_mask():
    cache = PagedKVCache(8, 5, 2, 16)
    s = cache.add_sequence()
    cache.append(s, *kv(2, 23, 16, dtype=torch.float32))
    q = torch.randn(1, 2, 1, 16)
    mask = torch.ones(23, dtype=torch.bool)  # broadcasts over (B, Hq, T)
    mask[::3] = False
    k, v = cache.gather(s)
    ref = attention_ref(q, k[None], v[None], attn_mask=mask)
    torch.testing.assert_close(paged_attention(q, cache, [s], attn_mask=mask), ref, rtol=1e-5, atol=1e-6)


def test_fork_shares_blocks_and_copy_on_write_leaves_the_parent_unchanged():
    cache = PagedKVCache(16, 4, 2, 8, dtype=torch.float64)
    parent = cache.add_sequence()
    cache.append(parent, *kv(2, 10, 8, seed=1))  # blocks: 4 + 4 + 2 (the last partially filled)
    before = [t.clone() for t in cache.gather(parent)]
    used = cache.num_used_blocks
    child = cache.fork(parent)
    assert cache.block_table(child) == cache.block_table(parent)
    assert cache.num_used_blocks == used  # nothing copied
    assert all(cache.ref_count(b) == 2 for b in cache.block_table(parent))
    k_new, v_new = kv(2, 3, 8, seed=2)
    cache.append(child, k_new, v_new)  # writes into the shared, partial last block: copy it first
    cache.check_invariants()
    assert cache.num_copies == 1
    pt, ct = cache.block_table(parent), cache.block_table(child)
    assert pt[:2] == ct[:2] and pt[2] != ct[2]  # full blocks still shared, the last one copied
    assert [cache.ref_count(b) for b in pt] == [2, 2, 1]
    for got, want in zip(cache.gather(parent), before):
        assert torch.equal(got, want)
    k_c, v_c = cache.gather(child)
    assert torch.equal(k_c[:, :10], before[0]) and torch.equal(k_c[:, 10:], k_new) and torch.equal(v_c[:, 10:], v_new)
    cache.append(parent, *kv(2, 1, 8, seed=3))  # the parent's last block is no longer shared: no copy
    assert cache.num_copies == 1


def test_fork_at_a_block_boundary_copies_nothing():
    cache = PagedKVCache(8, 4, 1, 4)
    parent = cache.add_sequence()
    cache.append(parent, *kv(1, 8, 4, dtype=torch.float32))
    child = cache.fork(parent)
    cache.append(child, *kv(1, 1, 4, dtype=torch.float32, seed=5))
    assert cache.num_copies == 0 and cache.block_table(child)[:2] == cache.block_table(parent)


def test_free_returns_blocks_once_the_last_owner_is_gone():
    cache = PagedKVCache(10, 4, 1, 4)
    a = cache.add_sequence()
    cache.append(a, *kv(1, 9, 4, dtype=torch.float32))  # 3 blocks
    b = cache.fork(a)
    assert cache.num_free_blocks == 7
    cache.free(a)
    assert cache.num_free_blocks == 7  # b still holds them
    assert cache.sequences == [b]
    cache.free(b)
    assert cache.num_free_blocks == 10
    cache.check_invariants()
    with pytest.raises(ValueError, match="unknown sequence"):
        cache.gather(a)


def test_out_of_blocks_is_clear_and_changes_nothing():
    cache = PagedKVCache(3, 4, 1, 4)
    a = cache.add_sequence()
    cache.append(a, *kv(1, 10, 4, dtype=torch.float32))  # 3 blocks, 2 free slots in the last
    b = cache.fork(a)
    with pytest.raises(OutOfBlocksError, match=r"needs 1 free block\(s\) but only 0 of 3 are free"):
        cache.append(b, *kv(1, 1, 4, dtype=torch.float32))  # copy-on-write needs a block
    cache.append(a, *kv(1, 0, 4, dtype=torch.float32))  # nothing to append: nothing needed
    with pytest.raises(OutOfBlocksError):
        cache.append(a, *kv(1, 7, 4, dtype=torch.float32))
    assert cache.seq_len(a) == cache.seq_len(b) == 10 and cache.num_copies == 0
    cache.check_invariants()
    with pytest.raises(OutOfBlocksError):
        BlockAllocator(2).allocate(3)


def test_bad_inputs_raise():
    cache = PagedKVCache(4, 4, 2, 8)
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="already exists"):
        cache.add_sequence(s)
    with pytest.raises(ValueError, match=r"expects key \(Hkv, T, D\) = \(2, T, 8\)"):
        cache.append(s, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="float32"):
        cache.append(s, torch.zeros(2, 1, 8, dtype=torch.float64), torch.zeros(2, 1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown sequence 7"):
        cache.append(7, torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
    for bad in (dict(block_size=0), dict(num_blocks=0), dict(head_dim=True)):
        args = dict(num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            PagedKVCache(**args)
    cache.append(s, torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="batch size 2 but 1 seq_ids"):
        paged_attention(torch.zeros(2, 2, 1, 8), cache, [s])
    with pytest.raises(ValueError, match="enable_gqa"):
        paged_attention(torch.zeros(1, 4, 1, 8), cache, [s])
    with pytest.raises(ValueError, match="divisible"):
        paged_attention(torch.zeros(1, 3, 1, 8), cache, [s], enable_gqa=True)
    with pytest.raises(ValueError, match="head dim E = 4"):
        paged_attention(torch.zeros(1, 2, 1, 4), cache, [s])
    with pytest.raises(ValueError, match="shape"):
        paged_attention(torch.zeros(2, 1, 8), cache, [s])
    with pytest.raises(ValueError, match="does not broadcast"):
        paged_attention(torch.zeros(1, 2, 1, 8), cache, [s], attn_mask=torch.ones(1, 2, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="PagedKVCache"):
        paged_attention(torch.zeros(1, 2, 1, 8), KVCache(1, 2, 8), [s])


# -- a property test: random operations against a model of what each sequence holds -----

OPS = st.lists(
    st.tuples(st.sampled_from(["add", "append", "append", "fork", "free"]), st.integers(0, 5), st.integers(0, 9)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, block_size=st.integers(1, 5))
def test_random_operations_keep_every_sequence_intact(ops, block_size):
    cache = PagedKVCache(40, block_size, 1, 2, dtype=torch.float64)
    model: dict[int, torch.Tensor] = {}  # seq id -> its keys (1, S, 2)
    counter = 0
    for op, pick, n in ops:
        live = sorted(model)
        if op == "add" or not live:
            model[cache.add_sequence()] = torch.zeros(1, 0, 2, dtype=torch.float64)
            continue
        s = live[pick % len(live)]
        if op == "append":
            counter += 1
            k = torch.full((1, n, 2), float(counter), dtype=torch.float64) + torch.arange(n, dtype=torch.float64).view(1, n, 1)
            try:
                cache.append(s, k, -k)
            except OutOfBlocksError:
                continue
            model[s] = torch.cat([model[s], k], dim=1)
        elif op == "fork":
            model[cache.fork(s)] = model[s].clone()
        else:
            cache.free(s)
            del model[s]
        cache.check_invariants()
        for t, want in model.items():
            k, v = cache.gather(t)
            assert torch.equal(k, want) and torch.equal(v, -want)
    # stored tokens count shared blocks once, so they never exceed the blocks in use
    assert cache.stored_tokens <= cache.num_used_blocks * block_size


# -- the fragmentation simulator ---------------------------------------------------


@pytest.fixture(scope="module")
def traces():
    reqs = random_requests(120, 256, seed=0)
    return reqs, {p: simulate_serving(reqs, 2048, p, block_size=16, max_len=256) for p in POLICIES}


def test_simulator_invariants(traces):
    reqs, tr = traces
    for p, t in tr.items():
        # every step, each running request generates one token, and no token is lost to preemption
        assert sum(t.running) == sum(r.output_len for r in reqs), p
        assert all(s <= a <= t.capacity for s, a in zip(t.stored, t.allocated)), p
        assert t.stored[-1] > 0 and t.running[-1] >= 1
    assert max(tr["contiguous_max"].running) <= 2048 // 256
    assert tr["paged"].max_slack < 16  # paging wastes less than one block per sequence
    assert all(a - s < 16 * n for s, a, n in zip(tr["paged"].stored, tr["paged"].allocated, tr["paged"].running))
    assert tr["contiguous_max"].preemptions == tr["contiguous_exact"].preemptions == 0
    assert sum(tr["contiguous_exact"].blocked_by_holes) > 0  # external fragmentation happens
    assert sum(tr["contiguous_max"].blocked_by_holes) == 0  # equal sizes leave no unusable holes


def test_paging_fits_more_requests_and_finishes_sooner(traces):
    _, tr = traces
    assert tr["paged"].mean("running") > tr["contiguous_exact"].mean("running") > tr["contiguous_max"].mean("running")
    assert tr["paged"].steps < tr["contiguous_max"].steps
    assert tr["paged"].mean("stored") > tr["contiguous_max"].mean("stored")


def test_simulator_is_deterministic_and_checks_its_arguments():
    reqs = random_requests(20, 64, seed=3)
    assert reqs == random_requests(20, 64, seed=3) and all(1 <= r.prompt_len <= 32 and 1 <= r.output_len <= 32 for r in reqs)
    a, b = simulate_serving(reqs, 256, "paged", block_size=8), simulate_serving(reqs, 256, "paged", block_size=8)
    assert a.stored == b.stored and a.preemptions == b.preemptions
    with pytest.raises(ValueError, match="policy"):
        simulate_serving(reqs, 256, "buddy")
    with pytest.raises(ValueError, match="capacity"):
        simulate_serving(reqs, 32, "paged", max_len=64)
    with pytest.raises(ValueError, match="max_len"):
        simulate_serving([Request(60, 10)], 256, "paged", max_len=64)


def test_one_request_alone_is_never_preempted():
    t = simulate_serving([Request(5, 30)], 40, "paged", block_size=4, max_len=40)
    assert t.steps == 30 and t.preemptions == 0 and t.allocated[-1] == 36 and t.stored[-1] == 35


def test_a_watermark_trades_a_little_batch_for_fewer_preemptions():
    reqs = random_requests(120, 256, seed=1)
    eager = simulate_serving(reqs, 2048, "paged", block_size=16, max_len=256, watermark=0.0)
    careful = simulate_serving(reqs, 2048, "paged", block_size=16, max_len=256, watermark=0.2)
    assert careful.preemptions < eager.preemptions and careful.recomputed_tokens < eager.recomputed_tokens
    assert careful.mean("running") <= eager.mean("running")
    with pytest.raises(ValueError, match="watermark"):
        simulate_serving(reqs, 2048, "paged", max_len=256, watermark=1.0)


def test_argument_checks_found_in_review():
    # value_dim=0 or 2.5 were accepted (and -3 raised torch's "negative dimension"),
    # ref_count(100) raised IndexError, random_requests(3, 1) a RuntimeError, and
    # simulate_serving(block_size=0) a ZeroDivisionError.
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="value_dim must be a positive int"):
            PagedKVCache(4, 4, 2, 8, value_dim=bad)
    with pytest.raises(ValueError, match=r"block must be an int in 0 \.\. 3"):
        PagedKVCache(4, 4, 2, 8).ref_count(100)
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        random_requests(3, 1)
    with pytest.raises(ValueError, match="n .* non-negative"):
        random_requests(-3, 10)
    reqs = random_requests(5, 32, seed=0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        simulate_serving(reqs, 256, "paged", block_size=0)
    with pytest.raises(ValueError, match="Request objects"):
        simulate_serving([(1, 2)], 256, "paged")
    assert simulate_serving([], 256, "paged").steps == 0


def test_an_empty_sequence_and_queries_before_the_first_key_give_zero():
    cache = PagedKVCache(8, 4, 2, 8)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(a, torch.randn(2, 6, 8), torch.randn(2, 6, 8))
    out = paged_attention(torch.randn(2, 2, 1, 8), cache, [a, b])
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().max() > 0
    out = paged_attention(torch.randn(1, 2, 8, 8), cache, [a], is_causal=True)  # 8 queries, 6 keys
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2])) and torch.isfinite(out).all()
