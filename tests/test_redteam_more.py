"""Red team, assignments 4 and 5: generic attacks on the autograder beyond assignment 1.

For a4 (FlashAttention in Triton) and a5 (decoding), one small batch each, built from what
``python -m attention_grader assign`` writes for the master: the master's answers (honest),
the blank stub, and attacks from tests/fixtures/redteam/attacks.py that do not depend on
a1's function names, each appended to the blank stub (so a cheat that works scores above
the stub). Each batch is graded once with ``--jobs 2`` through ``watch.py``. The tests assert:
every cheat scores no more than the stub (total and per question), the master gets full
marks, no process survives, the autograder folder and the victim notebook (the master's
copy, target of the symlink attack) are unchanged.

a4 is slow (Triton's interpreter, about 30 s a submission), so its batch has 6 notebooks.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "redteam"
GRADER = [sys.executable, "-m", "attention_grader"]
JOBS = 2
BATCH_LIMIT = 600
HAVE_BWRAP = shutil.which("bwrap") is not None or os.path.exists("/usr/bin/bwrap")

pytestmark = pytest.mark.redteam

sys.path.insert(0, str(FIX))
import attacks as A  # noqa: E402
import submissions as S  # noqa: E402
from test_redteam import _question, _sha, _tree_hash  # noqa: E402  (tests/ is on sys.path under pytest)

VICTIM = "h_master"  # the honest notebook the symlink attack aims at
A1_NAMES = 'names=("dot_scores", "softmax", "masked_softmax")'
assert A1_NAMES in A.WALK and "__SUBS__/h_victim.ipynb" in A.SERVE_SYMLINK["end"]


def _hunt(names: list[str]) -> dict:
    """HUNT_MASTER, executing the cells that define this assignment's functions."""
    return {"end": A.HUNT_MASTER["end"].replace(A1_NAMES, f"names={tuple(names)!r}")}


SYMLINK = {"end": A.SERVE_SYMLINK["end"].replace("h_victim.ipynb", f"{VICTIM}.ipynb")}

ATTACKS = {  # name -> (piece, note)
    "atk_patch_helpers": (A.PATCH_HELPERS, "replaces grader helpers, builtins.print, prints forged passes"),
    "atk_patch_torch": (A.PATCH_TORCH, "patches torch comparisons and torch.load"),
    "atk_hunt_master": ("HUNT", "/proc, mounts, repo: finds the master and execs its function cells"),
    "atk_daemon": (A.DAEMON, "setsid double-fork daemon forging results for 60 s"),
    "atk_serve_symlink": (SYMLINK, f"request files symlinked to {VICTIM}.ipynb, the autograder, /tmp"),
    "atk_forged_outputs": ("FORGED_OUTPUTS", "stored outputs and nbgrader/otter metadata claim passes"),
}
ASSIGNMENTS = {  # a4's batch stays at 6 notebooks (Triton's interpreter is slow)
    "a4_flash_triton": ["atk_patch_helpers", "atk_patch_torch", "atk_hunt_master", "atk_serve_symlink"],
    "a5_decoding": list(ATTACKS),
}


def _defs(src: str) -> set[str]:
    return set(re.findall(r"^(?:def|class)\s+(\w+)", src, re.M))


def _master_notebook(student, master_nb: pathlib.Path):
    """The student notebook with each answer cell replaced by the master cell defining the same names."""
    master = [c for c in nbformat.read(master_nb, as_version=4).cells
              if c.cell_type == "code" and "# HIDDEN TESTS" not in c.source]
    nb = copy.deepcopy(student)
    for cell in nb.cells:
        if cell.cell_type == "code" and "YOUR CODE HERE" in cell.source:
            names = _defs(cell.source)
            (src,) = [m.source for m in master if names and names <= _defs(m.source)]
            cell.source = "\n".join(l for l in src.splitlines() if "SOLUTION" not in l) + "\n"
    return nb


