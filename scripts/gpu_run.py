"""The prepared GPU run of issue 13: every step, its time budget, and a dry run on the CPU.

    bash scripts/gpu_run.sh [OUT] [--budget-s 450] [--steps provenance,tests,...]
    bash scripts/gpu_run.sh --dry-run [OUT]

(``gpu_run.sh`` installs the carried wheels and calls this file.) Steps, in order:

1. ``provenance``: ``nvidia-smi`` (``-q`` and a query of clocks, power, temperature),
   versions, device properties, a bf16 and an fp16 matmul peak and a copy bandwidth,
   measured now -> ``provenance.json``.
2. In parallel, all three mostly compiling on the CPU while the GPU does little:
   ``tests`` (``pytest -m cuda tests/test_triton_cuda.py``, under pytest-xdist if present),
   ``prewarm`` (every autotuning configuration of the three Triton kernels compiled
   for the sweep's dtypes, head dims and causal flags, in parallel processes, into
   Triton's disk cache, so that autotuning later only benchmarks) and ``chapter9``
   (chapter 9 re-executed natively with nbclient; its live timing cell runs beside the
   tests, so its printed numbers are not the ones to quote: the sweep's are).
3. ``sweep``: autotuning of the Triton kernel at the priority shapes (chosen configs and
   their timings -> ``autotune.json``), then the benchmark sweep in order of importance
   (bf16, D=128, L=4k..16k, ``triton`` against ``sdpa_flash``/``sdpa_cudnn``/``sdpa_efficient``/
   ``sdpa`` first), cut at its deadline -> ``h200.csv`` with provenance (commit it as
   ``attention_lib/data/h200.csv``, package data, where chapter 18 finds recorded sweeps). Autotuning results
   are cached on disk (``TRITON_CACHE_AUTOTUNING=1``), so the chapters reuse them.
4. ``chapter18``: chapter 18 re-executed natively -> ``18_gpu_timing.ipynb``.
5. ``hbm``: Nsight Compute's DRAM byte counters for one forward pass of ``triton`` and of
   ``sdpa_flash`` (bf16, D=128, L=8192), against the compulsory traffic -> ``hbm.json``.
6. ``summary``: the target ratios, coverage, and what is still unmeasured -> ``summary.md``
   (printed last, so the end of the output carries it).

Every step has a deadline, a fraction of ``--budget-s`` (450 s by default, under the
8 minutes the issue allows): a step that finishes early hands its time on; the sweep
stops starting cells at its deadline. Everything lands in OUT (8 files at most, the
device tool's limit): ``run.log`` holds every step's output.

``--dry-run`` runs every step on the CPU at tiny sizes (kernels in Triton's interpreter,
FlexAttention eager, chapters cut to their first code cells), so that
``tests/test_gpu_run.py`` keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUDGET_S = 450.0

# (step, the fraction of the budget by which it must have ended). Steps in one tuple
# run in parallel. Times for the default 450 s are in the comments.
SCHEDULE = [
    (("provenance",), 0.07),  # 32 s: CUDA start, nvidia-smi, three measurements
    (("tests", "prewarm", "chapter9"), 0.36),  # until 162 s
    (("sweep",), 0.70),  # until 315 s: 150 s or more of autotuning and timing
    (("chapter18",), 0.90),  # until 405 s
    (("hbm",), 0.97),  # until 437 s
    (("summary",), 1.0),
]
STEPS = [s for group, _ in SCHEDULE for s in group]
FILES = ["run.log", "provenance.json", "autotune.json", "h200.csv", "hbm.json",
         "09_triton_kernel.ipynb", "18_gpu_timing.ipynb", "summary.md"]  # at most 8 come back

CORE = ["triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa"]
KINDS = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}


def plan(dry: bool) -> list[dict]:
    """The sweep, in order of importance: groups of ``bench.run_sweep`` arguments (dtypes as names)."""
    modes, both = ["fwd", "fwd_bwd"], [False, True]
    if dry:
        tiny = dict(lengths=[32, 64], causal=both, modes=modes, head_dims=[16])
        # FlexAttention runs eagerly on the CPU, forward only, and without the CPU memory tracker
        # (it has no backward there, and its higher-order operator rejects the tracker's dispatch mode)
        return [dict(tiny, dtypes=["bfloat16"], variants=CORE + ["sdpa_math"]),
                dict(tiny, dtypes=["bfloat16"], variants=["flex"], modes=["fwd"], measure_memory=False),
                dict(tiny, dtypes=["float16"], variants=["sdpa"], lengths=[32])]
    long, short = [4096, 8192, 16384], [1024, 2048]
    return [
        dict(dtypes=["bfloat16"], head_dims=[128], lengths=long, causal=both, modes=modes, variants=CORE),
        dict(dtypes=["bfloat16"], head_dims=[128], lengths=short, causal=both, modes=modes,
             variants=CORE + ["sdpa_math"]),
        dict(dtypes=["bfloat16"], head_dims=[64], lengths=short + long, causal=both, modes=modes, variants=CORE),
        dict(dtypes=["bfloat16"], head_dims=[128], lengths=long, causal=both, modes=modes, variants=["flex"]),
        dict(dtypes=["float16"], head_dims=[128, 64], lengths=short + long, causal=both, modes=modes,
             variants=CORE),
        dict(dtypes=["bfloat16"], head_dims=[64], lengths=short, causal=both, modes=modes, variants=["sdpa_math"]),
    ]


def autotune_keys(dry: bool) -> list[tuple[str, int, int, bool]]:
    """(dtype, D, L, causal) tuned up front, in the sweep's order of importance."""
    if dry:
        return [("bfloat16", 16, 32, False)]
    return [("bfloat16", 128, L, c) for L in (4096, 8192, 16384, 1024, 2048) for c in (False, True)]


