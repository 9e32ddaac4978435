"""The grader's file channel and limits, without a kernel: what a hostile /io folder can do.

The kernel shares ``/io`` with the grader, so everything there may have been planted:
a symlink where the next request goes, a FIFO where the answer should be, an answer that
unpickles into a huge structure. The red-team batch (tests/test_redteam.py) tries the
same attacks end to end; these tests pin each defence down in a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from attention_grader import remote, sandbox


def test_a_request_never_writes_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    req = tmp_path / "req-0.pt"
    req.symlink_to(victim)
    remote.write_request(req, {"op": "probe"})
    assert victim.read_text() == "precious"
    assert not req.is_symlink() and torch.load(req, weights_only=True) == {"op": "probe"}


def test_an_answer_that_is_a_fifo_is_refused_at_once(tmp_path):
    res = tmp_path / "res-0.pt"
    os.mkfifo(res)
    start = time.monotonic()
    with pytest.raises(remote.NoAnswer, match="not a regular file"):
        remote.read_answer(res)
    assert time.monotonic() - start < 5


def test_an_answer_that_is_a_symlink_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere.pt"
    torch.save({"id": "x", "ok": True}, target)
    res = tmp_path / "res-0.pt"
    res.symlink_to(target)
    assert remote.read_answer(res) is None  # O_NOFOLLOW: as if there were no answer


def test_a_missing_answer_is_none_and_a_plain_one_loads(tmp_path):
    assert remote.read_answer(tmp_path / "res-9.pt") is None
    torch.save({"id": "a", "ok": True, "result": torch.arange(3)}, tmp_path / "res-1.pt")
    got = remote.read_answer(tmp_path / "res-1.pt")
    assert got["ok"] is True and torch.equal(got["result"], torch.arange(3))


def test_an_answer_that_unpickles_to_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"id": "a", "ok": True, "result": Evil()}, tmp_path / "res-0.pt")
    with pytest.raises(remote.NoAnswer, match="plain data"):
        remote.read_answer(tmp_path / "res-0.pt")


def test_shared_references_cannot_blow_up_the_grader():
    # the budget counts values as walked, not objects in memory: 8 levels of [x, x] walk ~1000 values (fine),
    # 8 levels of [x] * 4 walk ~4^8 (refused), although both pickle to a few hundred bytes
    small = [0]
    for _ in range(8):
        small = [small, small]
    remote.clean_answer({"r": small})
    big = [0]
    for _ in range(8):
        big = [big] * 4
    with pytest.raises(remote.NoAnswer, match="more than"):
        remote.clean_answer({"r": big})


def test_a_stride_zero_tensor_counts_its_full_size():
    x = torch.zeros(1).expand(16384, 16384)  # one element of storage, 1 GiB materialised
    with pytest.raises(remote.NoAnswer, match="MiB"):
        remote.clean_answer({"result": x})
    y = torch.zeros(1).expand(64, 64)
    out = remote.clean_answer({"result": y})["result"]
    assert out.is_contiguous() and out.untyped_storage().nbytes() == 64 * 64 * 4


def test_answers_come_back_as_copies_of_exact_tensors():
    base = torch.arange(10.0)
    out = remote.clean_answer(base[2:5])
    assert torch.equal(out, torch.tensor([2.0, 3.0, 4.0]))
    assert out.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()

    class Sub(torch.Tensor):
        pass

    with pytest.raises(remote.NoAnswer, match="not plain data"):
        remote.clean_answer(torch.zeros(2).as_subclass(Sub))


def test_a_size_mismatch_error_is_explained_as_broadcasting():
    hint = remote._error_hint("RuntimeError", "The size of tensor a (4) must match the size of tensor b (3) at "
                                               "non-singleton dimension 1")
    assert "broadcasting" in hint and "keepdim=True" in hint
    assert remote._error_hint("TypeError", "unsupported operand") == ""


def _can_make_cgroups() -> bool:
    g = sandbox.Cgroup.create(sandbox.Limits(), "probe")
    if g is None:
        return False
    g.remove()
    return True


@pytest.mark.skipif(not _can_make_cgroups(), reason="this process may not create cgroups (not root, no delegation)")
def test_the_memory_cgroup_holds_all_processes_of_a_sandbox_together():
    limits = sandbox.Limits(memory_gib=0.25)
    group = sandbox.Cgroup.create(limits, "test")
    assert group is not None
    # three children of 150 MiB each: each is under the cap, together they are not
    code = ("import os, time\n"
            "kids = []\n"
            "for _ in range(3):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        b = bytearray(150 << 20)\n"
            "        for i in range(0, len(b), 4096): b[i] = 1\n"
            "        time.sleep(5); os._exit(0)\n"
            "    kids.append(pid)\n"
            "codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids]\n"
            "print(codes)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           preexec_fn=group.join)
        codes = eval(r.stdout.strip() or "[]")
        assert any(c == -9 for c in codes), (r.stdout, r.stderr)  # the kernel's OOM killer, inside the group only
        assert group.oom_killed()
    finally:
        group.remove()
    assert not any(d.exists() for d in group.dirs)


def test_limits_default_to_the_documented_caps():
    lim = sandbox.Limits()
    assert lim.memory_bytes == 2 * 2**30 and lim.file_bytes == 64 * 2**20 and lim.io_bytes == 192 * 2**20