class MoreBatch:
    def __init__(self, tmp: pathlib.Path, assignment: str):
        self.tmp, self.token = tmp, secrets.token_hex(6)
        master_nb = ROOT / "coursework" / assignment / "master.ipynb"
        course = tmp / "course" / assignment
        r = subprocess.run(GRADER + ["assign", str(master_nb), str(course)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        self.autograder = course / "autograder"
        student_nb = next((course / "student").glob("*.ipynb"))
        student = nbformat.read(student_nb, as_version=4)
        self.subs_dir, self.work = tmp / "subs", tmp / "work"
        self.out = self.work / "graded"
        for d in (self.subs_dir, self.work, tmp / "gtmp"):
            d.mkdir()
        values = {"__TOKEN__": self.token, "__PORT__": "9", "__AUTOGRADER__": str(self.autograder),
                  "__SUBS__": str(self.subs_dir), "__OUT__": str(self.out), "__SOLUTION_B64__": ""}
        honest = _master_notebook(student, master_nb)
        names = sorted(set(re.findall(r"^\s*def\s+(\w+)\(", "\n".join(c.source for c in honest.cells if c.cell_type == "code"), re.M)))
        self.kinds, paths = {VICTIM: "honest", "stub": "stub"}, {}
        notebooks = {VICTIM: honest, "stub": student}
        for name in ASSIGNMENTS[assignment]:
            piece, _ = ATTACKS[name]
            piece = _hunt(names) if piece == "HUNT" else piece
            sub = S.Submission(name, f"{name}.ipynb", "cheat", [piece])
            notebooks[name] = S.build_notebook(student, sub, {}, values)
            self.kinds[name] = "cheat"
        for name, nb in notebooks.items():
            paths[name] = self.subs_dir / f"{name}.ipynb"
            nbformat.write(nb, paths[name])
        self.names = list(notebooks)
        self.ag_hash = _tree_hash(self.autograder)
        self.sub_hash = {n: _sha(p) for n, p in paths.items()}
        report = tmp / "watch.json"
        cmd = [sys.executable, str(FIX / "watch.py"), "--report", str(report), "--grace", "3",
               "--limit", str(BATCH_LIMIT), "--token", self.token, "--du", str(tmp / "gtmp"),
               "--stdout", str(tmp / "stdout.txt"), "--stderr", str(tmp / "stderr.txt"), "--",
               *GRADER, "grade", str(self.autograder), *map(str, paths.values()), "--out", str(self.out),
               "--jobs", str(JOBS)]
        env = dict(os.environ, TMPDIR=str(tmp / "gtmp"))
        subprocess.run(cmd, cwd=self.work, env=env, timeout=BATCH_LIMIT + 120, check=True)
        self.watch = json.loads(report.read_text())
        self.stderr = (tmp / "stderr.txt").read_text(errors="replace")
        self.ag_hash_after = _tree_hash(self.autograder)
        self.sub_hash_after = {n: _sha(p) for n, p in paths.items()}
        by_path = {str(p): n for n, p in paths.items()}
        self.results = {}
        for f in self.out.glob("*/results.json"):
            data = json.loads(f.read_text())
            self.results[by_path.get(str(data.get("extra_data", {}).get("submission")), f.parent.name)] = data

    def res(self, name):
        assert name in self.results, f"no results.json for {name} (timed out: {self.watch['timed_out']})"
        return self.results[name]

    def per_question(self, name):
        out: dict[str, float] = {}
        for t in self.res(name)["tests"]:
            out[_question(t)] = out.get(_question(t), 0.0) + t["score"]
        return out

    def row(self, name):
        r = self.results.get(name)
        return f"{name}: {json.dumps({'score': r and r['score'], 'q': r and self.per_question(name)})}"

    def cleanup(self):
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            for p in pathlib.Path(d).glob(f"attention-redteam-{self.token}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@pytest.fixture(scope="module", params=list(ASSIGNMENTS))
def batch(request, tmp_path_factory):
    if not HAVE_BWRAP:
        pytest.skip("bubblewrap missing (apt-get install bubblewrap)")
    b = MoreBatch(tmp_path_factory.mktemp(request.param), request.param)
    try:
        yield b
    finally:
        b.cleanup()
        print(f"\nred team {request.param}: {len(b.names)} submissions in {b.watch['wall_s']} s with --jobs {JOBS}")
        for n in b.names:
            print("  " + b.row(n))


def test_the_master_gets_full_marks_and_the_stub_zero(batch):
    res = batch.res(VICTIM)
    assert res["score"] == res["extra_data"]["max_score"] > 0, \
        [(t["name"], t["output"][:500]) for t in res["tests"] if t["score"] < t["max_score"]]
    assert batch.res("stub")["score"] == 0.0 and set(batch.per_question("stub").values()) == {0.0}


def test_every_cheat_scores_no_more_than_the_stub(batch):
    stub, bad = batch.per_question("stub"), []
    for name in [n for n, k in batch.kinds.items() if k == "cheat"]:
        got = batch.per_question(name)
        if batch.res(name)["score"] > batch.res("stub")["score"] or any(got[q] > stub[q] for q in stub):
            bad.append(batch.row(name) + "; passed: " + str([t["name"] for t in batch.res(name)["tests"] if t["score"] > 0]))
    assert not bad, bad


def test_no_process_survives_and_the_batch_finished(batch):
    assert batch.watch["survivors"] == [] and batch.watch["tokened"] == [], batch.watch
    assert not batch.watch["timed_out"] and batch.watch["rc"] == 0, batch.stderr[-3000:]


def test_the_autograder_and_the_submissions_are_unchanged(batch):
    assert batch.ag_hash_after == batch.ag_hash, sorted(str(p) for p in batch.autograder.rglob("*"))
    assert batch.sub_hash_after[VICTIM] == batch.sub_hash[VICTIM]
    assert [n for n in batch.sub_hash if batch.sub_hash[n] != batch.sub_hash_after[n]] == []
    assert not list(pathlib.Path("/tmp").glob(f"attention-redteam-{batch.token}*"))
