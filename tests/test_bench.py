"""The benchmark harness: its arithmetic, its CSV and how it records failures.

No test here times anything or asserts a speed: speed lives in the benchmark's CSVs.
"""

import math

import pytest
import torch

from attention_lib import bench, masks

TINY = dict(lengths=[33], head_dims=[16], heads=2, min_run_time=0.01, progress=False)


def _fake(name, fn, **kw):
    return bench.Variant(name, fn, **kw)


def _sdpa():
    return [v for v in bench.get_variants("cpu", ["sdpa", "naive"])]


# --- the FLOP formula -------------------------------------------------------


def test_flops_matches_flash_attention_formula():
    B, H, Lq, Lk, D = 2, 3, 5, 7, 16
    fwd = 4 * B * H * Lq * Lk * D  # two matmuls of 2·Lq·Lk·D each, per head
    assert bench.flops(B, H, Lq, Lk, D) == fwd
    assert bench.flops(B, H, Lq, Lk, D, causal=True) == fwd / 2
    assert bench.flops(B, H, Lq, Lk, D, mode="bwd") == 2.5 * fwd
    assert bench.flops(B, H, Lq, Lk, D, mode="fwd_bwd") == 3.5 * fwd
    assert bench.flops(B, H, Lq, Lk, D, causal=True, mode="fwd_bwd") == 3.5 * fwd / 2


@pytest.mark.parametrize("L,window", [(1, 1), (9, 1), (9, 4), (17, 5), (8, 8), (8, 20)])
def test_flops_window_counts_the_pairs_of_the_sliding_window_mask(L, window):
    allowed = masks.create_mask(masks.sliding_window(window), 1, 1, L, L)  # causal band
    assert bench.flops(1, 1, L, L, 1, causal=True, window=window) == 4 * allowed.sum().item()
    i = torch.arange(L)
    symmetric = ((i[:, None] - i[None, :]).abs() < window).sum().item()
    assert bench.flops(1, 1, L, L, 1, causal=False, window=window) == 4 * symmetric


def test_flops_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        bench.flops(1, 1, 4, 4, 4, mode="backward")


def test_attention_bytes_model():
    B, H, L, D = 1, 2, 64, 16
    qkvo = B * H * 4 * L * D * 2  # bf16: Q, K, V read, O written
    assert bench.attention_bytes(B, H, L, L, D, scores_in_memory=False) == qkvo
    assert bench.attention_bytes(B, H, L, L, D) == qkvo + B * H * 4 * L * L * 2


# --- the CSV and its provenance -----------------------------------------------


def test_csv_round_trip_with_provenance(tmp_path):
    rows = [
        dict(variant="naive", mode="fwd", status="ok", reason="", dtype="float32", B=1, H=2, Lq=8, Lk=8, D=4,
             causal=False, window="", time_ms=1.25, iqr_ms=0.125, n_timed=7, flops=1024.0, tflops=8.192e-7,
             frac_peak=1e-8, peak_mem_bytes=4096, time_ratio_sdpa=2.5, mem_ratio_naive=1.0, n_input_sets=3,
             timer="torch.utils.benchmark.Timer"),
        dict(variant="naive", mode="fwd_bwd", status="OOM", reason="CUDA out of memory, tried 8 GiB", dtype="bfloat16",
             B=1, H=2, Lq=65536, Lk=65536, D=128, causal=True, window=256, flops=3.5e12),
    ]
    prov = bench.provenance("cpu", dtype="float32 bfloat16", note="a: colon, inside")
    path = tmp_path / "sub" / "results.csv"
    bench.write_results(path, rows, prov)
    text = path.read_text()
    assert text.startswith("# device_type: cpu\n")
    loaded, prov2 = bench.load_results(path)
    assert prov2 == prov
    for key in ("device", "torch", "triton", "dtype", "date", "command"):
        assert prov2[key], key
    assert prov2["torch"] == torch.__version__
    assert len(loaded) == 2
    for k, v in rows[0].items():
        expected = None if v == "" and k != "reason" else v  # text stays text, numbers come back typed
        assert loaded[0][k] == expected, k
    oom = loaded[1]
    assert oom["status"] == "OOM" and oom["causal"] is True and oom["window"] == 256
    assert oom["time_ms"] is None and oom["peak_mem_bytes"] is None and oom["flops"] == 3.5e12
    assert list(loaded[0]) == bench.COLUMNS


