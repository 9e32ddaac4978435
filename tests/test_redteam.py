"""Red team: attacks on the autograder, graded in one batch with honest notebooks.

One ``python -m attention_grader grade ... --jobs 2`` run (a module-scoped fixture) grades
assignment 1's blank stub, honest notebooks (the master's answers, float64 inside,
logsumexp, einsum, odd file names), typical bugs (each graded twice: early and last) and
one notebook per attack (tests/fixtures/redteam/attacks.py). The run goes through
``watch.py``, a child subreaper that samples memory and lists every process that outlives
the grader. The tests then assert:

* every cheat scores no more than the blank stub, in total and per question;
* every honest notebook keeps its score whatever its classmates do (early == last);
* no process survives; no file appears outside the sandbox; the autograder folder and
  the submissions are unchanged; nothing reached the test's network listeners;
* memory stays under the cap (per sandbox, all its processes together), the grader's
  own processes stay small, tmpfs and disk use stay bounded;
* typical bugs get feedback a student can act on;
* results are Gradescope's schema, names are safe and unique, summary.csv is complete.

Without ``bwrap`` the batch is skipped (the grader would refuse, which is tested too).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import site
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "redteam"
MASTER = ROOT / "coursework" / "a1_softmax" / "master.ipynb"
GRADER = [sys.executable, "-m", "attention_grader"]
TIMEOUT = 20  # --timeout: seconds per cell and per call
JOBS = 2
CAP = 2 * 2**30  # the default --memory-gib
BATCH_LIMIT = 900  # seconds: the whole batch, after which it is killed and judged as it is
HAVE_BWRAP = shutil.which("bwrap") is not None or os.path.exists("/usr/bin/bwrap")
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap missing (apt-get install bubblewrap)")

# One batch of minutes: `make unit` deselects it, `make test-redteam` (part of `make test`) runs it.
pytestmark = pytest.mark.redteam

sys.path.insert(0, str(FIX))
import submissions as S  # noqa: E402


def _tree_hash(folder: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
        h.update(oct(p.stat().st_mode).encode())
    return h.hexdigest()


def _sha(path: pathlib.Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() + oct(path.stat().st_mode)
    except OSError as exc:
        return f"unreadable: {exc}"


class Listener:
    """TCP on 127.0.0.1 and an abstract unix socket; hands the solution to whoever connects."""

    def __init__(self, token: str, payload: bytes):
        self.payload, self.connections = payload, []
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0attention-redteam-" + token)
        for s in (self.tcp, self.unix):
            s.listen(8)
            s.settimeout(0.5)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()
        self.stop = False

    def _serve(self, s):
        while not getattr(self, "stop", False):
            try:
                conn, addr = s.accept()
            except OSError:
                continue
            self.connections.append(str(addr) or "unix")
            try:
                conn.sendall(self.payload)
            finally:
                conn.close()

    def close(self):
        self.stop = True
        self.tcp.close()
        self.unix.close()


def _host_dirs(tmp: pathlib.Path) -> list[pathlib.Path]:
    home = pathlib.Path.home()
    dirs = [pathlib.Path(p) for p in ("/tmp", "/var/tmp", "/dev/shm")]
    dirs += [home, home / ".cache", home / ".ipython" / "profile_default" / "startup", ROOT, tmp, tmp / "work"]
    dirs += [pathlib.Path(site.getusersitepackages())]
    dirs += [pathlib.Path(p) for p in sys.path if p and os.path.isdir(p)]
    return list(dict.fromkeys(dirs))


def _token_files(tmp: pathlib.Path, token: str) -> list[pathlib.Path]:
    """Files outside any sandbox whose names an attack would have given them."""
    names = (f"attention-redteam-{token}", f"attention_redteam_{token}")
    found = []
    for d in _host_dirs(tmp):
        try:
            found += [p for p in d.iterdir() if any(n in p.name for n in names)]
        except OSError:
            pass
    return found


class Batch:
    """Everything the tests look at, gathered once."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.token = secrets.token_hex(6)
        course = tmp / "course" / "a1_softmax"
        r = subprocess.run(GRADER + ["assign", str(MASTER), str(course)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        shutil.copy(MASTER, course / "master.ipynb")  # the layout coursework/<a>/{master, student, autograder}
        self.autograder = course / "autograder"
        student = next((course / "student").glob("*.ipynb"))
        self.solution_b64 = base64.b64encode(S.solution_source(MASTER).encode())
        self.listener = Listener(self.token, self.solution_b64)
        self.secret_file = pathlib.Path.home() / f".attention-redteam-secret-{self.token}"
        self.secret_file.write_text(f"SECRET-{self.token} {self.solution_b64.decode()}")
        self.subs_dir, self.work = tmp / "subs", tmp / "work"
        self.out = self.work / "graded"
        self.work.mkdir()
        (tmp / "gtmp").mkdir()
        values = {"__TOKEN__": self.token, "__PORT__": str(self.listener.port), "__AUTOGRADER__": str(self.autograder),
                  "__SUBS__": str(self.subs_dir), "__OUT__": str(self.out)}
        self.subs = S.build(self.subs_dir, student, MASTER, values)
        self.by_name = {s.name: s for s in self.subs}
        self.ag_hash = _tree_hash(self.autograder)
        self.sub_hash = {s.name: _sha(s.path) for s in self.subs}
        self.files_before = set(_token_files(tmp, self.token))
        env = dict(os.environ, ATTENTION_REDTEAM_SOLUTION=self.solution_b64.decode(), TMPDIR=str(tmp / "gtmp"))
        report = tmp / "watch.json"
        cmd = [sys.executable, str(FIX / "watch.py"), "--report", str(report), "--grace", "3",
               "--limit", str(BATCH_LIMIT), "--token", self.token, "--du", str(tmp / "gtmp"),
               "--stdout", str(tmp / "stdout.txt"), "--stderr", str(tmp / "stderr.txt"), "--",
               *GRADER, "grade", str(self.autograder), *[str(s.path) for s in self.subs], "--out", str(self.out),
               "--timeout", str(TIMEOUT), "--jobs", str(JOBS)]
        subprocess.run(cmd, cwd=self.work, env=env, timeout=BATCH_LIMIT + 120, check=True)
        self.watch = json.loads(report.read_text())
        self.stderr = (tmp / "stderr.txt").read_text(errors="replace")
        self.stdout = (tmp / "stdout.txt").read_text(errors="replace")
        self.files_after = [p for p in _token_files(tmp, self.token) if p not in self.files_before]
        self.ag_hash_after = _tree_hash(self.autograder)
        self.sub_hash_after = {s.name: _sha(s.path) for s in self.subs}
        self.connections = list(self.listener.connections)
        self.results = {}
        by_path = {str(s.path): s.name for s in self.subs}
        self.dirs = sorted(p.name for p in self.out.iterdir() if p.is_dir()) if self.out.exists() else []
        for d in self.dirs:
            f = self.out / d / "results.json"
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            name = by_path.get(str(data.get("extra_data", {}).get("submission")), d)
            self.results[name] = data

    def cleanup(self):
        self.listener.close()
        for p in [self.secret_file, *_token_files(self.tmp, self.token)]:
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass

    # -- reading results -------------------------------------------------------------------
    def res(self, name: str) -> dict:
        assert name in self.results, f"no results.json for {name} (batch timed out: {self.watch['timed_out']})"
        return self.results[name]

    def per_question(self, name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.res(name)["tests"]:
            out[_question(t)] = out.get(_question(t), 0.0) + t["score"]
        return out

    def outputs(self, name: str, question: str) -> str:
        return "\n".join(t["output"] for t in self.res(name)["tests"] if _question(t) == question)

    def row(self, name: str) -> str:
        r = self.results.get(name)
        return f"{name}: {json.dumps({'score': r and r['score'], 'q': r and self.per_question(name)})}"


def _question(t: dict) -> str:
    q = (t.get("extra_data") or {}).get("question")
    return q or re.match(r"\s*(q\d+)", t["name"]).group(1)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    if not HAVE_BWRAP:
        pytest.skip("bubblewrap missing (apt-get install bubblewrap)")
    b = Batch(tmp_path_factory.mktemp("redteam"))
    try:
        yield b
    finally:
        b.cleanup()
        table = []
        for s in b.subs:
            r = b.results.get(s.name)
            table.append({"name": s.name, "kind": s.kind, "note": s.note,
                          "score": r["score"] if r else None, "questions": b.per_question(s.name) if r else None})
        summary = {"wall_s": b.watch["wall_s"], "rc": b.watch["rc"], "timed_out": b.watch["timed_out"],
                   "survivors": b.watch["survivors"], "tokened": b.watch["tokened"],
                   "sandboxes_peak_anon_mib": sorted(g["peak_anon"] >> 20 for g in b.watch["sandboxes"])[-5:],
                   "sandboxes_peak_procs": max((g["peak_procs"] for g in b.watch["sandboxes"]), default=0),
                   "grader_peak_rss_mib": max((g["peak_rss"] >> 20 for g in b.watch["grader"]), default=0),
                   "shmem_peak_growth_mib": b.watch["shmem_peak_growth"] >> 20,
                   "du_peak_growth_mib": b.watch["du_peak_growth"] >> 20, "files_after": [str(p) for p in b.files_after],
                   "connections": b.connections, "table": table}
        (b.tmp / "redteam_report.json").write_text(json.dumps(summary, indent=1))
        print(f"\nred team: {len(b.subs)} submissions graded in {b.watch['wall_s']} s with --jobs {JOBS}; "
              f"report {b.tmp / 'redteam_report.json'}")


KINDS = {s.name: s.kind for s in S.batch()}
CHEATS = [n for n, k in KINDS.items() if k == "cheat"]
HONEST = [n for n, k in KINDS.items() if k == "honest"]
PAIRS = [(n, n[:-2] + "_z") for n in KINDS if n.endswith("_a")]


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------
@needs_bwrap
def test_the_blank_stub_scores_zero(batch):
    assert batch.res("stub")["score"] == 0.0, batch.row("stub")
    assert set(batch.per_question("stub").values()) == {0.0}


@needs_bwrap
@pytest.mark.parametrize("name", CHEATS)
def test_a_cheat_scores_no_more_than_the_blank_stub(batch, name):
    stub, got = batch.per_question("stub"), batch.per_question(name)
    passed = [t["name"] for t in batch.res(name)["tests"] if t["score"] > 0]
    assert batch.res(name)["score"] <= batch.res("stub")["score"], f"{batch.row(name)}; passed: {passed}"
    assert all(got[q] <= stub[q] for q in stub), f"{batch.row(name)}; passed: {passed}"


@needs_bwrap
def test_right_only_on_the_first_call_earns_at_most_one_test_per_question(batch):
    name = "bnd_toc_first_call"
    res = batch.res(name)
    per_q_max = {}
    for t in res["tests"]:
        per_q_max[_question(t)] = max(per_q_max.get(_question(t), 0.0), t["max_score"])
    for q, score in batch.per_question(name).items():
        assert score <= batch.per_question("stub")[q] + per_q_max[q] + 1e-6, batch.row(name)


@needs_bwrap
def test_right_only_on_the_public_inputs_fails_every_hidden_test(batch):
    res = batch.res("bnd_toc_public_inputs")
    hidden = [t for t in res["tests"] if t["visibility"] != "visible"]
    assert hidden and all(t["score"] == 0 for t in hidden), [t["name"] for t in hidden if t["score"]]


@needs_bwrap
@pytest.mark.parametrize("name", HONEST)
def test_an_honest_notebook_gets_full_marks(batch, name):
    res = batch.res(name)
    assert res["score"] == res["extra_data"]["max_score"] == 8.0, \
        [(t["name"], t["output"]) for t in res["tests"] if t["score"] < t["max_score"]]


@needs_bwrap
@pytest.mark.parametrize("early,late", PAIRS)
def test_an_honest_notebook_keeps_its_score_whatever_its_classmates_do(batch, early, late):
    a, z = batch.res(early), batch.res(late)
    assert [(t["name"], t["score"]) for t in a["tests"]] == [(t["name"], t["score"]) for t in z["tests"]], \
        f"{batch.row(early)} vs {batch.row(late)}"
    assert batch.sub_hash_after[late] == batch.sub_hash[late]


# ---------------------------------------------------------------------------
# Feedback on typical bugs (both copies)
# ---------------------------------------------------------------------------
def _full(batch, name, q):
    return abs(batch.per_question(name)[q] - {"q1": 2.0, "q2": 3.0, "q3": 3.0}[q]) < 1e-6


@needs_bwrap
@pytest.mark.parametrize("copy", ["a", "z"])
def test_softmax_without_the_max_shift_is_told_about_overflow(batch, copy):
    name = f"bug_no_shift_{copy}"
    assert _full(batch, name, "q1") and _full(batch, name, "q3"), batch.row(name)
    assert batch.per_question(name)["q2"] <= 0.5 * 3.0, batch.row(name)  # the core test weighs
    text = batch.outputs(name, "q2")
    assert re.search(r"overflow", text, re.I) and re.search(r"max", text, re.I), text


@needs_bwrap
@pytest.mark.parametrize("copy", ["a", "z"])
def test_a_mask_applied_after_the_softmax_gets_a_renormalisation_hint(batch, copy):
    name = f"bug_mask_after_{copy}"
    assert _full(batch, name, "q1") and _full(batch, name, "q2") and not _full(batch, name, "q3"), batch.row(name)
    text = batch.outputs(name, "q3")
    assert re.search(r"renormali[sz]", text, re.I), text


@needs_bwrap
@pytest.mark.parametrize("copy", ["a", "z"])
def test_a_fully_masked_row_nan_is_diagnosed(batch, copy):
    name = f"bug_nan_row_{copy}"
    assert not _full(batch, name, "q3"), batch.row(name)
    text = batch.outputs(name, "q3")
    assert "NaN" in text and re.search(r"fully masked|every key is masked", text, re.I), text


@needs_bwrap
@pytest.mark.parametrize("copy", ["a", "z"])
def test_wrong_broadcasting_is_named(batch, copy):
    name = f"bug_broadcast_{copy}"
    assert not _full(batch, name, "q3"), batch.row(name)
    text = batch.outputs(name, "q3")
    assert re.search(r"broadcast|keepdim", text, re.I), text


@needs_bwrap
@pytest.mark.parametrize("copy", ["a", "z"])
def test_a_later_question_names_the_earlier_function_that_is_wrong(batch, copy):
    name = f"bug_earlier_{copy}"
    assert not _full(batch, name, "q2") and not _full(batch, name, "q3"), batch.row(name)
    failing = "\n".join(t["output"] for t in batch.res(name)["tests"] if _question(t) == "q3" and t["score"] < t["max_score"])
    assert re.search(r"\bq2\b", failing) and re.search(r"`softmax`", failing), failing


# ---------------------------------------------------------------------------
# Nothing escapes
# ---------------------------------------------------------------------------
@needs_bwrap
def test_no_process_survives_grading(batch):
    assert batch.watch["survivors"] == [] and batch.watch["tokened"] == [], batch.watch
    daemon_marks = [p for p in batch.files_after if "daemon" in p.name]
    assert not daemon_marks, daemon_marks


@needs_bwrap
def test_the_batch_finished_in_time(batch):
    assert not batch.watch["timed_out"], f"the grader was killed after {BATCH_LIMIT} s; stderr tail: {batch.stderr[-2000:]}"
    assert batch.watch["rc"] == 0, batch.stderr[-3000:]


@needs_bwrap
def test_no_file_appears_outside_the_sandbox(batch):
    assert batch.files_after == [], batch.files_after


@needs_bwrap
def test_the_autograder_folder_is_unchanged(batch):
    assert batch.ag_hash_after == batch.ag_hash, sorted(str(p) for p in batch.autograder.rglob("*"))


@needs_bwrap
def test_no_submission_is_changed(batch):
    changed = [n for n in batch.sub_hash if batch.sub_hash[n] != batch.sub_hash_after[n]]
    assert changed == [], changed


@needs_bwrap
def test_nothing_reaches_the_network(batch):
    assert batch.connections == []


@needs_bwrap
def test_no_secret_reaches_the_results(batch):
    secrets_ = [f"SECRET-{batch.token}", batch.solution_b64.decode()[:40]]
    for d in batch.dirs:
        text = (batch.out / d / "results.json").read_text()
        assert not any(s in text for s in secrets_), d


@needs_bwrap
def test_memory_stays_under_the_cap(batch):
    w = batch.watch
    assert w["samples"] > 20 and w["sandboxes"], w
    over = [g for g in w["sandboxes"] if g["peak_anon"] > CAP]
    assert not over, f"sandboxes over {CAP >> 20} MiB (all their processes together): {over}"
    assert w["shmem_peak_growth"] <= 2**30, f"tmpfs grew by {w['shmem_peak_growth'] >> 20} MiB"
    assert w["du_peak_growth"] <= 384 * 2**20, f"the grader's temporary folder grew by {w['du_peak_growth'] >> 20} MiB"


@needs_bwrap
def test_the_grader_stays_small_whatever_the_answers(batch):
    peak = max(g["peak_rss"] for g in batch.watch["grader"])
    assert peak <= 1536 * 2**20, f"a grader process reached {peak >> 20} MiB: {batch.watch['grader']}"
    for name in ("atk_answer_bomb", "atk_zero_stride", "atk_big_storage", "atk_shell_flood", "atk_output_flood"):
        assert batch.res(name)["execution_time"] <= batch.res("stub")["execution_time"] + 60, batch.row(name)


@needs_bwrap
def test_output_is_capped(batch):
    sizes = {d: (batch.out / d / "results.json").stat().st_size for d in batch.dirs}
    assert max(sizes.values()) <= 2**20, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


# ---------------------------------------------------------------------------
# Results: names, schema, summary
# ---------------------------------------------------------------------------
@needs_bwrap
def test_result_names_are_safe_and_unique(batch):
    assert len(batch.dirs) == len(batch.subs), batch.dirs
    assert not {".", ".."} & set(batch.dirs)
    assert sorted(p.name for p in batch.work.iterdir()) == ["graded"]  # nothing written next to --out
    assert (batch.out / "summary.csv").is_file()
    assert not list(batch.tmp.glob("results.json")) and not list(batch.out.parent.glob("*/results.json"))
    assert set(batch.results) == {s.name for s in batch.subs}
    hw = sorted(batch.res(n)["score"] for n in ("name_hw_alice", "name_hw_bob"))
    assert hw == [0.0, 8.0]


@needs_bwrap
def test_summary_matches_every_results_file(batch):
    with open(batch.out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(batch.subs)
    scores = {r["submission"]: float(r["score"]) for r in rows}
    assert len(scores) == len(rows)
    for d in batch.dirs:
        assert scores[d] == json.loads((batch.out / d / "results.json").read_text())["score"], d


@needs_bwrap
def test_results_follow_the_gradescope_schema(batch):
    for name, res in batch.results.items():
        assert {"score", "tests", "output", "stdout_visibility"} <= set(res), name
        for t in res["tests"]:
            assert {"name", "score", "max_score", "output", "visibility", "status"} <= set(t), (name, t)
            assert 0 <= t["score"] <= t["max_score"] and t["status"] in ("passed", "failed")
            assert t["visibility"] in ("visible", "hidden", "after_due_date", "after_published")
        assert abs(sum(t["score"] for t in res["tests"]) - res["score"]) < 1e-3, name


# ---------------------------------------------------------------------------
# No sandbox, mistyped paths
# ---------------------------------------------------------------------------
def _assign(tmp: pathlib.Path) -> pathlib.Path:
    r = subprocess.run(GRADER + ["assign", str(MASTER), str(tmp / "a1")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp / "a1"


@pytest.mark.skipif(shutil.which("bwrap") is None and not os.path.exists("/usr/bin/bwrap"),
                    reason="needs bwrap to hide it (the refusal itself is what a machine without it shows)")
def test_grading_refuses_without_bubblewrap_and_says_how_to_install_it(tmp_path):
    a1 = _assign(tmp_path)
    stub = next((a1 / "student").glob("*.ipynb"))
    bwraps = {os.path.realpath(p) for p in [shutil.which("bwrap"), "/usr/bin/bwrap"] if p and os.path.exists(p)}
    bin_dir = tmp_path / "bin"  # PATH without bwrap
    bin_dir.mkdir()
    hide = []
    for b in bwraps | {shutil.which("bwrap") or "/usr/bin/bwrap"}:
        hide += ["--ro-bind", "/dev/null", b]  # and no bwrap where the grader might look for it
    outer = shutil.which("bwrap") or "/usr/bin/bwrap"
    env = dict(os.environ, PATH=f"{bin_dir}:" + ":".join(
        d for d in os.environ.get("PATH", "").split(":") if d and not os.path.exists(os.path.join(d, "bwrap"))))
    cmd = [outer, "--dev-bind", "/", "/", *hide, "--", *GRADER, "grade", str(a1 / "autograder"), str(stub),
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "bubblewrap" in r.stderr and re.search(r"apt(-get)? install bubblewrap", r.stderr), r.stderr
    assert "--no-sandbox" in r.stderr
    assert not (tmp_path / "out" / "summary.csv").exists() and not list(tmp_path.glob("out/*/results.json"))


@needs_bwrap
def test_mistyped_and_unreadable_paths_give_a_nonzero_exit_code(tmp_path):
    a1 = _assign(tmp_path)
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    r = subprocess.run(GRADER + ["grade", str(a1 / "autograder"), str(tmp_path / "missing.ipynb"), str(bad),
                                 "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(x["score"]) for x in rows] == [0.0, 0.0]
