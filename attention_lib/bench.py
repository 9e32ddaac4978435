"""Benchmark harness: time and memory of every attention variant over a sweep of ``L``
(chapter 18).

    python -m attention_lib.bench --device cpu  --out attention_lib/data/cpu-<machine>.csv
    python -m attention_lib.bench --device cuda --out attention_lib/data/<gpu>.csv
    python -m attention_lib.bench --device cpu --quick          # under 2 minutes

What it does, and why (each point is a way timing goes wrong, chapter 18):

* **Timers that know the device.** On CUDA with Triton installed, each measurement is
  ``triton.testing.do_bench``: CUDA events, a warm-up, an L2 flush before every run,
  and the quartiles of the per-run times. Elsewhere it is PyTorch's own
  ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises CUDA and runs
  with all of ``torch.get_num_threads()`` threads). No hand-rolled loops.
* **Warm-up first.** One untimed call per measurement absorbs lazy initialisation,
  Triton compilation and autotuning, and allocator growth; it also checks the output
  (finite, and not all zeros).
* **Median and spread.** Rows report the median and the inter-quartile range (IQR).
* **Rotating inputs.** Several independent input sets are cycled through, so that a
  repeated call cannot be served from a cache that holds the previous call's inputs.
* **Never zeros.** Inputs are ``randn`` from a seeded generator; they are checked to be
  non-zero before anything is timed.
* **The work, counted.** TFLOP/s uses the FlashAttention benchmark's formula,
  ``4·B·H·Lq·Lk·D`` for the forward pass, half of it for causal, ×2.5 for the backward
  (so ×3.5 for forward+backward); see :func:`flops`. Linear attention, which does
  other work, counts its own matmuls (:func:`linear_flops`). ``frac_peak`` divides by
  a matmul peak measured in the same run (a large bf16 matmul on CUDA, fp16 before
  Ampere, fp32 on CPU); a row above 1 says so in its ``reason``.
* **Launch overhead.** On a GPU the pure-PyTorch variants (``naive``, ``flash``,
  ``chunked``, ``sliding_window``, ``linear``) run one small kernel per operation,
  launched from Python; their times include that overhead, which a fused kernel
  (``sdpa_*``, ``triton``, compiled ``flex``) pays once.
* **Memory.** Peak tensor memory of one call, from :func:`attention_lib.memory.peak_memory`
  (``torch.cuda.max_memory_allocated`` on CUDA; a storage tracker on CPU, which does not
  see scratch buffers allocated inside a single C++ kernel).
* **Failures are data.** An out-of-memory error becomes a row with status ``OOM``;
  a variant that does not exist yet, or an SDPA backend this device lacks, becomes
  a row with status ``unavailable`` and the reason. ``--mem-cap-gib`` skips the
  quadratic-memory variants (naive, SDPA's MATH backend) where their estimated peak
  would exceed the cap (status ``skipped``).

The CSV starts with ``#`` lines of provenance (device, driver/CUDA, versions, dtype,
date, exact command); :func:`load_results` reads it back. Recorded sweeps are package
data, in ``attention_lib/data/`` (chapter 18 plots every CSV there).

This module is the harness: the variants, the inputs, the timers, the sweep and the
command line. The cost model (:func:`flops`, :func:`linear_flops`,
:func:`attention_bytes`) is :mod:`attention_lib.cost`, the results file (:data:`COLUMNS`,
:func:`provenance`, :func:`write_results`, :func:`load_results`, :func:`format_table`)
is :mod:`attention_lib.results`; both are re-exported here.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from .cost import attention_bytes, flops, linear_flops, performer_flops
from .results import COLUMNS, format_table, load_results, provenance, write_results

__all__ = [
    "flops",
    "linear_flops",
    "performer_flops",
    "attention_bytes",
    "low_precision_dtype",
    "chapter_config",
    "unexpected_rows",
    "Variant",
    "get_variants",
    "make_inputs",
    "time_call",
    "measure_matmul_peak",
    "run_sweep",
    "provenance",
    "write_results",
    "load_results",
    "format_table",
    "COLUMNS",
    "main",
]

# ---------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------

SDPA_BACKENDS = ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION")
# variants that loop over tiles or blocks in Python: ``max_len_python_loops`` caps them
PYTHON_LOOP_VARIANTS = ("flash", "block_sparse", "paged")
PAGED_BLOCK_SIZE = 16  # tokens per block of the paged variant's cache (vLLM's default)


@dataclass
class Variant:
    """One attention implementation as the sweep calls it.

    ``fn(q, k, v, causal)`` returns the output (B, H, Lq, D). ``reason`` is set (and
    ``fn`` is None) when the variant cannot run here. ``quadratic_memory`` marks
    variants that materialise the ``Lq × Lk`` scores (for ``--mem-cap-gib``);
    ``max_len`` skips lengths above it (slow Python-loop variants). ``flops_fn``
    counts the work of a variant that does not do exact attention's (the signature
    of :func:`linear_flops`); None means :func:`flops`. ``forward_only`` variants get
    a ``skipped`` row in ``fwd_bwd`` mode.
    """

    name: str
    fn: Callable[..., torch.Tensor] | None
    reason: str = ""
    exact: bool = True
    window: int | None = None
    quadratic_memory: bool = False
    max_len: int | None = None
    note: str = ""
    flops_fn: Callable[..., float] | None = None
    forward_only: bool = False


def _lib_function(name: str):
    """``attention_lib.<name>`` if it exists (other chapters add them), else None."""
    import attention_lib

    return getattr(attention_lib, name, None)


def _sdpa_backend_fn(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _paged_fn(paged_attention: Callable[..., torch.Tensor], cache_cls: Any, block_size: int = PAGED_BLOCK_SIZE):
    """``fn(q, k, v, causal)`` through a paged cache: one sequence per batch row, built in the call.

    The harness times the whole call, so the time includes writing every key and value
    into the block pool (``PagedKVCache.append``), not only ``paged_attention``'s reads.
    """

    def call(q, k, v, causal):
        B, Hkv, S, D = k.shape
        per_seq = -(-S // block_size)
        cache = cache_cls(max(1, B * per_seq), block_size, Hkv, D, value_dim=v.shape[-1], dtype=k.dtype,
                          device=k.device)
        ids = [cache.add_sequence() for _ in range(B)]
        for b, seq in enumerate(ids):
            cache.append(seq, k[b], v[b])  # (Hkv, S, D) into blocks of (block_size, Hkv, D)
        return paged_attention(q, cache, ids, is_causal=causal)

    return call


def get_variants(
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    *,
    window: int = 256,
    max_len_python_loops: int | None = None,
    flex_compile: bool | None = None,
) -> list[Variant]:
    """The variants the harness compares, resolved for ``device``.

    Names: ``naive``, ``sdpa`` (PyTorch's own dispatch: the baseline of every time
    ratio), ``sdpa_math``, ``sdpa_efficient``, ``sdpa_flash``, ``sdpa_cudnn`` (one SDPA
    backend each, forced with ``sdpa_kernel``), ``flash`` (pure PyTorch), ``triton``,
    ``chunked``, ``sliding_window``, ``linear``, ``split_k`` (Flash-Decoding's split
    keys), ``performer`` (FAVOR+, 256 features, approximate), ``block_sparse`` (dense
    attention through the block-sparse tile loop), ``paged`` (a paged KV cache, forward
    only, its build timed too) and ``flex`` (PyTorch's FlexAttention,
    see :func:`_flex_variant`). Missing library functions are returned with
    ``fn=None`` and a reason, so the sweep records them as unavailable.
    ``max_len_python_loops`` caps the variants of :data:`PYTHON_LOOP_VARIANTS`.

    ``flex_compile``: None compiles FlexAttention on CUDA and leaves it out on the CPU
    (inductor's C++ compile takes tens of seconds per shape there); False runs it
    eagerly (it then materialises the scores: a check of the code path, not a timing
    of FlexAttention); True compiles it anywhere.

    On a GPU, the pure-PyTorch variants (``naive``, ``flash``, ``chunked``,
    ``sliding_window``, ``linear``) launch one small kernel per operation from
    Python: their times there measure launch overhead as much as the GPU.
    """
    device = torch.device(device)
    out: list[Variant] = []
    naive = _lib_function("scaled_dot_product_attention")
    out.append(Variant("naive", lambda q, k, v, c: naive(q, k, v, is_causal=c), quadratic_memory=True))
    out.append(Variant("sdpa", lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                       note="PyTorch's default dispatch"))
    for backend in SDPA_BACKENDS:
        name = "sdpa_" + {"MATH": "math", "EFFICIENT_ATTENTION": "efficient",
                          "FLASH_ATTENTION": "flash", "CUDNN_ATTENTION": "cudnn"}[backend]
        out.append(Variant(name, _sdpa_backend_fn(backend), quadratic_memory=(backend == "MATH"),
                           note=f"sdpa_kernel([SDPBackend.{backend}])"))

    def lib(name, lib_name, call, **kw):
        f = _lib_function(lib_name)
        if f is None:
            out.append(Variant(name, None, reason=f"unavailable: attention_lib.{lib_name} does not exist yet", **kw))
        else:
            out.append(Variant(name, call(f), **kw))

    lib("flash", "flash_attention", lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c),
        max_len=max_len_python_loops, note="pure PyTorch, block_q=block_k=128")
    if device.type == "cuda":
        lib("triton", "triton_flash_attention", lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c))
    else:
        out.append(Variant("triton", None, reason="unavailable: CUDA only (the Triton interpreter is too slow to time)"))
    lib("chunked", "chunked_attention", lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c))
    lib("sliding_window", "sliding_window_attention",
        lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c, window=window), window=window,
        note=f"window={window}: causal band of {window} keys, or symmetric band if not causal")
    lib("linear", "linear_attention", lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c),
        exact=False, flops_fn=linear_flops, note="elu+1 feature map; FLOPs of its own matmuls (linear_flops)")
    lib("split_k", "split_k_attention", lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c, num_splits=8),
        note="Flash-Decoding: keys in 8 splits, merged by online softmax")
    lib("performer", "performer_attention",
        lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c, num_features=256,
                                       generator=torch.Generator(device=q.device).manual_seed(0)),
        exact=False, flops_fn=functools.partial(performer_flops, num_features=256),
        note="FAVOR+, m=256 random features; FLOPs of its own matmuls (performer_flops)")
    lib("block_sparse", "block_sparse_attention",
        lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c, BLOCK_SIZE=128), max_len=max_len_python_loops,
        note="dense (or causal) mask through the block-sparse tile loop, BLOCK_SIZE=128")
    paged_cache = _lib_function("PagedKVCache")
    lib("paged", "paged_attention", lambda f: _paged_fn(f, paged_cache), max_len=max_len_python_loops,
        forward_only=True, note=f"PagedKVCache, blocks of {PAGED_BLOCK_SIZE}, one sequence per batch row; forward "
                                "only; the time includes building the cache (append), which the harness cannot exclude")
    out.append(_flex_variant(device, flex_compile))
    if names is not None:
        wanted = list(names)
        unknown = set(wanted) - {v.name for v in out}
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[v.name for v in out]}")
        out = [v for v in out if v.name in wanted]
    return out


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _raise_recompile_limit(n: int = 256) -> None:
    """Let dynamo compile one graph per (shape, dtype, mask) of a sweep.

    Past its recompile limit (8 by default) dynamo silently runs the function eagerly,
    and FlexAttention uncompiled materialises the scores: the sweep would time that.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


def _flex_variant(device: torch.device, compile: bool | None) -> Variant:
    """PyTorch's FlexAttention with a causal ``BlockMask`` (or none), as its own benchmarks run it.

    The block mask is built once per shape, outside the timed call, and cached; the
    function is ``torch.compile(flex_attention, dynamic=False)``, one compiled graph
    per shape, dtype and mask (its first call compiles: the sweep's warm-up).
    """
    if compile is None:
        if device.type != "cuda":
            return Variant("flex", None, reason="unavailable: compiled FlexAttention is timed on CUDA only "
                                                "(flex_compile=False runs it eagerly)")
        compile = True
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return Variant("flex", None, reason=f"unavailable: torch.nn.attention.flex_attention ({exc})")
    fn: Callable[..., torch.Tensor] = flex_attention  # torch.compile returns a plain callable
    if compile:
        _raise_recompile_limit()
        fn = torch.compile(flex_attention, dynamic=False)
    block_masks: dict = {}

    def call(q, k, v, causal):
        bm = None
        if causal:
            key = (q.shape[-2], k.shape[-2], str(q.device))
            if key not in block_masks:
                block_masks[key] = create_block_mask(_causal_mod, None, None, q.shape[-2], k.shape[-2],
                                                     device=q.device)
            bm = block_masks[key]
        return fn(q, k, v, block_mask=bm)

    how = "torch.compile(flex_attention, dynamic=False)" if compile else "flex_attention, eager (not compiled)"
    return Variant("flex", call, note=f"{how}; causal BlockMask built once per shape")


# ---------------------------------------------------------------------------
# Inputs and timing
# ---------------------------------------------------------------------------


def make_inputs(
    B: int, H: int, Lq: int, Lk: int, D: int, *, dtype=torch.float32, device="cpu", n_sets: int = 3, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """``n_sets`` independent random input sets ``(q, k, v, dout)``, each (B, H, L, D).

    Drawn with ``randn`` from a generator seeded on ``device`` (never zeros: checked),
    in float32 and then cast, so that every dtype sees the same values.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, H, Lq, D, generator=g, device=device)  # (B, H, Lq, D)
        k = torch.randn(B, H, Lk, D, generator=g, device=device)  # (B, H, Lk, D)
        v = torch.randn(B, H, Lk, D, generator=g, device=device)  # (B, H, Lk, D)
        do = torch.randn(B, H, Lq, D, generator=g, device=device)  # (B, H, Lq, D): the output gradient
        ts = tuple(t.to(dtype=dtype) for t in (q, k, v, do))
        for t in ts:
            if t.numel() and not bool((t != 0).any()):
                raise AssertionError("benchmark inputs are all zeros")
        sets.append(ts)
    return sets


def _n_sets(bytes_per_set: float, device: torch.device) -> int:
    """Enough input sets to hold at least 2× a last-level cache (taken as 64 MB), 2 to 8."""
    return int(min(8, max(2, math.ceil(2 * 64e6 / max(bytes_per_set, 1.0)))))


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu", *, min_run_time: float = 0.2) -> dict:
    """Time ``fn()`` (already warmed up) and return its median and IQR, in seconds.

    CUDA with Triton: ``triton.testing.do_bench`` (CUDA events, L2 flush, quartiles).
    Otherwise ``torch.utils.benchmark.Timer.blocked_autorange`` with all threads.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            q25, q50, q75 = do_bench(fn, warmup=25, rep=max(100, int(1000 * min_run_time)),
                                     quantiles=[0.25, 0.5, 0.75])
            return {"median_s": q50 / 1e3, "iqr_s": (q75 - q25) / 1e3, "n": None, "timer": "triton.testing.do_bench"}
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "n": len(m.times), "timer": "torch.utils.benchmark.Timer"}


def _timer_once(fn: Callable[[], Any]) -> float:
    """One call, timed by PyTorch's Timer (used for the warm-up and for budgeting)."""
    import torch.utils.benchmark as benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1).median