# --- failures are recorded, not raised ------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        MemoryError(),
    ],
    ids=["cuda", "cpu_allocator", "memoryerror"],
)
def test_out_of_memory_is_recorded_as_oom(exc):
    def boom(q, k, v, causal):
        raise exc

    rows = bench.run_sweep("cpu", variants=[_fake("big", boom)] + _sdpa(), measure_memory=False, **TINY)
    big = [r for r in rows if r["variant"] == "big"]
    assert len(big) == 1 and all(r["status"] == "OOM" for r in big)
    assert all(r.get("time_ms") is None for r in big)
    others = [r for r in rows if r["variant"] != "big"]
    assert others and all(r["status"] == "ok" for r in others)  # the sweep went on


def test_other_errors_and_zero_outputs_are_recorded():
    def broken(q, k, v, causal):
        raise ValueError("shapes do not agree")

    def zeros(q, k, v, causal):
        return torch.zeros_like(q)

    rows = bench.run_sweep("cpu", variants=[_fake("broken", broken), _fake("zeros", zeros)], **TINY)
    assert {r["status"] for r in rows if r["variant"] == "broken"} == {"error"}
    assert all("ValueError" in r["reason"] for r in rows if r["variant"] == "broken")
    assert all(r["status"] == "error" and "zeros" in r["reason"] for r in rows if r["variant"] == "zeros")


def test_memory_cap_skips_quadratic_variants():
    rows = bench.run_sweep("cpu", variants=["naive", "sdpa_math", "sdpa"], mem_cap_gib=1e-6, **TINY)
    status = {r["variant"]: r["status"] for r in rows}
    assert status == {"naive": "skipped", "sdpa_math": "skipped", "sdpa": "ok"}


# --- never zeros, and the inputs rotate -------------------------------------------


def test_inputs_are_random_nonzero_and_distinct():
    sets = bench.make_inputs(1, 2, 17, 19, 8, n_sets=3, dtype=torch.bfloat16)
    assert len(sets) == 3
    for ts in sets:
        assert [tuple(t.shape) for t in ts] == [(1, 2, 17, 8), (1, 2, 19, 8), (1, 2, 19, 8), (1, 2, 17, 8)]
        for t in ts:
            assert t.dtype == torch.bfloat16 and torch.isfinite(t).all()
            assert (t != 0).float().mean() > 0.99 and t.float().std() > 0.5
    assert not torch.equal(sets[0][0], sets[1][0])
    again = bench.make_inputs(1, 2, 17, 19, 8, n_sets=3, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for s, t in zip(sets, again) for a, b in zip(s, t))  # seeded


def test_sweep_times_nonzero_rotating_inputs():
    seen = []

    def spy(q, k, v, causal):
        seen.append(q.detach().clone())
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    rows = bench.run_sweep("cpu", variants=[_fake("spy", spy)], measure_memory=False, **TINY)
    assert [r["status"] for r in rows] == ["ok"]
    assert len(seen) >= 3
    assert all((q != 0).any() for q in seen)
    distinct = {q.sum().item() for q in seen}
    assert 2 <= len(distinct) <= rows[0]["n_input_sets"]  # several sets, cycled


# --- a tiny sweep over the real variants --------------------------------------------


