"""The autograder: run each submission in its own kernel, score every question, write reports.

Design (why it is safe to point at a folder of untrusted notebooks):

* The grader only *reads* a submission (nbformat parses JSON); every line of student
  code runs in a separate ipykernel process started through nbclient, in a scratch
  directory. The checks run in that kernel too (:mod:`._harness`) and report back one
  JSON line tagged with a fresh random nonce.
* Every cell and every test runs with a timeout (``--timeout``); on timeout nbclient
  interrupts the kernel (``interrupt_on_timeout``), which stops an infinite loop with
  a KeyboardInterrupt. Code that swallows the interrupt is stopped by a watchdog that
  kills the kernel; the grader then starts a fresh kernel, replays the notebook
  (without the offending cell) and goes on with the next test. A crash costs only
  the test that caused it.
* An outer wall-clock limit per submission bounds everything else; tests that did not
  get to run score 0 with a message saying so.
* In ``finally``, the kernel and every process it started are killed (psutil), so no
  kernel outlives its submission.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import nbformat
import psutil
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from .public import PUBLIC

__all__ = ["Autograder", "grade_submission", "grade_all", "write_summary"]

LOG = logging.getLogger("attention_lib.grading.nbclient")
LOG.addHandler(logging.NullHandler())
LOG.propagate = False

GRACE_S = 2.0  # after a timeout + interrupt, how long before the watchdog kills the kernel
MAX_RESTARTS = 3
HARNESS = "__grading__"
STARTUP_S = 120.0  # starting a kernel and importing torch on a loaded machine
PRELOAD = f"import torch\nimport attention_lib.grading._harness as {HARNESS}"


# ---------------------------------------------------------------------------
# The autograder folder written by `assign`
# ---------------------------------------------------------------------------
@dataclass
class Question:
    name: str
    points: float
    n_public: int
    hidden_source: str
    n_hidden: int


@dataclass
class Autograder:
    """``autograder/assignment.json`` plus ``autograder/tests/<question>.py``."""

    assignment: str
    title: str
    questions: list[Question]

    @property
    def max_score(self) -> float:
        return sum(q.points for q in self.questions)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Autograder":
        folder = pathlib.Path(folder)
        meta = json.loads((folder / "assignment.json").read_text())
        if meta["assignment"] not in PUBLIC:
            raise ValueError(f"{folder}: attention_lib has no public checks for {meta['assignment']!r}")
        questions = []
        for q in meta["questions"]:
            src = (folder / "tests" / f"{q['name']}.py").read_text()
            questions.append(
                Question(
                    name=q["name"],
                    points=float(q["points"]),
                    n_public=len(PUBLIC[meta["assignment"]].get(q["name"], [])),
                    hidden_source=src,
                    n_hidden=count_tests(src),
                )
            )
        return cls(meta["assignment"], meta.get("title", meta["assignment"]), questions)


def test_names(source: str) -> list[str]:
    """Readable names of the top-level ``def test_*`` of a hidden-test source (parsed, not run)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = (ast.get_docstring(node) or "").strip()
            names.append(doc.splitlines()[0] if doc else node.name.removeprefix("test_").replace("_", " "))
    return names


def count_tests(source: str) -> int:
    """Number of top-level ``def test_*`` in a hidden-test source."""
    return len(test_names(source))


def public_names(assignment: str, question: str) -> list[str]:
    return [
        ((fn.__doc__ or "").strip().splitlines() or [fn.__name__])[0]
        for fn in PUBLIC.get(assignment, {}).get(question, [])
    ]


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
@dataclass
class TestOutcome:
    question: str
    kind: str  # "public" | "hidden"
    index: int
    passed: bool = False
    message: str = "not run"
    name: str = ""
    seconds: float = 0.0


@dataclass
class Run:
    """Everything one submission's grading produced."""

    path: str
    outcomes: list[TestOutcome]
    notes: list[str] = field(default_factory=list)
    kernel_pids: list[int] = field(default_factory=list)
    elapsed: float = 0.0