def low_precision_dtype(device: str | torch.device = "cuda") -> torch.dtype:
    """The 16-bit dtype to time on ``device``: bf16 where its tensor cores have it, else fp16.

    bf16 needs compute capability 8.0 (Ampere) or later; older GPUs such as Colab's T4
    (7.5) emulate it slowly, so they get fp16. The CPU gets bf16.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def measure_matmul_peak(device: str | torch.device = "cpu", *, n: int | None = None, dtype=None) -> dict:
    """The device's practical peak: TFLOP/s of one large square matmul, measured now.

    ``8192³`` in :func:`low_precision_dtype` (bf16, or fp16 before Ampere) on CUDA,
    fp32 ``2048³`` on CPU, unless ``n``/``dtype`` say otherwise.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = low_precision_dtype(device) if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)
    sets = [tuple(torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2)) for _ in range(2)]
    cycle = itertools.cycle(sets)

    def step():
        a, b = next(cycle)
        return a @ b

    step()
    _timer_once(step)
    t = time_call(step, device, min_run_time=0.5)
    return {"tflops": 2 * n**3 / t["median_s"] / 1e12, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "median_s": t["median_s"]}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "alloc" in text)


def _is_unavailable(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("No viable backend" in text or "No available kernel" in text)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------



@dataclass
class _Config:
    dtype: torch.dtype
    B: int
    H: int
    L: int
    D: int
    causal: bool
    mode: str


def _one(variant: Variant, cfg: _Config, device: torch.device, *, min_run_time: float,
         mem_cap_bytes: float | None, measure_memory: bool, peak_tflops: float | None) -> dict:
    dtype_name = str(cfg.dtype).replace("torch.", "")
    window = variant.window
    row: dict[str, Any] = {
        "variant": variant.name, "mode": cfg.mode, "status": "ok", "reason": variant.note,
        "dtype": dtype_name, "B": cfg.B, "H": cfg.H, "Lq": cfg.L, "Lk": cfg.L, "D": cfg.D,
        "causal": cfg.causal, "window": window if window is not None else "",
        "flops": (variant.flops_fn(cfg.B, cfg.H, cfg.L, cfg.L, cfg.D, causal=cfg.causal, mode=cfg.mode)
                  if variant.flops_fn is not None else
                  flops(cfg.B, cfg.H, cfg.L, cfg.L, cfg.D, causal=cfg.causal, mode=cfg.mode,
                        window=window if window is not None and window < cfg.L else None)),
    }
    if variant.fn is None:
        row.update(status="unavailable", reason=variant.reason)
        return row
    if variant.max_len is not None and cfg.L > variant.max_len:
        row.update(status="skipped", reason=f"L > {variant.max_len} (too slow in this sweep)")
        return row
    if variant.forward_only and cfg.mode != "fwd":
        row.update(status="skipped", reason=f"forward only: {variant.name} is not timed in {cfg.mode}")
        return row
    elem = torch.tensor([], dtype=cfg.dtype).element_size()
    if variant.quadratic_memory and mem_cap_bytes is not None:
        # the scores and the probabilities, twice more for the backward's saved copies
        est = cfg.B * cfg.H * cfg.L * cfg.L * elem * (3 if cfg.mode == "fwd" else 6)
        if est > mem_cap_bytes:
            row.update(status="skipped", reason=f"estimated peak {est / 2**30:.1f} GiB > memory cap "
                                                f"{mem_cap_bytes / 2**30:.1f} GiB")
            return row
    fn = variant.fn
    sets = None
    try:
        n_sets = _n_sets(4 * cfg.B * cfg.H * cfg.L * cfg.D * elem, device)
        sets = make_inputs(cfg.B, cfg.H, cfg.L, cfg.L, cfg.D, dtype=cfg.dtype, device=device, n_sets=n_sets)
        row["n_input_sets"] = n_sets
        step_on: Callable[..., Any]
        if cfg.mode == "fwd":
            sets = [(q, k, v) for q, k, v, _ in sets]

            def step_fwd(q, k, v):
                with torch.no_grad():
                    return fn(q, k, v, cfg.causal)

            step_on = step_fwd
        else:
            sets = [(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do) for q, k, v, do in sets]

            def step_fwd_bwd(q, k, v, do):
                out = fn(q, k, v, cfg.causal)
                return torch.autograd.grad(out, (q, k, v), do)

            step_on = step_fwd_bwd

        cycle = itertools.cycle(sets)

        def step():
            return step_on(*next(cycle))

        # Warm-up, which also checks that the output is real work: finite and not all zeros.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                first = step_on(*sets[0])  # compiles, autotunes, allocates: never timed
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except RuntimeError as exc:
                if _is_unavailable(exc):
                    why = "; ".join(_short(str(w.message), 100) for w in caught[:3])
                    row.update(status="unavailable",
                               reason=f"unavailable on {device.type}: {_short(str(exc).split('. ')[0], 80)}"
                               + (f" ({why})" if why else ""))
                    return row
                raise
        outs = first if isinstance(first, tuple) else (first,)
        for o in outs:
            if not bool(torch.isfinite(o).all()) or not bool((o != 0).any()):
                row.update(status="error", reason="output is not finite or is all zeros")
                return row
        del first, outs
        t_start = time.perf_counter()  # a second call, only to budget the measurement, not a result
        step_on(*sets[-1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_once = time.perf_counter() - t_start
        if measure_memory:
            from .memory import peak_memory

            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _, row["peak_mem_bytes"] = peak_memory(step_on, *sets[0])
        t = time_call(step, device, min_run_time=max(min_run_time, 2.5 * t_once))
    except Exception as exc:  # an OOM is a result; anything else is recorded, not raised
        if _is_oom(exc):
            row.update(status="OOM", reason=_short(str(exc), 120))
        else:
            row.update(status="error", reason=f"{type(exc).__name__}: {_short(str(exc), 120)}")
        return row
    finally:
        sets = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(time_ms=t["median_s"] * 1e3, iqr_ms=t["iqr_s"] * 1e3, n_timed=t["n"], timer=t["timer"])
    row["tflops"] = row["flops"] / t["median_s"] / 1e12
    if peak_tflops:
        row["frac_peak"] = row["tflops"] / peak_tflops
        if row["frac_peak"] > 1:  # faster than the matmul peak: the FLOP count overstates the work
            row["reason"] = (row["reason"] + "; " if row["reason"] else "") + \
                "frac_peak > 1: above the measured matmul peak, so its FLOP count overstates the work done"
    return row


def _add_ratios(rows: list[dict]) -> None:
    """``time_ratio_sdpa`` and ``mem_ratio_naive``, against the same configuration."""
    def key(r):
        return (r["mode"], r["dtype"], r["B"], r["H"], r["Lq"], r["Lk"], r["D"], r["causal"])

    sdpa = {key(r): r for r in rows if r["variant"] == "sdpa" and r["status"] == "ok"}
    naive = {key(r): r for r in rows if r["variant"] == "naive" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = sdpa.get(key(r))
        if base is not None:
            r["time_ratio_sdpa"] = r["time_ms"] / base["time_ms"]
        base = naive.get(key(r))
        if base is not None and r.get("peak_mem_bytes") not in (None, "") and base.get("peak_mem_bytes"):
            r["mem_ratio_naive"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]


def run_sweep(
    device: str | torch.device = "cpu",
    *,
    lengths: Iterable[int] = (512, 1024, 2048),
    head_dims: Iterable[int] = (64,),
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    causal: Iterable[bool] = (False,),
    modes: Iterable[str] = ("fwd",),
    batch: int | Callable[[int], int] = 1,
    heads: int | Callable[[int], int] = 8,
    variants: Iterable[str] | list[Variant] | None = None,
    window: int = 256,
    max_len_bwd: int | None = None,
    max_len_python_loops: int | None = None,
    min_run_time: float = 0.2,
    mem_cap_gib: float | None = None,
    measure_memory: bool = True,
    peak_tflops: float | None = None,
    progress: bool = True,
    on_row: Callable[[list[dict]], None] | None = None,
    deadline: float | None = None,
    flex_compile: bool | None = None,
) -> list[dict]:
    """Time (and measure the memory of) every variant over a grid; one dict per cell.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        lengths: sequence lengths ``L`` (``Lq = Lk = L``).
        head_dims, dtypes, causal, modes: the other axes of the grid; modes are
            ``"fwd"`` and ``"fwd_bwd"``.
        batch, heads: ints, or functions of ``(L)`` / ``(D)`` (e.g. FlashAttention's
            ``B = 16384 // L`` and ``H = 2048 // D``).
        variants: names (see :func:`get_variants`) or ready :class:`Variant` objects.
        window: the sliding window's size.
        max_len_bwd: skip ``fwd_bwd`` above this ``L``.
        max_len_python_loops: skip the Python-loop variants (:data:`PYTHON_LOOP_VARIANTS`)
            above this ``L``.
        min_run_time: seconds each ``blocked_autorange`` runs at least (it also runs at
            least ~2.5 calls).
        mem_cap_gib: skip quadratic-memory variants whose estimate exceeds this.
        measure_memory: measure each cell's peak memory (one extra call).
        peak_tflops: the matmul peak for ``frac_peak`` (see :func:`measure_matmul_peak`).
        progress: show a ``tqdm`` bar.
        on_row: called with the rows so far after each cell (the command line uses
            it to rewrite the CSV, so that an interrupted sweep keeps what it measured).
        deadline: a ``time.monotonic()`` value; no cell starts after it, and the cells
            not reached get no row (order the grid by importance).
        flex_compile: passed to :func:`get_variants`.

    Returns:
        Rows with the keys of :data:`COLUMNS` (missing ones mean "not measured").
    """
    device = torch.device(device)
    given = None if variants is None else list(variants)
    if given is None or all(isinstance(v, str) for v in given):
        names = None if given is None else [v for v in given if isinstance(v, str)]  # all of them
        vs = get_variants(device, names, window=window, max_len_python_loops=max_len_python_loops,
                          flex_compile=flex_compile)
    else:
        vs = cast("list[Variant]", given)
    cfgs = []
    for dtype, D, c, mode, L in itertools.product(dtypes, head_dims, causal, modes, lengths):
        if mode == "fwd_bwd" and max_len_bwd is not None and L > max_len_bwd:
            continue
        B = batch(L) if callable(batch) else batch
        H = heads(D) if callable(heads) else heads
        cfgs.append(_Config(dtype, B, H, L, D, c, mode))
    tasks = [(v, cfg) for cfg in cfgs for v in vs]
    bar = _progress(tasks, progress)
    rows = []
    cap = None if mem_cap_gib is None else mem_cap_gib * 2**30
    for v, cfg in bar:
        if deadline is not None and time.monotonic() > deadline:
            break
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{v.name} L={cfg.L} D={cfg.D} {cfg.mode}{' causal' if cfg.causal else ''}")
        rows.append(_one(v, cfg, device, min_run_time=min_run_time, mem_cap_bytes=cap,
                         measure_memory=measure_memory, peak_tflops=peak_tflops))
        if on_row is not None:
            _add_ratios(rows)
            on_row(rows)
    _add_ratios(rows)
    return rows


def _progress(items, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="attention sweep", unit="cell", file=sys.stderr)


def chapter_config(device: str | torch.device, *, lengths: Iterable[int] | None = None,
                   dtype: torch.dtype | None = None) -> dict:
    """The live sweep of chapter 18, section 18.3, for ``device``: keyword arguments of :func:`run_sweep`.

    On CUDA: L = 1024…8192, B = 1, H = 16, D = 128 in :func:`low_precision_dtype`, every
    variant; the pure-PyTorch ``flash`` (a Python loop over tiles, which on a GPU times
    kernel launches) runs up to the second-largest length and is ``skipped`` at the
    largest. On the CPU: L = 256…1024, fp32, D = 64, the variants that run there.
    ``lengths`` and ``dtype`` replace the defaults (a test runs the CUDA configuration
    at tiny lengths on the CPU); the skip rule follows the lengths.
    """
    device = torch.device(device)
    cfg: dict[str, Any]
    if device.type == "cuda":
        cfg = dict(lengths=[1024, 2048, 4096, 8192], dtypes=[dtype or low_precision_dtype(device)], heads=16,
                   head_dims=[128], window=256, min_run_time=0.1,
                   variants=["naive", "sdpa", "sdpa_math", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn",
                             "triton", "flex", "flash", "chunked", "sliding_window", "linear"])
    else:  # small sizes: the chapter must run in seconds on a CI machine
        cfg = dict(lengths=[256, 512, 1024], dtypes=[dtype or torch.float32], heads=8, head_dims=[64],
                   window=128, min_run_time=0.05,
                   variants=["naive", "sdpa", "flash", "chunked", "sliding_window", "linear"])
    if lengths is not None:
        cfg["lengths"] = sorted(lengths)
    if device.type == "cuda":
        cfg["max_len_python_loops"] = cfg["lengths"][-2] if len(cfg["lengths"]) > 1 else None
    return cfg


def unexpected_rows(rows: list[dict], config: dict | None = None) -> list[dict]:
    """The rows of a sweep that are neither measured nor explained.

    Expected: ``ok``; ``unavailable`` (a backend or variant this device lacks);
    ``skipped`` because ``L`` is above the ``max_len_python_loops`` of ``config``
    (when given, for :data:`PYTHON_LOOP_VARIANTS`), above the memory cap, or because
    a forward-only variant is not timed backward. Anything else (``error``, ``OOM``, a skip
    the configuration did not ask for) is returned, so that ``assert not
    unexpected_rows(rows, config)`` fails with the rows in the message.
    """
    cap = (config or {}).get("max_len_python_loops")
    bad = []
    for r in rows:
        if r["status"] in ("ok", "unavailable"):
            continue
        reason = str(r.get("reason", ""))
        if r["status"] == "skipped" and (
                (cap is not None and r["variant"] in PYTHON_LOOP_VARIANTS and r["Lq"] > cap
                 and reason.startswith("L >"))
                or "memory cap" in reason or reason.startswith("forward only")):
            continue
        bad.append(r)
    return bad


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _defaults(device: str, quick: bool) -> dict:
    if device == "cuda":
        if quick:
            return dict(lengths=[1024, 4096], head_dims=[128], causal=[False], modes=["fwd", "fwd_bwd"],
                        batch=lambda L: max(1, 16384 // L), heads=lambda D: 2048 // D,
                        max_len_python_loops=4096, min_run_time=0.1)
        return dict(lengths=[512, 1024, 2048, 4096, 8192, 16384, 32768], head_dims=[64, 128],
                    causal=[False, True], modes=["fwd", "fwd_bwd"],
                    batch=lambda L: max(1, 16384 // L), heads=lambda D: 2048 // D,
                    max_len_python_loops=8192, min_run_time=0.1)
    if quick:
        return dict(lengths=[256, 512, 1024], head_dims=[64], causal=[False], modes=["fwd", "fwd_bwd"],
                    batch=1, heads=8, max_len_bwd=512, min_run_time=0.05)
    return dict(lengths=[1024, 2048, 4096, 8192, 16384], head_dims=[64], causal=[False], modes=["fwd", "fwd_bwd"],
                batch=1, heads=8, max_len_bwd=4096, max_len_python_loops=4096, min_run_time=0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attention_lib.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small sweep, under 2 minutes")
    parser.add_argument("--out", default=None, help="CSV path (default: ./<device>[-quick].csv; the book's "
                        "recorded sweeps are attention_lib/data/*.csv)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(_DTYPES), default=None,
                        help="default: bf16 on cuda (fp16 before compute capability 8.0), fp32 on cpu")
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument("--head-dims", nargs="+", type=int, default=None)
    parser.add_argument("--causal", choices=["no", "yes", "both"], default=None)
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=None)
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on cpu, 16384 // L on cuda")
    parser.add_argument("--heads", type=int, default=None, help="default: 8 on cpu, 2048 // D on cuda")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-len-bwd", type=int, default=None, help="skip fwd_bwd above this L")
    parser.add_argument("--max-len-python-loops", type=int, default=None,
                        help="skip the Python-loop variants (flash, block_sparse, paged) above this L "
                             "(default: 8192 on cuda, none on cpu)")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="skip naive/sdpa_math where their estimated peak exceeds this "
                             "(default on cpu: 8, or half the available memory if less; none on cuda)")
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    cfg = _defaults(args.device, args.quick)
    cfg["dtypes"] = ([_DTYPES[d] for d in args.dtype] if args.dtype else
                     [low_precision_dtype(device) if args.device == "cuda" else torch.float32])
    for name in ("lengths", "head_dims", "modes", "max_len_bwd", "max_len_python_loops"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.causal is not None:
        cfg["causal"] = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    if args.batch is not None:
        cfg["batch"] = args.batch
    if args.heads is not None:
        cfg["heads"] = args.heads
    mem_cap = args.mem_cap_gib
    if mem_cap is None and args.device == "cpu":
        mem_cap = min(8.0, _available_gib() / 2)
    out = args.out or f"{args.device}{'-quick' if args.quick else ''}.csv"

    peak = measure_matmul_peak(device)
    print(f"matmul peak: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']} {peak['n']}x{peak['n']}, measured now)",
          file=sys.stderr)
    batch, heads = cfg["batch"], cfg["heads"]
    argv = sys.argv[1:] if argv is None else argv
    prov = provenance(
        device,
        command="python -m attention_lib.bench " + " ".join(shlex.quote(a) for a in argv),
        dtype=" ".join(str(d).replace("torch.", "") for d in cfg["dtypes"]),
        matmul_peak_tflops=f"{peak['tflops']:.4g} ({peak['dtype']} {peak['n']}x{peak['n']} matmul, measured in this run)",
        sweep=f"L={cfg['lengths']} D={cfg['head_dims']} causal={cfg['causal']} modes={cfg['modes']} "
              f"B={'16384//L' if callable(batch) else batch} H={'2048//D' if callable(heads) else heads} "
              f"window={args.window} mem_cap_gib={mem_cap}",
        flops="FlashAttention's formula: 4*B*H*Lq*Lk*D forward, /2 causal, x2.5 backward (x3.5 fwd_bwd); "
              "sliding_window counts only the pairs in its band; linear and performer count their own matmuls "
              "(linear_flops, performer_flops)",
        memory="attention_lib.memory.peak_memory: torch.cuda.max_memory_allocated on CUDA; on CPU a storage "
               "tracker that does not see scratch buffers inside one C++ kernel",
    )
    rows = run_sweep(device, variants=args.variants, window=args.window, mem_cap_gib=mem_cap,
                     measure_memory=not args.no_memory, peak_tflops=peak["tflops"],
                     progress=not args.no_progress, on_row=lambda rows: write_results(out, rows, prov), **cfg)
    write_results(out, rows, prov)
    print(format_table(rows))
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


if __name__ == "__main__":
    sys.exit(main())