def test_tiny_cpu_sweep_has_a_row_for_every_variant():
    rows = bench.run_sweep("cpu", modes=["fwd", "fwd_bwd"], causal=[False, True], **TINY)
    names = [v.name for v in bench.get_variants("cpu")]
    cells = {(r["variant"], r["mode"], r["Lq"], r["causal"]) for r in rows}
    assert len(rows) == len(cells) == len(names) * 2 * 2
    by = {}
    for r in rows:
        by.setdefault(r["variant"], set()).add(r["status"])
        assert r["flops"] > 0
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["tflops"] > 0 and r["iqr_ms"] >= 0
            assert r["peak_mem_bytes"] >= 0 and r["time_ratio_sdpa"] > 0
        else:
            assert r["reason"], r
    for always in ("naive", "sdpa", "sdpa_math"):
        assert by[always] == {"ok"}, always
    assert by["triton"] == {"unavailable"}  # CUDA only
    for v in bench.get_variants("cpu"):  # whatever the library has now runs; the rest is recorded
        expected = {"unavailable"} if v.fn is None else {"ok", "unavailable"} if v.name.startswith("sdpa") else {"ok"}
        if v.forward_only and v.fn is not None:
            expected = {"ok", "skipped"}
        assert by[v.name] <= expected and by[v.name], (v.name, by[v.name])
    for r in rows:  # a forward-only variant is skipped backward, and only there
        if r["variant"] == "paged":
            assert r["status"] == ("ok" if r["mode"] == "fwd" else "skipped"), r
    # on CPU PyTorch has no memory-efficient or cuDNN kernel: recorded, with the reason
    for name in ("sdpa_efficient", "sdpa_cudnn"):
        assert by[name] == {"unavailable"}
    for r in rows:
        if r["variant"] == "sdpa" and r["status"] == "ok":
            assert r["time_ratio_sdpa"] == 1.0
        if r["variant"] == "naive":
            assert r["mem_ratio_naive"] == 1.0
            assert r["peak_mem_bytes"] >= 4 * 2 * r["Lq"] * r["Lk"]  # at least the fp32 scores