def _timeout_message(t: float) -> str:
    return (
        f"timed out after {t:.0f} s and was stopped: your code did not finish. Look for an "
        "infinite loop (a `while` whose condition never changes) or work that grows too fast."
    )


# ---------------------------------------------------------------------------
# One kernel session
# ---------------------------------------------------------------------------
def _kill_tree(pid: int | None) -> None:
    """Kill ``pid`` and all its descendants (whatever the student started)."""
    if not pid:
        return
    try:
        proc = psutil.Process(pid)
        procs = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


class _Session:
    """A kernel running one submission; a context manager that always kills it."""

    def __init__(self, nb, workdir: str, timeout: float, deadline: float, pids: list[int]):
        self.nb = nb
        self.workdir = workdir
        self.timeout = timeout
        self.deadline = deadline
        self.pids = pids
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # several kernels may share the machine
        env.setdefault("MKL_NUM_THREADS", "1")
        env["MPLBACKEND"] = "Agg"
        env["PYTHONHASHSEED"] = "0"
        self.client = NotebookClient(
            nb,
            kernel_name="python3",
            timeout=int(max(1, timeout)),
            interrupt_on_timeout=True,
            allow_errors=True,
            record_timing=False,
            startup_timeout=int(STARTUP_S),
            shutdown_kernel="immediate",
            log=LOG,
            resources={"metadata": {"path": workdir}},
        )
        self._env = env
        self._cm = None
        self.pid = None

    def __enter__(self):
        # The kernel's own stdout/stderr (not the student's prints, which travel over
        # IOPub) would only clutter the progress bar.
        self._cm = self.client.setup_kernel(
            env=self._env, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            self._cm.__enter__()
        except BaseException:
            self._find_pid()
            self._kill()  # a kernel that started but never answered
            raise
        self._find_pid()
        return self

    def _find_pid(self) -> None:
        prov = getattr(self.client.km, "provisioner", None)
        proc = getattr(prov, "process", None)
        self.pid = getattr(proc, "pid", None) or getattr(prov, "pid", None)
        if self.pid and self.pid not in self.pids:
            self.pids.append(int(self.pid))

    def _kill(self):
        _kill_tree(self.pid)

    def __exit__(self, *exc):
        try:
            # The student's subprocesses first, then nbclient's own shutdown of the kernel.
            if self.pid:
                try:
                    for p in psutil.Process(self.pid).children(recursive=True):
                        p.kill()
                except psutil.NoSuchProcess:
                    pass
            self._cm.__exit__(None, None, None)
        except Exception:
            pass
        finally:
            self._kill()  # whatever is left, for certain
        return False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def execute(self, source: str, index: int, timeout: float | None = None) -> tuple[str, list, float]:
        """Run ``source`` with the per-step timeout (or ``timeout``).

        Returns ``(status, outputs, seconds)``; status is "ok", "error", "timeout",
        "dead" (the kernel died or was killed) or "deadline" (no time left).
        """
        budget = min(self.timeout if timeout is None else timeout, self.remaining())
        if budget < 0.5:
            return "deadline", [], 0.0
        self.client.timeout = int(max(1, round(budget)))
        cell = nbformat.v4.new_code_cell(source)
        watchdog = threading.Timer(self.client.timeout + GRACE_S, self._kill)
        watchdog.daemon = True
        start = time.monotonic()
        watchdog.start()
        try:
            self.client.execute_cell(cell, index, store_history=False)
        except DeadKernelError:
            return ("timeout-killed" if time.monotonic() - start >= self.client.timeout else "dead"), [], time.monotonic() - start
        except Exception as exc:  # zmq / kernel trouble: treat as a dead kernel
            LOG.debug("execute failed: %r", exc)
            return "dead", [], time.monotonic() - start
        finally:
            watchdog.cancel()
        elapsed = time.monotonic() - start
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        if errors and (errors[0].get("ename") == "KeyboardInterrupt" or elapsed >= self.client.timeout):
            return "timeout", cell.outputs, elapsed
        return ("error" if errors else "ok"), cell.outputs, elapsed


def _stdout(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _error_line(outputs) -> str:
    for o in outputs:
        if o.get("output_type") == "error":
            value = (o.get("evalue") or "").strip().splitlines()
            return f"{o.get('ename')}: {value[0] if value else ''}".strip()
    return ""


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()[:60]
    return ""


# ---------------------------------------------------------------------------
# Grading one submission
# ---------------------------------------------------------------------------
def read_submission(path) -> tuple[object | None, str | None]:
    """The notebook, or None and a message a student understands."""
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError as exc:
        return None, f"The submission could not be read: {exc.strerror}."
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "Your file is not a notebook: it is not UTF-8 text. Submit the .ipynb file that Jupyter saves."
    except json.JSONDecodeError as exc:
        return None, (
            f"Your notebook is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}), so it "
            "could not be opened. It was probably edited in a text editor or cut short while saving: "
            "open it in Jupyter, save it again, and resubmit."
        )
    try:
        if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
            raise ValueError("no cells")
        nb = nbformat.reads(raw.decode("utf-8"), as_version=4)  # joins multi-line sources
        for cell in nb.cells:
            if not isinstance(cell.get("source", ""), str):
                raise ValueError("bad cell")
    except Exception:
        return None, "Your file is valid JSON but not a Jupyter notebook (no list of cells). Submit the .ipynb file."
    return nb, None


def _outcomes(ag: Autograder, message: str = "not run") -> list[TestOutcome]:
    """One outcome per test, named before anything runs (so a hung test still has a name)."""
    out = []
    for q in ag.questions:
        names = {"public": public_names(ag.assignment, q.name), "hidden": test_names(q.hidden_source)}
        for kind in ("public", "hidden"):
            out += [TestOutcome(q.name, kind, i, message=message, name=n) for i, n in enumerate(names[kind])]
    return out


def grade_submission(
    path: str | os.PathLike,
    ag: Autograder,
    *,
    timeout: float = 30.0,
    submission_timeout: float | None = None,
) -> Run:
    """Grade one notebook in its own kernel. Never raises for anything the student did."""
    start = time.monotonic()
    submission_timeout = submission_timeout or max(120.0, 20 * timeout)
    deadline = start + submission_timeout
    outcomes = _outcomes(ag)
    run = Run(str(path), outcomes)
    nb, problem = read_submission(path)
    if problem:
        run.notes.append(problem)
        for o in outcomes:
            o.message = "not graded: the notebook could not be read."
        run.elapsed = time.monotonic() - start
        return run

    code_cells = [c for c in nb.cells if c.get("cell_type") == "code" and c.get("source", "").strip()]
    skip: set[int] = set()  # cells that hung or killed the kernel: not replayed
    reported: set[int] = set()
    pending = list(outcomes)
    nonce = "@@" + secrets.token_hex(8) + "@@"
    hidden = {q.name: q.hidden_source for q in ag.questions}
    workdir = tempfile.mkdtemp(prefix="grading-")
    restarts = 0
    poisoned: dict[str, str] = {}  # question -> what went wrong
    try:
        while pending and time.monotonic() < deadline and restarts <= MAX_RESTARTS + len(ag.questions):
            session = _Session(nb, workdir, timeout, deadline, run.kernel_pids)
            try:
                with session:
                    # Import torch and the checks first, under the generous startup limit, so
                    # that the per-cell timeout measures the student's code, not imports.
                    status, outs, _ = session.execute(PRELOAD, -1, timeout=max(STARTUP_S, timeout))
                    if status != "ok":
                        if status != "deadline":
                            run.notes.append(f"The grader could not prepare the kernel ({status}: {_error_line(outs)}).")
                        break
                    dead = False
                    for i, cell in enumerate(code_cells):
                        if i in skip:
                            continue
                        status, outs, secs = session.execute(cell.source, i)
                        where = f"Code cell {i + 1} (`{_first_line(cell.source)}`)"
                        if status in ("timeout", "timeout-killed", "dead"):
                            skip.add(i)
                            if status == "dead":
                                run.notes.append(f"{where} crashed the kernel; it was skipped when grading.")
                            else:
                                run.notes.append(f"{where} {_timeout_message(timeout)} It was skipped when grading.")
                            if status != "timeout":
                                dead = True
                                break
                        elif status == "error" and i not in reported:
                            reported.add(i)
                            run.notes.append(f"{where} raised {_error_line(outs)}")
                        elif status == "deadline":
                            break
                    if dead:
                        restarts += 1
                        continue
                    status, outs, _ = session.execute(
                        f"import attention_lib.grading._harness as {HARNESS}\n"
                        f"{HARNESS}.load_hidden({hidden!r})",
                        len(code_cells),
                        timeout=max(STARTUP_S, timeout),
                    )
                    if status != "ok":
                        if status != "deadline":
                            run.notes.append(f"The grader could not load its tests in your kernel ({status}: {_error_line(outs)}).")
                        break
                    while pending:
                        o = pending[0]
                        if o.question in poisoned:  # it hung or crashed once: do not wait again
                            pending.pop(0)
                            o.message = f"skipped: an earlier test of {o.question} {poisoned[o.question]}."
                            continue
                        status, outs, secs = session.execute(
                            f"{HARNESS}.run(globals(), {ag.assignment!r}, {o.question!r}, {o.kind!r}, {o.index}, {nonce!r})",
                            len(code_cells) + 1,
                        )
                        if status == "deadline":
                            break
                        pending.pop(0)
                        o.seconds = secs
                        line = next((l for l in _stdout(outs).splitlines() if l.startswith(nonce)), None)
                        if line is not None:
                            res = json.loads(line[len(nonce):])
                            o.passed, o.message = bool(res["passed"]), str(res["message"])
                            o.name = str(res.get("name", ""))
                        elif status.startswith("timeout"):
                            o.message = _timeout_message(timeout)
                            poisoned[o.question] = "timed out"
                        elif status == "dead":
                            o.message = "the kernel crashed while running this test (did your code call exit() or run out of memory?)."
                            poisoned[o.question] = "crashed the kernel"
                        else:
                            o.message = f"the test did not report a result ({_error_line(outs) or status})."
                        if status in ("timeout-killed", "dead"):
                            restarts += 1
                            break
                    else:
                        break
            except Exception as exc:  # the kernel did not start, etc.: report, never crash
                run.notes.append(f"The grader could not run the notebook: {type(exc).__name__}: {exc}")
                break
        if pending and time.monotonic() >= deadline - 0.5:
            run.notes.append(f"Grading stopped at the overall limit of {submission_timeout:g} s for one notebook.")
        for o in pending:
            if time.monotonic() >= deadline - 0.5:
                o.message = f"not run: grading this notebook hit the overall limit of {submission_timeout:g} s."
            else:
                o.message = "not run: the kernel kept crashing or hanging."
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    run.elapsed = time.monotonic() - start
    return run


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
def _r(x: float) -> float:
    return round(x, 4)


def results_json(run: Run, ag: Autograder) -> dict:
    """The Gradescope/otter ``results.json`` of one run."""
    tests, questions, total = [], {}, 0.0
    for q in ag.questions:
        n = q.n_public + q.n_hidden
        per = q.points / n if n else 0.0
        q_score = 0.0
        for kind, vis in (("public", "visible"), ("hidden", "after_published")):
            outs = [o for o in run.outcomes if o.question == q.name and o.kind == kind]
            if not outs:
                continue
            score = per * sum(o.passed for o in outs)
            q_score += score
            lines = [
                f"{'✔' if o.passed else '✘'} {o.name or f'{kind} test {o.index + 1}'}"
                + ("" if o.passed else f"\n    {o.message}")
                for o in outs
            ]
            n_ok = sum(o.passed for o in outs)
            if n_ok == 0 and len({o.message for o in outs}) == 1:  # e.g. unreadable notebook
                lines = [f"✘ all: {outs[0].message}"]
            tests.append({
                "name": f"{q.name} ({kind} tests)",
                "score": _r(score),
                "max_score": _r(per * len(outs)),
                "output": f"{n_ok}/{len(outs)} passed\n" + "\n".join(lines),
                "visibility": vis,
            })
        questions[q.name] = {"score": _r(q_score), "max_score": _r(q.points)}
        total += q_score
    return {
        "score": _r(total),
        "execution_time": round(run.elapsed, 1),
        "output": "\n".join(run.notes) if run.notes else "Your notebook ran without errors.",
        "visibility": "after_published",
        "tests": tests,
        "extra_data": {
            "assignment": ag.assignment,
            "submission": run.path,
            "max_score": _r(ag.max_score),
            "questions": questions,
            "kernel_pids": run.kernel_pids,
            "slowest_test_s": round(max((o.seconds for o in run.outcomes), default=0.0), 2),
        },
    }


def _unique_stem(path: str, seen: set[str]) -> str:
    stem = pathlib.Path(path).stem or "submission"
    name, k = stem, 2
    while name in seen:
        name, k = f"{stem}-{k}", k + 1
    seen.add(name)
    return name


def write_summary(rows: list[dict], ag: Autograder, path: pathlib.Path) -> None:
    """``summary.csv``: one row per submission, one column per question."""
    qnames = [q.name for q in ag.questions]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["submission", "score", "max_score", *qnames, "seconds", "notes"])
        for r in rows:
            qs = r["extra_data"]["questions"]
            first_note = r["output"].splitlines()[0] if r["output"] else ""
            w.writerow([
                r["_name"], r["score"], r["extra_data"]["max_score"],
                *[qs[q]["score"] for q in qnames], r["execution_time"], first_note,
            ])


def _grade_one(args):
    path, folder, timeout, submission_timeout = args
    ag = Autograder.load(folder)
    try:
        run = grade_submission(path, ag, timeout=timeout, submission_timeout=submission_timeout)
    except Exception as exc:  # a bug of the grader must not stop the class's grading
        run = Run(str(path), [], notes=[f"internal grader error ({type(exc).__name__}: {exc}); please tell your instructor."])
        run.outcomes = _outcomes(ag, "not graded: internal grader error")
    return results_json(run, ag)


def grade_all(
    autograder: str | os.PathLike,
    submissions: list[str],
    out: str | os.PathLike,
    *,
    timeout: float = 30.0,
    submission_timeout: float | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Grade every submission; write ``out/<name>/results.json`` and ``out/summary.csv``."""
    from tqdm.auto import tqdm

    ag = Autograder.load(autograder)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(str(p), str(autograder), timeout, submission_timeout) for p in submissions]
    bar = tqdm(total=len(tasks), desc=f"grading {ag.assignment}", unit="nb", disable=not progress)
    results: list[dict] = []
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            for res in pool.map(_grade_one, tasks):
                results.append(res)
                bar.update()
    else:
        for t in tasks:
            results.append(_grade_one(t))
            bar.update()
    bar.close()
    seen: set[str] = set()
    for res in results:
        res["_name"] = _unique_stem(res["extra_data"]["submission"], seen)
        d = out / res["_name"]
        d.mkdir(exist_ok=True)
        (d / "results.json").write_text(json.dumps({k: v for k, v in res.items() if k != "_name"}, indent=2, ensure_ascii=False) + "\n")
    write_summary(results, ag, out / "summary.csv")
    return results
