"""The results file of the benchmark: one CSV per sweep, with its provenance (chapter 18).

A results file is ``# key: value`` provenance lines (device, driver and CUDA, versions,
dtype, date, the exact command), then a CSV with the columns of :data:`COLUMNS`.
:func:`write_results` writes one, :func:`load_results` reads it back with numbers
typed, :func:`format_table` prints rows.

Recorded sweeps ship with the package, in ``attention_lib/data/`` (package data, so a
student who installed the package has them, inside the repository or not):
:func:`recorded_files` lists them and :func:`load_recorded` reads them all. Add a
recorded sweep by committing its CSV there (``scripts/gpu_run.sh`` writes ``h200.csv``
into its output folder; copy it in under the GPU's name).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from importlib import resources
from typing import Any

import torch

__all__ = [
    "COLUMNS",
    "DATA_PACKAGE",
    "provenance",
    "write_results",
    "load_results",
    "format_table",
    "recorded_files",
    "load_recorded",
]

DATA_PACKAGE = "attention_lib.data"  # where recorded sweeps live: attention_lib/data/*.csv

COLUMNS = [
    "variant", "mode", "status", "reason", "dtype", "B", "H", "Lq", "Lk", "D", "causal", "window",
    "time_ms", "iqr_ms", "n_timed", "flops", "tflops", "frac_peak", "peak_mem_bytes",
    "time_ratio_sdpa", "mem_ratio_naive", "n_input_sets", "timer",
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def provenance(device: str | torch.device = "cpu", **extra: Any) -> dict[str, str]:
    """Where and how results were produced: the CSV's ``#`` header, as a dict."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import attention_lib

    p = {"device_type": device.type}
    if device.type == "cuda":
        p["device"] = torch.cuda.get_device_name(device)
        p["driver"] = _nvidia_driver()
        p["cuda"] = str(torch.version.cuda)
    else:
        p["device"] = _cpu_name()
        p["threads"] = str(torch.get_num_threads())
    p.update({
        "torch": torch.__version__,
        "triton": triton_version,
        "attention_lib": getattr(attention_lib, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    })
    p.update({k: str(v) for k, v in extra.items()})
    return p


def write_results(path: str | os.PathLike, rows: list[dict], prov: dict[str, str]) -> None:
    """Write ``rows`` as CSV, after ``# key: value`` provenance lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        for k, v in prov.items():
            f.write(f"# {k}: {' '.join(str(v).split())}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.6g}"
    return x


_INT = {"B", "H", "Lq", "Lk", "D", "n_timed", "n_input_sets", "peak_mem_bytes", "window"}
_FLOAT = {"time_ms", "iqr_ms", "flops", "tflops", "frac_peak", "time_ratio_sdpa", "mem_ratio_naive"}


def load_results(path) -> tuple[list[dict], dict[str, str]]:
    """Read a CSV written by :func:`write_results`: ``(rows, provenance)``.

    Numbers come back as ``int``/``float``, ``causal`` as ``bool``, and cells that
    were not measured (OOM, unavailable, no baseline) as ``None``.
    """
    prov: dict[str, str] = {}
    lines = []
    # a path, or an importlib.resources traversable (a recorded sweep inside the package)
    with (open(path, newline="") if isinstance(path, (str, os.PathLike)) else path.open(newline="")) as f:
        for line in f:
            if line.startswith("#"):
                k, _, v = line[1:].strip().partition(":")
                prov[k.strip()] = v.strip()
            else:
                lines.append(line)
    rows = []
    for r in csv.DictReader(lines):
        out: dict[str, Any] = {}
        for k, v in r.items():
            if k in _INT:
                out[k] = int(float(v)) if v not in ("", None) else None
            elif k in _FLOAT:
                out[k] = float(v) if v not in ("", None) else None
            elif k == "causal":
                out[k] = v == "True"
            else:
                out[k] = v
        rows.append(out)
    return rows, prov


def format_table(rows: list[dict], columns: Iterable[str] = ("variant", "mode", "Lq", "D", "causal", "status",
                                                              "time_ms", "tflops", "time_ratio_sdpa",
                                                              "peak_mem_bytes", "mem_ratio_naive")) -> str:
    """A plain-text table of ``rows`` (numbers to 3-4 significant digits)."""
    columns = list(columns)

    def cell(r, c):
        x = r.get(c)
        if x is None or x == "":
            return "-"
        if c == "peak_mem_bytes":
            return f"{x / 2**20:.1f}M"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    body = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths)) for b in body]
    return "\n".join(lines)

def recorded_files() -> list:
    """The recorded sweeps that ship with the package (``attention_lib/data/*.csv``), sorted by name.

    ``importlib.resources`` traversables: they work from a wheel, an editable install or
    a source tree alike. :func:`load_results` accepts them (and plain paths).
    """
    root = resources.files(DATA_PACKAGE)
    return sorted((p for p in root.iterdir() if p.name.endswith(".csv")), key=lambda p: p.name)


def load_recorded(files: Iterable | None = None) -> dict[str, tuple[list[dict], dict[str, str]]]:
    """``{file name: (rows, provenance)}`` of every recorded sweep (or of ``files``)."""
    return {p.name: load_results(p) for p in (recorded_files() if files is None else files)}