def test_command_line_writes_csv(tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    rc = bench.main(["--device", "cpu", "--lengths", "32", "--head-dims", "16", "--heads", "2",
                     "--modes", "fwd", "--variants", "naive", "sdpa", "linear", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows, prov = bench.load_results(out)
    assert [r["variant"] for r in rows] == ["naive", "sdpa", "linear"]
    assert prov["device_type"] == "cpu" and prov["dtype"] == "float32"
    assert "--lengths 32" in prov["command"]
    assert float(prov["matmul_peak_tflops"].split()[0]) > 0
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(math.isclose(r["frac_peak"] * float(prov["matmul_peak_tflops"].split()[0]), r["tflops"],
                                   rel_tol=1e-3) for r in ok)
    assert "naive" in capsys.readouterr().out


def test_on_row_sees_every_cell_as_it_completes():
    seen = []
    rows = bench.run_sweep("cpu", variants=["sdpa", "triton"], measure_memory=False,
                           on_row=lambda rs: seen.append([r["variant"] for r in rs]), **TINY)
    assert seen == [["sdpa"], ["sdpa", "triton"]]
    assert [r["status"] for r in rows] == ["ok", "unavailable"]


# --- the variants of later chapters -------------------------------------------------


def test_new_variants_are_listed_with_their_exactness():
    vs = {v.name: v for v in bench.get_variants("cpu")}
    for name, exact in (("split_k", True), ("performer", False), ("block_sparse", True), ("paged", True)):
        assert name in vs and vs[name].fn is not None, name
        assert vs[name].exact is exact, name
    assert vs["paged"].forward_only and not vs["split_k"].forward_only
    capped = bench.get_variants("cpu", ["block_sparse", "paged", "flash"], max_len_python_loops=64)
    assert [v.max_len for v in capped] == [64, 64, 64]


@pytest.mark.parametrize("causal", [False, True])
def test_exact_new_variants_agree_with_sdpa(causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))  # B = 2: two sequences for paged
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for var in bench.get_variants("cpu", ["split_k", "block_sparse", "paged"]):
        torch.testing.assert_close(var.fn(q, k, v, causal), want, atol=1e-5, rtol=1e-5, msg=var.name)
    (perf,) = bench.get_variants("cpu", ["performer"])
    out = perf.fn(q, k, v, causal)
    assert out.shape == want.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(perf.fn(q, k, v, causal), out)  # the seeded generator: the same features


def test_performer_flops_count_features_and_linear_attention_on_them():
    B, H, L, D, m = 2, 3, 40, 8, 32
    linear = B * H * (2 * L * m * D + 2 * L * m * D)  # φ(K)ᵀV and φ(Q)·state with m × D states
    features = B * H * 2 * (L + L) * m * D  # W q and W k, W of shape m × D
    assert bench.performer_flops(B, H, L, L, D, num_features=m) == linear + features
    assert bench.linear_flops(B, H, L, L, D, feature_dim=m) == linear
    assert bench.linear_flops(B, H, L, L, D, causal=True, feature_dim=D) == bench.linear_flops(B, H, L, L, D, causal=True)
    C, n = 16, 3
    causal = B * H * (2 * n * C * C * (m + D) + 4 * n * C * m * D)
    assert bench.performer_flops(B, H, L, L, D, causal=True, chunk_size=C, num_features=m) == causal + features
    assert bench.performer_flops(B, H, L, L, D, mode="fwd_bwd", num_features=m) == 3 * (linear + features)
    rows = bench.run_sweep("cpu", variants=["performer"], measure_memory=False, **TINY)
    (r,) = rows
    assert r["status"] == "ok", r
    assert r["flops"] == bench.performer_flops(r["B"], r["H"], r["Lq"], r["Lk"], r["D"], num_features=256)


def test_unexpected_rows_accepts_planned_skips_of_the_new_variants():
    cfg = {"max_len_python_loops": 64}
    skip = dict(status="skipped", reason="L > 64 (too slow in this sweep)", Lq=128)
    for name in ("block_sparse", "paged"):
        assert bench.unexpected_rows([dict(skip, variant=name)], cfg) == []
    assert bench.unexpected_rows([dict(skip, variant="split_k")], cfg) != []  # not a Python loop
    fwd_only = dict(variant="paged", status="skipped", reason="forward only: paged is not timed in fwd_bwd", Lq=32)
    assert bench.unexpected_rows([fwd_only]) == []


# --- linear attention's own FLOPs, and rows above the peak -------------------------------


def test_linear_flops_count_its_matmuls():
    B, H, L, D = 2, 3, 40, 8
    assert bench.linear_flops(B, H, L, L, D) == B * H * (2 * L * D * D + 2 * L * D * D)  # φ(K)ᵀV, φ(Q)·state
    C, n = 16, 3  # 40 tokens in chunks of 16: 3 chunks, the last one padded
    causal = B * H * (4 * n * C * C * D + 4 * n * C * D * D)
    assert bench.linear_flops(B, H, L, L, D, causal=True, chunk_size=C) == causal
    assert bench.linear_flops(B, H, L, L, D, mode="fwd_bwd") == 3 * bench.linear_flops(B, H, L, L, D)
    assert bench.linear_flops(B, H, L, L, D) < bench.flops(B, H, L, L, D)  # it does less work at D < L
    with pytest.raises(ValueError, match="mode"):
        bench.linear_flops(1, 1, 4, 4, 4, mode="backward")


def test_sweep_counts_linear_with_its_own_flops():
    rows = bench.run_sweep("cpu", variants=["linear"], measure_memory=False, causal=[False, True], **TINY)
    for r in rows:
        assert r["status"] == "ok"
        assert r["flops"] == bench.linear_flops(r["B"], r["H"], r["Lq"], r["Lk"], r["D"], causal=r["causal"])


def test_rows_above_the_matmul_peak_say_so():
    fast = _fake("overcounted", lambda q, k, v, c: q + 1, flops_fn=lambda *a, **kw: 1e15)
    (row,) = bench.run_sweep("cpu", variants=[fast], peak_tflops=1.0, measure_memory=False, **TINY)
    assert row["frac_peak"] > 1 and "frac_peak > 1" in row["reason"]
    (row,) = bench.run_sweep("cpu", variants=_sdpa()[:1], peak_tflops=1e6, measure_memory=False, **TINY)
    assert row["frac_peak"] < 1 and "frac_peak" not in row["reason"]


# --- the time cap, the dtype fallback, FlexAttention ------------------------------------------


def test_deadline_stops_the_sweep_before_the_next_cell():
    import time

    rows = bench.run_sweep("cpu", variants=["sdpa", "naive"], lengths=[16, 32], head_dims=[16], heads=2,
                           deadline=time.monotonic() - 1, progress=False)
    assert rows == []
    calls = []

    def slow(q, k, v, causal):
        calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    rows = bench.run_sweep("cpu", variants=[_fake("slow", slow)], lengths=[16, 32, 64], head_dims=[16], heads=2,
                           deadline=time.monotonic() + 60, measure_memory=False, min_run_time=0.01, progress=False)
    assert [r["Lq"] for r in rows] == [16, 32, 64] and calls


def test_low_precision_dtype_falls_back_to_fp16_before_ampere(monkeypatch):
    assert bench.low_precision_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert bench.low_precision_dtype("cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100/H200
    assert bench.low_precision_dtype("cuda") == torch.bfloat16


def test_flex_is_compiled_on_cuda_only_and_runs_eagerly_on_request():
    (v,) = bench.get_variants("cpu", ["flex"])
    assert v.fn is None and "CUDA only" in v.reason
    rows = bench.run_sweep("cpu", variants=["flex", "sdpa"], flex_compile=False, causal=[False, True],
                           measure_memory=False, **TINY)
    assert {(r["variant"], r["status"]) for r in rows} == {("flex", "ok"), ("sdpa", "ok")}
    (v,) = bench.get_variants("cpu", ["flex"], flex_compile=False)
    q, k, val = (torch.randn(1, 2, 200, 16) for _ in range(3))  # 200: two blocks of 128, one partial
    for causal in (False, True):
        torch.testing.assert_close(v.fn(q, k, val, causal),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, val, is_causal=causal))


# --- chapter 18's live sweep, in its GPU configuration, at tiny sizes on the CPU -----------------


def _chapter18_cells(*ids):
    import json
    import pathlib

    nb = json.loads((pathlib.Path(__file__).parents[1] / "notebooks" / "18_gpu_timing.ipynb").read_text())
    by_id = {c.get("id"): "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"}
    return [by_id[i] for i in ids]


def test_chapter_config_skips_only_the_python_loop_flash_at_the_largest_length():
    cfg = bench.chapter_config("cuda", lengths=[64, 32, 128], dtype=torch.bfloat16)
    assert cfg["lengths"] == [32, 64, 128] and cfg["max_len_python_loops"] == 64
    assert {"triton", "sdpa_flash", "sdpa_cudnn", "flex", "flash"} <= set(cfg["variants"])
    assert bench.chapter_config("cpu")["dtypes"] == [torch.float32]
    flash_skip = dict(variant="flash", status="skipped", reason="L > 64 (too slow in this sweep)", Lq=128)
    assert bench.unexpected_rows([flash_skip], cfg) == []
    assert bench.unexpected_rows([dict(flash_skip, Lq=64)], cfg) != []  # a skip the config did not plan
    assert bench.unexpected_rows([dict(flash_skip, variant="naive")], cfg) != []
    assert bench.unexpected_rows([dict(flash_skip, status="error")], cfg) != []


def test_chapter18_gpu_branch_runs_at_tiny_sizes(monkeypatch):
    """The chapter's own cells 12.3 (sweep, checks, table, memory) with the CUDA configuration.

    Run on the CPU with the GPU's variants, dtype and skip rule at tiny lengths: the
    assertions that must hold on a GPU are the chapter's, unchanged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = bench.chapter_config

    def gpu_config_tiny(device):
        cfg = real("cuda", lengths=[64, 128, 256], dtype=torch.bfloat16)
        return dict(cfg, heads=2, head_dims=[32], min_run_time=0.01)  # tiny: the CPU runs it in seconds

    monkeypatch.setattr(bench, "chapter_config", gpu_config_tiny)
    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    ns = {"__name__": "chapter18", "torch": torch}
    setup, sweep, table, memory_check, memory_table = _chapter18_cells("c002", "c022", "c023", "c025", "c026")
    exec(setup, ns)
    ns.update(device=torch.device("cpu"), info=bench.provenance("cpu"), peak={"tflops": 1.0})
    exec(sweep, ns)
    rows = ns["rows"]
    assert {r["status"] for r in rows if r["variant"] == "flash"} == {"ok", "skipped"}
    assert {r["variant"] for r in rows} >= {"triton", "sdpa_cudnn", "flex", "sdpa_flash"}
    assert all(r["dtype"] == "bfloat16" for r in rows)
    for cell in (table, memory_check, memory_table):
        exec(cell, ns)