def sizes(L: int, D: int, dry: bool) -> tuple[int, int]:
    """(B, H) of a sweep cell: FlashAttention's benchmark (16k tokens, 2048 channels), or tiny."""
    return (1, 2) if dry else (max(1, 16384 // L), 2048 // D)


def n_cells(groups: list[dict]) -> int:
    return sum(len(g["variants"]) * len(g["dtypes"]) * len(g["head_dims"]) * len(g["lengths"])
               * len(g["causal"]) * len(g["modes"]) for g in groups)


# --------------------------------------------------------------------------------------
# Steps (each runs in its own process: python scripts/gpu_run.py --_step NAME ...)
# --------------------------------------------------------------------------------------


def _sh(cmd: list[str], timeout: float = 30) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not available: {type(exc).__name__}: {exc}"


SMI_QUERY = ("name,driver_version,pci.bus_id,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
             "power.draw,power.limit,temperature.gpu,persistence_mode,mig.mode.current")


def step_provenance(out: pathlib.Path, dry: bool, until: float) -> None:
    import platform

    import torch

    from attention_lib import bench

    dev = torch.device("cpu" if dry else "cuda")
    p = {"dry_run": dry, "host": platform.node(), "python": platform.python_version(),
         "platform": platform.platform(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
         "cudnn": str(torch.backends.cudnn.version()), "cpu_count": os.cpu_count(),
         "env": {k: os.environ.get(k, "") for k in ("TRITON_CACHE_AUTOTUNING", "TRITON_INTERPRET",
                                                     "CUDA_VISIBLE_DEVICES")}}
    try:
        import triton

        p["triton"] = triton.__version__
    except ImportError:
        p["triton"] = "not installed"
    p["nvidia_smi_before"] = _sh(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"])
    p["nvidia_smi_q"] = _sh(["nvidia-smi", "-q"])
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        p["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
                       "l2_bytes": getattr(props, "L2_cache_size", None)}
    n = 256 if dry else 8192
    for dtype in (torch.bfloat16, torch.float16):
        pk = bench.measure_matmul_peak(dev, n=n, dtype=dtype)
        p[f"matmul_peak_{pk['dtype']}"] = pk
    nbytes = (16 << 20) if dry else (2 << 30)
    x = torch.randn(nbytes // 4, device=dev)
    y = torch.empty_like(x)
    t = bench.time_call(lambda: y.copy_(x), dev, min_run_time=0.1)
    p["copy"] = {"bytes_moved": 2 * nbytes, "median_s": t["median_s"], "tb_per_s": 2 * nbytes / t["median_s"] / 1e12,
                 "note": "device-to-device copy, bytes read plus bytes written"}
    p["nvidia_smi_after"] = _sh(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"])
    (out / "provenance.json").write_text(json.dumps(p, indent=1, default=str))
    print(f"device: {p.get('device', {}).get('name', 'cpu')}; torch {p['torch']}, triton {p['triton']}, "
          f"CUDA {p['cuda']}")
    for dt in ("bfloat16", "float16"):
        print(f"matmul peak {dt}: {p[f'matmul_peak_{dt}']['tflops']:.4g} TFLOP/s ({n}^3, measured now)")
    print(f"copy: {p['copy']['tb_per_s']:.3g} TB/s")


def _pin_configs(tf, idx: dict[str, int]) -> dict:
    saved = {}
    for kind, i in idx.items():
        tuner = getattr(tf, KINDS[kind])
        saved[kind] = tuner.configs
        configs = tf.gpu_configs(kind)
        tuner.configs = [configs[i % len(configs)]]
    return saved


def _prewarm_one(task: tuple) -> tuple:
    """Compile one configuration of each kernel at one (dtype, D, causal): fills Triton's disk cache."""
    dtype_name, D, causal, i, dry = task
    import torch

    from attention_lib import triton_flash_attention
    from attention_lib import triton_flash as tf

    t0 = time.perf_counter()
    saved = _pin_configs(tf, {"fwd": i, "dkdv": i, "dq": i})
    try:
        dev = "cpu" if dry else "cuda"
        L = 32 if dry else 256  # divisible by 16, as the sweep's lengths: the same specialisation
        H = sizes(L, D, dry)[1]  # the sweep's head count (B is not a kernel argument)
        q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=getattr(torch, dtype_name), requires_grad=True)
                   for _ in range(3))
        out = triton_flash_attention(q, k, v, is_causal=causal)
        out.backward(torch.randn_like(out))
        if dev == "cuda":
            torch.cuda.synchronize()
        return task, time.perf_counter() - t0, ""
    except Exception as exc:  # a config that fails to compile is autotuning's business; report it
        return task, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        for kind, configs in saved.items():
            getattr(tf, KINDS[kind]).configs = configs


def step_prewarm(out: pathlib.Path, dry: bool, until: float) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    combos = list(dict.fromkeys((dt, D, c) for g in plan(dry) if "triton" in g["variants"]
                                for dt in g["dtypes"] for D in g["head_dims"] for c in g["causal"]))
    n_fwd = 1 if dry else 24  # len(gpu_configs("fwd")): the backward kernels' configs cycle under it
    tasks = [(dt, D, c, i, dry) for dt, D, c in combos for i in range(n_fwd)]
    workers = 1 if dry else max(1, min(6, (os.cpu_count() or 2) // 2 - 2))
    print(f"prewarm: {len(tasks)} compilations ({len(combos)} dtype/D/causal combinations), {workers} processes")
    done, errors = 0, []
    ex = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    futures = [ex.submit(_prewarm_one, t) for t in tasks]
    try:
        for f in cf.as_completed(futures, timeout=max(1.0, until - time.time())):
            task, dt, err = f.result()
            done += 1
            if err:
                errors.append((task, err))
    except cf.TimeoutError:
        print("prewarm: deadline reached; the rest compiles during autotuning")
    print(f"prewarm: {done}/{len(tasks)} done, {len(errors)} raised")
    for task, err in errors[:10]:
        print(f"  {task}: {err}")
    sys.stdout.flush()
    os._exit(0)  # do not wait for compilations still running in the workers


def _set_autotune_bench(tf, warmup_ms: int, rep_ms: int) -> str:
    """Make the autotuner's per-config benchmark shorter (its default: 25 ms warm-up, 100 ms)."""
    import triton.testing

    def bench_fn(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=warmup_ms, rep=rep_ms, quantiles=quantiles)

    for name in KINDS.values():
        tuner = getattr(tf, name)
        if not hasattr(type(tuner), "do_bench"):  # the class, so that the cached property is not evaluated
            return "triton's default (this Autotuner has no do_bench to replace)"
        tuner.__dict__["do_bench"] = bench_fn  # an instance attribute wins over the (cached) property
    return f"triton.testing.do_bench(warmup={warmup_ms} ms, rep={rep_ms} ms) per configuration"


def _tuner_state(tuner) -> dict:
    best = getattr(tuner, "best_config", None)
    timings = getattr(tuner, "configs_timings", None) or {}
    return {"best": str(best), "timings_ms": {str(c): (t[0] if isinstance(t, (list, tuple)) else t)
                                             for c, t in timings.items()}}


def step_sweep(out: pathlib.Path, dry: bool, until: float) -> None:
    import torch

    from attention_lib import bench, triton_flash_attention
    from attention_lib import triton_flash as tf

    dev = torch.device("cpu" if dry else "cuda")
    t_start = time.time()
    tuning = "interpreter: one fixed configuration" if dry else _set_autotune_bench(tf, 10, 40)
    peak = bench.measure_matmul_peak(dev, n=256 if dry else None,
                                     dtype=torch.bfloat16 if dry else None)
    print(f"matmul peak {peak['dtype']} {peak['n']}^3: {peak['tflops']:.4g} TFLOP/s")

    # 1. autotuning at the priority shapes, recorded
    record = {"tuning_benchmark": tuning, "interpreted": tf.INTERPRET, "keys": []}
    tune_until = min(until - 30, t_start + (5 if dry else 70))
    for dtype_name, D, L, causal in autotune_keys(dry):
        if time.time() > tune_until:
            record["cut"] = f"deadline reached before {dtype_name} D={D} L={L} causal={causal}"
            break
        B, H = sizes(L, D, dry)
        q, k, v, do = bench.make_inputs(B, H, L, L, D, dtype=getattr(torch, dtype_name), device=dev, n_sets=1)[0]
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        o = triton_flash_attention(q, k, v, is_causal=causal)
        fwd = _tuner_state(tf._attn_fwd)
        torch.autograd.grad(o, (q, k, v), do)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        entry = {"dtype": dtype_name, "D": D, "L": L, "B": B, "H": H, "causal": causal,
                 "seconds": round(time.perf_counter() - t0, 3), "fwd": fwd,
                 "dkdv": _tuner_state(tf._attn_bwd_dkdv), "dq": _tuner_state(tf._attn_bwd_dq)}
        record["keys"].append(entry)
        print(f"autotuned {dtype_name} D={D} L={L} causal={causal} in {entry['seconds']:.1f} s: fwd {fwd['best']}")
        del q, k, v, do, o

    # 2. the sweep, in order of importance, until the deadline
    groups = plan(dry)
    deadline_mono = time.monotonic() + (until - time.time()) - (2 if dry else 12)
    rows: list[dict] = []
    csv_path = out / "h200.csv"
    reached = 0

    def provenance_once():
        return bench.provenance(
            dev, command="bash scripts/gpu_run.sh" + (" --dry-run" if dry else ""),
            dtype=" ".join(dict.fromkeys(dt for g in groups for dt in g["dtypes"])),
            matmul_peak_tflops=f"{peak['tflops']:.4g} ({peak['dtype']} {peak['n']}x{peak['n']} matmul, "
                               "measured in this run)",
            sweep="; ".join(f"{'+'.join(g['variants'])} {'/'.join(g['dtypes'])} D={g['head_dims']} "
                            f"L={g['lengths']}" for g in groups) + "; causal and not; fwd and fwd_bwd; "
                  + ("B=1 H=2" if dry else "B=16384//L H=2048//D"),
            cells=f"{len(rows)} of {n_cells(groups)} planned cells run before the deadline "
                  f"({reached} of {len(groups)} groups started)",
            autotune=f"{tuning}; results cached on disk (TRITON_CACHE_AUTOTUNING=1)",
            flops="FlashAttention's formula: 4*B*H*Lq*Lk*D forward, /2 causal, x2.5 backward (x3.5 fwd_bwd)",
            memory="torch.cuda.max_memory_allocated on CUDA" if dev.type == "cuda" else "CPU storage tracker",
            dry_run=dry,
        )

    base = provenance_once()  # once: it asks nvidia-smi for the driver

    def provenance():
        return dict(base, cells=f"{len(rows)} of {n_cells(groups)} planned cells run before the deadline "
                                f"({reached} of {len(groups)} groups started)")

    for g in groups:
        if time.monotonic() > deadline_mono:
            break
        reached += 1
        kw = dict(g, dtypes=[getattr(torch, d) for d in g["dtypes"]])
        if dry:
            kw.update(batch=1, heads=2, min_run_time=0.01)
        else:
            kw.update(batch=lambda L: max(1, 16384 // L), heads=lambda D: 2048 // D, min_run_time=0.05)
        done = list(rows)
        def write(rs):
            nonlocal rows
            rows = done + rs
            bench.write_results(csv_path, rows, provenance())

        got = bench.run_sweep(dev, peak_tflops=peak["tflops"], progress=False, deadline=deadline_mono,
                              flex_compile=False if dry else None, on_row=write, **kw)
        rows = done + got
        print(f"group {reached}: {len(got)} cells ({', '.join(g['variants'])}; {g['dtypes']} D={g['head_dims']})")
    bench._add_ratios(rows)
    bench.write_results(csv_path, rows, provenance())
    status: dict = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    print(f"sweep: {len(rows)} of {n_cells(groups)} planned cells, statuses {status}")
    for r in rows:
        if r["status"] == "error":
            print(f"  error: {r['variant']} {r['dtype']} D={r['D']} L={r['Lq']} {r['mode']}: {r['reason']}")
    record["cache"] = {kind: {str(key): str(cfg) for key, cfg in getattr(tf, name).cache.items()}
                       for kind, name in KINDS.items()}
    (out / "autotune.json").write_text(json.dumps(record, indent=1))


NCU_METRICS = "dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum"
HBM_SHAPE = dict(B=2, H=16, L=8192, D=128)


def find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        for p in sorted(pathlib.Path("/").glob(pattern.lstrip("/"))):
            return str(p)
    return None


def step_hbm_target(out: pathlib.Path, dry: bool, until: float) -> None:
    """Run under ncu: warm up (autotune from the disk cache), then profile one call of each."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention_lib import triton_flash_attention

    s = HBM_SHAPE
    dev = "cpu" if dry else "cuda"
    q, k, v = (torch.randn(s["B"], s["H"], s["L"] // (64 if dry else 1), s["D"], device=dev, dtype=torch.bfloat16)
               for _ in range(3))
    calls = {"sdpa_flash": lambda: _with(sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
                                         lambda: F.scaled_dot_product_attention(q, k, v))}
    if not dry:
        calls["triton"] = lambda: triton_flash_attention(q, k, v)
    for fn in calls.values():
        fn()
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for fn in calls.values():
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled:", list(calls))


def _with(ctx, fn):
    with ctx:
        return fn()


_UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
          "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6, "ms": 1e-3}


def parse_ncu_csv(text: str) -> list[dict]:
    """Kernels and their metrics from ``ncu --csv`` output: [{"kernel", "dram_bytes", "seconds"}...]."""
    import csv
    import io

    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        if "Metric Name" not in r:
            continue
        kid = r.get("ID", "") + ":" + r.get("Kernel Name", "")
        k = kernels.setdefault(kid, {"kernel": r.get("Kernel Name", ""), "read_bytes": 0.0, "write_bytes": 0.0,
                                     "seconds": 0.0})
        value = float(r["Metric Value"].replace(",", "")) * _UNITS.get(r.get("Metric Unit", "").strip().lower(), 1.0)
        name = r["Metric Name"]
        if name.startswith("dram__bytes_read"):
            k["read_bytes"] += value
        elif name.startswith("dram__bytes_write"):
            k["write_bytes"] += value
        elif name.startswith("gpu__time_duration"):
            k["seconds"] += value
    return list(kernels.values())


def step_hbm(out: pathlib.Path, dry: bool, until: float) -> None:
    from attention_lib import bench

    s = HBM_SHAPE
    compulsory = bench.attention_bytes(s["B"], s["H"], s["L"], s["L"], s["D"], scores_in_memory=False)
    result = {"shape": dict(s, dtype="bfloat16", causal=False), "compulsory_bytes": compulsory, "kernels": []}
    ncu = None if dry else find_ncu()
    target = [sys.executable, str(pathlib.Path(__file__)), "--_step", "hbm_target", "--out", str(out),
              "--until", str(until)] + (["--dry-run"] if dry else [])
    if ncu is None:
        result["status"] = "skipped: " + ("dry run (the target runs unprofiled)" if dry else "ncu not found")
        subprocess.run(target, timeout=max(5, until - time.time()))
    else:
        log = pathlib.Path(tempfile.gettempdir()) / "gpu_run_ncu.csv"
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics", NCU_METRICS,
               "--csv", "--print-units", "base", "--log-file", str(log), "--target-processes", "all"] + target
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, until - time.time()))
            rc, tail = r.returncode, r.stdout[-2000:] + r.stderr[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", "ncu ran past the step's deadline"
        print(tail)
        text = log.read_text() if log.exists() else ""
        result["kernels"] = parse_ncu_csv(text)
        for k in result["kernels"]:
            k["dram_bytes"] = k["read_bytes"] + k["write_bytes"]
            k["over_compulsory"] = k["dram_bytes"] / compulsory
        result["status"] = "ok" if result["kernels"] else f"no kernels parsed (ncu rc={rc})"
        result["ncu"] = {"path": ncu, "metrics": NCU_METRICS, "rc": rc, "raw": text[-20000:]}
    (out / "hbm.json").write_text(json.dumps(result, indent=1))
    print(f"hbm: {result['status']}; compulsory {compulsory / 1e6:.1f} MB")
    for k in result["kernels"]:
        print(f"  {k['kernel'][:60]}: {k['dram_bytes'] / 1e6:.1f} MB = {k['over_compulsory']:.2f} x compulsory, "
              f"{k['seconds'] * 1e3:.3f} ms")


def step_notebook(out: pathlib.Path, dry: bool, until: float, name: str) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    if dry:  # the first code cells only: the runner, the kernel and the save, not the chapter's run time
        keep, n_code = [], 0
        for c in nb.cells:
            if c.cell_type == "code":
                if n_code == 3:
                    break
                n_code += 1
            keep.append(c)
        nb.cells = keep
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            timeout_func=lambda cell: max(5, int(until - time.time())), record_timing=True)
    t0 = time.time()
    try:
        client.execute()
        status = "ok"
    except CellTimeoutError:
        status = "timeout: stopped at the deadline (the cells before it ran)"
    except (CellExecutionError, DeadKernelError) as exc:
        status = f"error: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__}"
    ran = sum(1 for c in nb.cells if c.cell_type == "code" and c.get("execution_count"))
    total = sum(1 for c in nb.cells if c.cell_type == "code")
    nb.metadata["gpu_run"] = {"status": status, "seconds": round(time.time() - t0, 1), "code_cells_run": ran,
                              "code_cells": total, "dry_run": dry}
    nbformat.write(nb, out / name)
    print(f"{name}: {status}; {ran}/{total} code cells in {time.time() - t0:.1f} s")
    if not status.startswith("ok"):
        sys.exit(1)


def step_summary(out: pathlib.Path, dry: bool, until: float, state: dict) -> None:
    lines = [f"# GPU run {'(dry run, CPU) ' if dry else ''}summary", ""]
    prov = _load_json(out / "provenance.json")
    if prov:
        dev = prov.get("device", {}).get("name", "cpu")
        lines.append(f"device {dev}; torch {prov.get('torch')}, triton {prov.get('triton')}, CUDA {prov.get('cuda')}; "
                     f"python {prov.get('python')}")
        for dt in ("bfloat16", "float16"):
            pk = prov.get(f"matmul_peak_{dt}")
            if pk:
                lines.append(f"matmul peak {dt} {pk['n']}^3: {pk['tflops']:.4g} TFLOP/s; "
                             f"copy {prov.get('copy', {}).get('tb_per_s', float('nan')):.3g} TB/s")
    lines += ["", "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in state.get("steps", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s.get('detail', '')} |")
    lines.append(f"\ntotal {state.get('total_s', 0):.0f} s of a {state.get('budget_s', 0):.0f} s budget")

    csv_path = out / "h200.csv"
    if csv_path.exists():
        from attention_lib import bench

        rows, p = bench.load_results(csv_path)
        lines += ["", f"sweep: {p.get('cells', '?')}; matmul peak {p.get('matmul_peak_tflops', '?')}"]
        t = {(r["variant"], r["mode"], r["dtype"], r["D"], r["causal"], r["Lq"]): r for r in rows
             if r["status"] == "ok"}
        dtype = "bfloat16"
        Ls = [4096, 8192, 16384] if not dry else [32, 64]
        D = 128 if not dry else 16
        lines += ["", f"triton vs sdpa_flash ({dtype}, D={D}): sdpa_flash time / triton time, "
                  "target fwd >= 1.0 (floor 0.9), fwd_bwd >= 0.8", "",
                  "| mode | causal | L | triton TFLOP/s | frac of peak | vs sdpa_flash | vs sdpa_cudnn | target |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mode in ("fwd", "fwd_bwd"):
            for causal in (False, True):
                for L in Ls:
                    tr = t.get(("triton", mode, dtype, D, causal, L))
                    fl = t.get(("sdpa_flash", mode, dtype, D, causal, L))
                    cu = t.get(("sdpa_cudnn", mode, dtype, D, causal, L))
                    if tr is None:
                        lines.append(f"| {mode} | {causal} | {L} | not measured | | | | |")
                        continue
                    r_fl = fl["time_ms"] / tr["time_ms"] if fl else None
                    r_cu = cu["time_ms"] / tr["time_ms"] if cu else None
                    goal = 1.0 if mode == "fwd" else 0.8
                    verdict = "-" if r_fl is None else ("met" if r_fl >= goal else
                                                        "floor met" if mode == "fwd" and r_fl >= 0.9 else "missed")
                    lines.append(f"| {mode} | {causal} | {L} | {tr['tflops']:.1f} | {tr.get('frac_peak') or 0:.2f} | "
                                 f"{_f(r_fl)} | {_f(r_cu)} | {verdict} |")
        bad = [r for r in rows if r["status"] in ("error", "OOM")]
        if bad:
            lines += ["", "cells that failed:"] + [f"- {r['variant']} {r['mode']} {r['dtype']} D={r['D']} "
                                                   f"L={r['Lq']} causal={r['causal']}: {r['status']} {r['reason']}"
                                                   for r in bad[:20]]
    tune = _load_json(out / "autotune.json")
    if tune:
        lines += ["", f"autotuning ({tune.get('tuning_benchmark')}):"]
        lines += [f"- {k['dtype']} D={k['D']} L={k['L']} causal={k['causal']}: {k['seconds']} s; fwd {k['fwd']['best']}; "
                  f"dkdv {k['dkdv']['best']}; dq {k['dq']['best']}" for k in tune.get("keys", [])]
        lines.append("- configurations chosen in all: " + ", ".join(f"{kind} {len(v)}" for kind, v in
                                                                      tune.get("cache", {}).items()))
    hbm = _load_json(out / "hbm.json")
    if hbm:
        lines += ["", f"HBM traffic ({hbm.get('status')}), compulsory {hbm['compulsory_bytes'] / 1e6:.1f} MB:"]
        lines += [f"- {k['kernel'][:70]}: {k['dram_bytes'] / 1e6:.1f} MB ({k['over_compulsory']:.2f} x)"
                  for k in hbm.get("kernels", [])]
    for name in ("18_gpu_timing.ipynb", "09_triton_kernel.ipynb"):
        nbp = out / name
        if nbp.exists():
            meta = json.loads(nbp.read_text()).get("metadata", {}).get("gpu_run", {})
            lines.append(f"\n{name}: {meta.get('status')}; {meta.get('code_cells_run')}/{meta.get('code_cells')} "
                         f"code cells in {meta.get('seconds')} s")
    missing = [f for f in FILES if not (out / f).exists() and f not in ("summary.md", "run.log")]
    lines.append("\nnot produced: " + (", ".join(missing) if missing else "nothing"))
    if csv_path.exists() and not dry:
        lines.append("to publish the sweep (chapter 18 plots it): cp h200.csv attention_lib/data/h200.csv")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


def _f(x):
    return "-" if x is None else f"{x:.2f}"


def _load_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------


def _step_cmd(name: str, out: pathlib.Path, dry: bool, until: float, state_path: str | None = None) -> list[str]:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_step", name, "--out", str(out),
           "--until", f"{until:.3f}"]
    if dry:
        cmd.append("--dry-run")
    if state_path:
        cmd += ["--state", state_path]
    return cmd


def _tests_cmd(dry: bool) -> list[str]:
    import importlib.util

    # -v: one line per test as it ends, so that a run cut at its deadline still says what passed
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_triton_cuda.py", "-v", "-p", "no:cacheprovider",
           "-rfE", "--tb=line"]
    if not dry and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "6"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "30" if dry else "90"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=None, help="output folder (default: $OUT, else _build/gpu)")
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    ap.add_argument("--budget-s", type=float, default=None, help=f"seconds in all (default {BUDGET_S:.0f}; dry 240)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    ap.add_argument("--_step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", dest="out_opt", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = pathlib.Path(a.out_opt or a.out or os.environ.get("OUT") or ROOT / "_build" / "gpu").resolve()
    out.mkdir(parents=True, exist_ok=True)

    if a._step:  # one step, in this process
        os.chdir(ROOT)
        fn = {"provenance": step_provenance, "prewarm": step_prewarm, "sweep": step_sweep, "hbm": step_hbm,
              "hbm_target": step_hbm_target}.get(a._step)
        if fn is not None:
            fn(out, a.dry_run, a.until)
        elif a._step in ("chapter9", "chapter18"):
            step_notebook(out, a.dry_run, a.until, {"chapter9": "09_triton_kernel.ipynb",
                                                    "chapter18": "18_gpu_timing.ipynb"}[a._step])
        elif a._step == "summary":
            step_summary(out, a.dry_run, a.until, json.loads(pathlib.Path(a.state).read_text()))
        else:
            ap.error(f"unknown step {a._step}")
        return 0

    wanted = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = set(wanted) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    budget = a.budget_s or (240.0 if a.dry_run else BUDGET_S)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TRITON_CACHE_AUTOTUNING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if a.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    log = open(out / "run.log", "a")
    state = {"budget_s": budget, "dry_run": a.dry_run, "steps": []}
    state_path = os.path.join(tempfile.mkdtemp(prefix="gpu_run_"), "state.json")

    def say(msg):
        line = f"[{time.time() - t0:6.1f} s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(f"gpu_run {'--dry-run ' if a.dry_run else ''}into {out}; budget {budget:.0f} s; steps {wanted}")
    for group, frac in SCHEDULE:
        until = t0 + frac * budget
        names = [n for n in group if n in wanted]
        if not names:
            continue
        procs = {}
        for name in names:
            if name == "summary":
                pathlib.Path(state_path).write_text(json.dumps(dict(state, total_s=time.time() - t0)))
            cmd = _tests_cmd(a.dry_run) if name == "tests" else _step_cmd(name, out, a.dry_run, until, state_path)
            say(f"start {name} (deadline +{until - t0:.0f} s): {' '.join(cmd[1:4])} ...")
            f = tempfile.TemporaryFile(mode="w+")
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True), f, time.time())
        for name, (p, f, started) in procs.items():
            grace = 20 if name in ("sweep", "chapter9", "chapter18", "hbm") else 5
            try:
                rc = p.wait(timeout=max(1.0, until + grace - time.time()))
                status = "ok" if rc == 0 else "failed" if name in ("tests", "chapter9", "chapter18") else "error"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            try:  # the step's own process group (it started a session): its workers and kernels too
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
            f.seek(0)
            text = f.read()
            f.close()
            log.write(f"\n===== {name} (rc={rc}) =====\n{text}\n")
            log.flush()
            detail = ""
            if name == "tests":
                m = re.findall(r"=+ (.*(?:passed|failed|skipped|error|no tests ran).*) =+", text)
                detail = m[-1] if m else text.strip().splitlines()[-1][:120] if text.strip() else ""
            elif text.strip():
                detail = text.strip().splitlines()[-1][:160].replace("|", "/")
            state["steps"].append({"name": name, "rc": rc, "status": status, "seconds": time.time() - started,
                                   "detail": detail})
            say(f"end {name}: {status} (rc={rc}) in {time.time() - started:.1f} s; {detail}")
            if name == "summary":
                print(text)
            elif status != "ok":
                print("\n".join(text.strip().splitlines()[-15:]))
    say(f"done in {time.time() - t0:.1f} s; files: {sorted(p.name for p in out.iterdir())}")
    log.close()
    return 1 if any(s["status"] in ("error",) for s in state["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
