"""Grade submissions: each notebook in its own sandboxed kernel, every verdict in this process.

For one submission (:func:`grade_submission`):

1. The notebook is read here as JSON (nbformat); nothing in it runs here.
2. A kernel starts in a fresh sandbox (:mod:`.sandbox`, :mod:`.kernel`) and runs the
   student's code cells in order, each under ``timeout``. Cells that only call
   ``check("qN")`` are skipped (the grader runs those checks itself). A cell that hangs
   or kills the kernel is skipped when the kernel is started again.
3. The grader defines one small function in the kernel (:mod:`._kernel_side`), then runs
   every public check and hidden test **in its own process**, with ``ns`` a
   :class:`~.remote.RemoteNamespace`: the student's functions are called in the kernel
   on plain data and their plain-data answers are compared here with the float64 oracle.
4. A call that times out costs its test, and the other tests of that question are
   skipped; a kernel that dies is started again for the next question.
5. The sandbox is killed at the end (its PID namespace goes with it).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from attention_lib.grading.testing import CheckFailure

from . import sandbox
from .autograder import Autograder, Test
from .kernel import Kernel, KernelStartError
from .remote import SERVE_SOURCE, Channel, KernelLost, KernelTimeout, NoAnswer, RemoteNamespace

__all__ = ["Options", "grade_submission", "grade_all", "results_json", "result_names", "read_submission"]

MAX_NOTEBOOK = 20 << 20  # bytes: a larger file is not read
MAX_STARTS = 4  # kernel starts per submission
STARTUP_S = 120.0  # starting a kernel and importing torch, on a loaded machine
CHECK_CELL = re.compile(r"""^\s*(check\(\s*["']\w+["']\s*\)\s*;?\s*)+$""")


@dataclass
class Options:
    timeout: float = 30.0
    submission_timeout: float | None = None
    memory_gib: float = 2.0
    sandbox: bool = True
    bwrap: str | None = None
    hidden: list[pathlib.Path] = field(default_factory=list)  # folders the kernel must not see
    tmp_root: pathlib.Path | None = None


@dataclass
class Outcome:
    test: Test
    passed: bool = False
    message: str = "not run"
    seconds: float = 0.0


@dataclass
class Run:
    path: str
    outcomes: list[Outcome]
    notes: list[str] = field(default_factory=list)
    problem: str | None = None  # "unreadable" | "kernel" | "internal": the exit code is 1
    kernel_pids: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    slowest_call: float = 0.0


def _timeout_message(t: float) -> str:
    return (f"timed out after {t:g} s and was stopped: your code did not finish. Look for an infinite "
            "loop (a `while` whose condition never changes) or work that grows too fast.")


# ---------------------------------------------------------------------------
# Reading a submission
# ---------------------------------------------------------------------------
def read_submission(path):
    """(notebook, None), or (None, a message a student understands)."""
    import nbformat

    try:
        p = pathlib.Path(path)
        if p.stat().st_size > MAX_NOTEBOOK:
            return None, f"The file is over {MAX_NOTEBOOK >> 20} MiB, too large to be a notebook of this course."
        raw = p.read_bytes()
    except OSError as exc:
        return None, f"The submission could not be read: {exc.strerror or exc}."
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "Your file is not a notebook: it is not UTF-8 text. Submit the .ipynb file that Jupyter saves."
    except json.JSONDecodeError as exc:
        return None, (f"Your notebook is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}), so it "
                      "could not be opened. It was probably edited in a text editor or cut short while saving: "
                      "open it in Jupyter, save it again, and resubmit.")
    except RecursionError:
        return None, "Your file is not a notebook (it is nested too deeply)."
    try:
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise ValueError("no cells")
        nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
        for cell in nb.cells:
            if not isinstance(cell.get("source", ""), str) or not isinstance(cell.get("cell_type", ""), str):
                raise ValueError("bad cell")
    except Exception:
        return None, "Your file is valid JSON but not a Jupyter notebook (no list of cells). Submit the .ipynb file."
    return nb, None


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()[:60]
    return ""


def _is_check_cell(source: str) -> bool:
    """``check("q1")`` cells (the grader runs the checks itself) and a master's hidden-test cells."""
    if source.lstrip().startswith("# HIDDEN TESTS"):
        return True
    code = "\n".join(l for l in source.splitlines() if l.strip() and not l.strip().startswith("#"))
    return bool(code) and bool(CHECK_CELL.match(code))


# ---------------------------------------------------------------------------
# One submission's kernel, started again when it dies
# ---------------------------------------------------------------------------
class _Runner:
    def __init__(self, cells: list[str], opts: Options, io_root: pathlib.Path, run: Run, deadline: float):
        self.cells, self.opts, self.io_root, self.run, self.deadline = cells, opts, io_root, run, deadline
        self.kernel: Kernel | None = None
        self.chan: Channel | None = None
        self.ns: RemoteNamespace | None = None
        self.skip: set[int] = set()
        self.reported: set[int] = set()
        self.starts = 0

    def channel(self) -> Channel:
        if self.chan is None or self.kernel is None or self.kernel.dead:
            raise KernelLost("dead")
        return self.chan

    def namespace(self) -> RemoteNamespace:
        while self.kernel is None or self.kernel.dead:
            self._start()
        return self.ns

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _start(self) -> None:
        self.close()
        if self.starts >= MAX_STARTS:
            raise KernelLost("the kernel kept crashing or hanging")
        if self._left() <= 0:
            raise TimeoutError("deadline")
        self.starts += 1
        io = pathlib.Path(tempfile.mkdtemp(prefix="k", dir=self.io_root))
        self.kernel = Kernel(io, sandboxed=self.opts.sandbox, bwrap=self.opts.bwrap, hidden=self.opts.hidden,
                             limits=sandbox.Limits(memory_gib=self.opts.memory_gib),
                             startup_timeout=min(STARTUP_S, max(5.0, self._left())))
        self.run.kernel_pids.append(self.kernel.proc.pid)
        inner_io = sandbox.IO_DIR if self.opts.sandbox else str(io)
        self.chan = Channel(self.kernel, io, inner_io, self.opts.timeout)
        self.ns = RemoteNamespace(self.channel, cells=self.cells)
        status, info = self.kernel.execute("import torch", min(STARTUP_S, max(5.0, self._left())))
        if status != "ok":
            raise KernelStartError(f"the kernel could not import torch ({status} {info.get('ename', '')}: {info.get('evalue', '')})")
        t = self.opts.timeout
        for i, src in enumerate(self.cells):
            if i in self.skip:
                continue
            if self._left() <= 0:
                raise TimeoutError("deadline")
            status, info = self.kernel.execute(src, min(t, max(0.5, self._left())))
            where = f"Code cell {i + 1} (`{_first_line(src)}`)"
            if status in ("timeout", "killed", "dead"):
                self.skip.add(i)
                why = self.kernel.limit_message()
                if why:
                    self.run.notes.append(f"{where} was stopped: {why}. It was skipped when grading.")
                elif status == "dead":
                    self.run.notes.append(f"{where} crashed the kernel; it was skipped when grading.")
                else:
                    self.run.notes.append(f"{where} {_timeout_message(t)} It was skipped when grading.")
                if status != "timeout":
                    return self._start()
            elif status == "error" and i not in self.reported:
                self.reported.add(i)
                self.run.notes.append(f"{where} raised {info.get('ename')}: {info.get('evalue', '').strip()[:200]}")
        status, info = self.kernel.execute(SERVE_SOURCE, min(t, max(0.5, self._left())))
        if status in ("killed", "dead"):  # the student's hooks broke the kernel on our cell
            return self._start()

    def close(self) -> None:
        if self.chan is not None:
            self.run.slowest_call = max(self.run.slowest_call, self.chan.slowest)
        if self.kernel is not None:
            self.kernel.kill()
            shutil.rmtree(self.kernel.io_dir, ignore_errors=True)
        self.kernel, self.chan = None, None


def _dependency_hint(ag: Autograder, q, ns: RemoteNamespace, failed: dict[str, bool]) -> str:
    """'multi_head_attention calls your gqa_attention, which fails q2' (from the student's code)."""
    hints = []
    for fname in q.functions:
        try:
            used = set(ns.uses(fname))
        except BaseException:
            return ""
        for other in ag.questions:
            if other is q or not failed.get(other.name):
                continue
            for g in other.functions:
                if g in used:
                    hints.append(f"`{fname}` calls your `{g}`, which fails tests of {other.name}: fix {other.name} first.")
    return " ".join(dict.fromkeys(hints))


def grade_submission(path, ag: Autograder, opts: Options) -> Run:
    """Grade one notebook. Never raises for anything the student did."""
    start = time.monotonic()
    limit = opts.submission_timeout or max(120.0, 20 * opts.timeout)
    deadline = start + limit
    tests = [t for q in ag.questions for t in q.tests]
    run = Run(str(path), [Outcome(t) for t in tests])
    nb, problem = read_submission(path)
    if problem:
        run.notes.append(problem)
        run.problem = "unreadable"
        for o in run.outcomes:
            o.message = "not graded: the notebook could not be read."
        run.elapsed = time.monotonic() - start
        return run
    cells = [c.source for c in nb.cells if c.get("cell_type") == "code" and c.get("source", "").strip()
             and not _is_check_cell(c.source)]
    io_root = pathlib.Path(tempfile.mkdtemp(prefix="sub-", dir=opts.tmp_root))
    runner = _Runner(cells, opts, io_root, run, deadline)
    poisoned: dict[str, str] = {}
    failed: dict[str, bool] = {}
    try:
        for q in ag.questions:
            for o in (o for o in run.outcomes if o.test.question == q.name):
                if q.name in poisoned:
                    o.message = f"skipped: an earlier test of {q.name} {poisoned[q.name]}."
                    continue
                if time.monotonic() >= deadline:
                    o.message = f"not run: grading this notebook hit the overall limit of {limit:g} s."
                    continue
                t0 = time.monotonic()
                try:
                    ns = runner.namespace()
                    o.test.fn(ns)
                    o.passed, o.message = True, ""
                except CheckFailure as exc:
                    o.message = str(exc)
                except KernelTimeout as exc:
                    o.message = _timeout_message(opts.timeout)
                    poisoned[q.name] = "timed out"
                    if exc.killed:
                        runner.kernel.dead = True
                except KernelLost as exc:
                    why = runner.kernel.limit_message() if runner.kernel is not None else ""
                    if why:
                        o.message = f"the test was stopped: {why}."
                        poisoned[q.name] = "was stopped"
                    elif str(exc) == "dead":
                        o.message = "the kernel crashed while running this test (did your code call exit() or run out of memory?)."
                        poisoned[q.name] = "crashed the kernel"
                    else:
                        o.message = f"not run: {exc}."
                        poisoned[q.name] = "could not run"
                except NoAnswer as exc:
                    o.message = f"{exc}; the test counts as failed."
                except KernelStartError as exc:
                    o.message = "not run: the grader could not start a kernel for your notebook."
                    if run.problem is None:
                        run.notes.append(f"The grader could not start a kernel: {exc}")
                    run.problem = "kernel"
                    poisoned[q.name] = "could not run"
                except TimeoutError:
                    o.message = f"not run: grading this notebook hit the overall limit of {limit:g} s."
                except Exception as exc:  # the test tripped over a strange answer
                    o.message = f"the check could not run: {type(exc).__name__}: {str(exc)[:200]}"
                o.seconds = time.monotonic() - t0
            failed[q.name] = not all(o.passed for o in run.outcomes if o.test.question == q.name)
            if failed[q.name] and runner.ns is not None and runner.kernel is not None and not runner.kernel.dead:
                hint = _dependency_hint(ag, q, runner.ns, failed)
                if hint:
                    for o in run.outcomes:
                        if o.test.question == q.name and not o.passed:
                            o.message += f"\n    Note: {hint}"
        if any(o.message.startswith("not run: grading this notebook hit") for o in run.outcomes):
            run.notes.append(f"Grading stopped at the overall limit of {limit:g} s for one notebook.")
    finally:
        runner.close()
        shutil.rmtree(io_root, ignore_errors=True)
    run.elapsed = time.monotonic() - start
    return run


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
def _r(x: float) -> float:
    return round(x, 4)


def results_json(run: Run, ag: Autograder) -> dict:
    """Gradescope's ``results.json`` for one submission (one entry per test)."""
    tests, questions, total = [], {}, 0.0
    for q in ag.questions:
        outs = [o for o in run.outcomes if o.test.question == q.name]
        weight = sum(o.test.weight for o in outs) or 1.0
        # rounded shares that add up to the question's points exactly (the last takes the remainder)
        shares = [_r(q.points * o.test.weight / weight) for o in outs]
        if shares:
            shares[-1] = _r(q.points - sum(shares[:-1]))
        q_score = 0.0
        for o, max_score in zip(outs, shares):
            score = max_score if o.passed else 0.0
            q_score += score
            tests.append({
                "name": f"{q.name} ({o.test.kind}) {o.test.name}",
                "score": _r(score),
                "max_score": _r(max_score),
                "status": "passed" if o.passed else "failed",
                "output": "" if o.passed else o.message,
                "visibility": "visible" if o.test.kind == "public" else "after_published",
                "extra_data": {"question": q.name, "kind": o.test.kind, "seconds": round(o.seconds, 3)},
            })
        questions[q.name] = {"score": _r(q_score), "max_score": _r(q.points)}
        total += q_score
    return {
        "score": _r(total),
        "execution_time": round(run.elapsed, 1),
        "output": "\n".join(run.notes) if run.notes else "Your notebook ran without errors.",
        "visibility": "after_published",
        "stdout_visibility": "hidden",
        "tests": tests,
        "extra_data": {
            "assignment": ag.assignment,
            "submission": run.path,
            "max_score": _r(ag.max_score),
            "questions": questions,
            "kernel_pids": run.kernel_pids,
            "problem": run.problem,
            "slowest_call_s": round(run.slowest_call, 2),
        },
    }


_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _clean(stem: str) -> str:
    name = _SAFE.sub("_", stem).strip("_-")[:80]
    return name or "submission"


def result_names(paths: list[str]) -> list[str]:
    """A folder name for each submission: only ``[A-Za-z0-9_-]``, never ``.``/``..``, never
    ``summary``, unique. Two ``hw.ipynb`` in different folders become ``alice_hw`` and ``bob_hw``."""
    stems = [_clean(pathlib.Path(p).stem) for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names, seen = [], {"summary"}
    for p, s in zip(paths, stems):
        base = s
        if counts[s] > 1 or s in seen:
            parent = _clean(pathlib.Path(os.path.abspath(p)).parent.name)
            base = f"{parent}_{s}" if parent != "submission" else s
        name, k = base, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summary_csv(rows: list[tuple[str, dict]], ag: Autograder) -> str:
    import io

    qnames = [q.name for q in ag.questions]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["submission", "score", "max_score", *qnames, "seconds", "notes"])
    for name, r in rows:
        qs = r["extra_data"]["questions"]
        first_note = r["output"].splitlines()[0] if r["output"] else ""
        w.writerow([name, r["score"], r["extra_data"]["max_score"], *[qs[q]["score"] for q in qnames],
                    r["execution_time"], first_note])
    return buf.getvalue()


def hidden_paths(ag: Autograder, submissions: list[str], out: pathlib.Path) -> list[pathlib.Path]:
    """What the kernels must not see: the autograder folder and what sits next to it (the
    master), every submission's folder, the output folder, the repository's coursework and
    .git, and the grader's own package."""
    import attention_lib

    paths = [ag.folder, ag.folder.parent, out.resolve(), pathlib.Path(__file__).resolve().parents[1]]
    paths += [pathlib.Path(os.path.abspath(s)).parent for s in submissions]
    repo = pathlib.Path(attention_lib.__file__).resolve().parents[1]
    paths += [repo / "coursework", repo / ".git", repo / "tests", repo / "grader"]
    for p in [ag.folder, *paths[:3]]:
        for parent in [p, *p.parents]:
            if (parent / ".git").exists():
                paths.append(parent / ".git")
                break
    return [p for p in dict.fromkeys(paths) if p != pathlib.Path("/")]


def grade_all(autograder, submissions: list[str], out, *, opts: Options | None = None, jobs: int = 1,
              progress=None) -> list[tuple[str, dict]]:
    """Grade every submission; write ``out/<name>/results.json`` as each one finishes and
    ``out/summary.csv`` (atomically) at the end. Returns [(name, results)] in input order.

    ``progress(done, total, name, result)`` is called as each submission finishes.
    """
    import concurrent.futures as cf

    opts = opts or Options()
    ag = Autograder.load(autograder)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = result_names([str(s) for s in submissions])
    opts.hidden = list(opts.hidden) + hidden_paths(ag, [str(s) for s in submissions], out)
    tmp_root = pathlib.Path(tempfile.mkdtemp(prefix="agrade-"))
    opts.tmp_root = tmp_root
    results: dict[int, dict] = {}

    def one(i: int) -> dict:
        try:
            run = grade_submission(submissions[i], ag, opts)
        except Exception as exc:  # a bug of the grader must not stop the class's grading
            run = Run(str(submissions[i]), [Outcome(t, message="not graded: internal grader error")
                                            for q in ag.questions for t in q.tests],
                      notes=[f"internal grader error ({type(exc).__name__}: {exc}); please tell your instructor."],
                      problem="internal")
        res = results_json(run, ag)
        d = out / names[i]
        d.mkdir(exist_ok=True)
        _write_atomic(d / "results.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        return res

    pool = cf.ThreadPoolExecutor(max(1, jobs), thread_name_prefix="grade")
    try:
        futures = {pool.submit(one, i): i for i in range(len(submissions))}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            i = futures[fut]
            results[i] = fut.result()
            if progress:
                progress(done, len(submissions), names[i], results[i])
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
    rows = [(names[i], results[i]) for i in range(len(submissions))]
    _write_atomic(out / "summary.csv", summary_csv(rows, ag))
    return rows
