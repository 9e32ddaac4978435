"""One kernel of one submission: started (sandboxed) from the grader's own Python, driven
over the shell channel only, interrupted and killed from outside.

* The kernel is ``sys.executable -m ipykernel_launcher -f <connection file>``: the
  grader's interpreter, whatever kernelspecs are installed.
* Transport is ZeroMQ over unix sockets (``transport="ipc"``) in the submission's own
  ``io`` folder, bound into the sandbox as ``/io``: the sandbox has no network, not even
  loopback, and the sockets are files that both sides see.
* The grader connects to the shell channel alone. It never subscribes to IOPub, so what
  the student prints never reaches the grader; the kernel's own stdout and stderr go to
  /dev/null. The shell socket refuses messages over ``MAX_MESSAGE`` bytes (ZeroMQ's
  ``MAXMSGSIZE``): an oversized reply drops the connection, and the call times out; and it
  queues at most ``MAX_QUEUED`` messages (``RCVHWM``), so a flood costs the grader little memory.
* Nothing printed decides anything: :mod:`.remote` reads answers from files.
* A watchdog thread checks the sandbox four times a second: its ``/io`` folder (on the
  grader's disk) stays under ``Limits.io_bytes``, and, where no cgroup holds the caps,
  its processes together stay under the memory cap and ``Limits.max_procs``. Over a cap,
  the sandbox is killed and :attr:`Kernel.limit_hit` says which.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from . import sandbox

__all__ = ["Kernel", "KernelStartError", "MAX_MESSAGE", "kill_all", "ABORT"]

MAX_MESSAGE = 256 << 10  # bytes: the largest shell message the grader accepts (replies are a few hundred)
MAX_QUEUED = 32  # shell messages ZeroMQ may hold for the grader (its receive high-water mark)
GRACE_S = 1.0  # after an interrupt, how long the kernel has to answer before it is killed
KERNEL_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": sandbox.HOME,
    "TMPDIR": sandbox.HOME,
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "MPLBACKEND": "Agg",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "JUPYTER_PLATFORM_DIRS": "1",
    "IPYTHONDIR": sandbox.HOME + "/.ipython",
}
PACKAGES = ["attention_lib"]  # what the kernel may import from outside sys.path's plain folders


class KernelStartError(RuntimeError):
    pass


ABORT = threading.Event()  # set on Ctrl-C: no kernel starts any more
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def kill_all() -> None:
    """Kill every kernel still running (Ctrl-C in the grader)."""
    ABORT.set()
    with _LIVE_LOCK:
        live = list(_LIVE)
    for k in live:
        k.kill()


class _Client(BlockingKernelClient):
    """A client whose sockets refuse messages over MAX_MESSAGE bytes."""

    def _create_connected_socket(self, channel, identity=None):
        from jupyter_client.connect import channel_socket_types

        sock = self.context.socket(channel_socket_types[channel])
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        sock.setsockopt(zmq.RCVHWM, MAX_QUEUED)  # a flood of replies is dropped, not buffered here
        if identity:
            sock.identity = identity
        sock.connect(self._make_url(channel))
        return sock


class Kernel:
    """A started kernel; ``with Kernel(...) as k: k.execute(code, timeout)``; always killed on exit."""

    def __init__(self, io_dir: pathlib.Path, *, sandboxed: bool, bwrap: str | None = None,
                 hidden: list[pathlib.Path] = (), limits: sandbox.Limits | None = None,
                 startup_timeout: float = 60.0):
        self.io_dir = pathlib.Path(io_dir)
        self.sandboxed = sandboxed
        self.limits = limits or sandbox.Limits()
        self.proc: subprocess.Popen | None = None
        self.kc: _Client | None = None
        self.pids: list[int] = []
        self.dead = False
        self.limit_hit: str | None = None  # "memory" | "processes" | "disk": why the watchdog killed it
        self.cgroup: sandbox.Cgroup | None = None
        self._stop = threading.Event()
        self._start(bwrap, list(hidden), startup_timeout)

    # -- life cycle ---------------------------------------------------------------------------
    def _start(self, bwrap, hidden, startup_timeout) -> None:
        if ABORT.is_set():
            raise KernelStartError("grading was interrupted")
        tag = uuid.uuid4().hex[:8]
        inner_io = sandbox.IO_DIR if self.sandboxed else str(self.io_dir)
        # the same ports and key in two files: one with the paths the kernel sees, one for us
        inner_file = self.io_dir / f"kernel-{tag}.json"
        _, info = write_connection_file(str(inner_file), transport="ipc", ip=f"{inner_io}/k{tag}")
        info = dict(info)
        info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
        outer = dict(info, ip=f"{self.io_dir}/k{tag}")
        outer_file = self.io_dir / f"client-{tag}.json"
        outer_file.write_text(json.dumps(outer))
        cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", f"{inner_io}/{inner_file.name}"]
        if self.sandboxed:
            argv = sandbox.sandbox_argv(bwrap, self.io_dir, hidden, self.limits, PACKAGES, KERNEL_ENV) + cmd
            env = {}
        else:
            argv = cmd
            env = dict(KERNEL_ENV, HOME=str(self.io_dir), TMPDIR=str(self.io_dir), PATH=os.environ.get("PATH", ""),
                       IPYTHONDIR=str(self.io_dir / ".ipython"))
        if self.sandboxed:
            self.cgroup = sandbox.Cgroup.create(self.limits, tag)
        try:
            with open(self.io_dir / "kernel-stderr.txt", "wb") as err:  # capped by RLIMIT_FSIZE
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=err, env=env, close_fds=True, cwd=str(self.io_dir),
                                             preexec_fn=sandbox.preexec(self.limits, self.cgroup))
        except (OSError, subprocess.SubprocessError) as exc:
            if self.cgroup is not None:
                self.cgroup.remove()
            raise KernelStartError(f"could not start the kernel: {exc}") from exc
        self.pids.append(self.proc.pid)
        with _LIVE_LOCK:
            _LIVE.add(self)
        threading.Thread(target=self._watch, name=f"watchdog-{tag}", daemon=True).start()
        kc = _Client()
        kc.load_connection_file(str(outer_file))
        kc.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        self.kc = kc
        deadline = time.monotonic() + startup_timeout
        # kernel_info until it answers: the shell socket exists once the kernel is up
        while True:
            if self.proc.poll() is not None:
                raise KernelStartError(f"the kernel exited at start (exit code {self.proc.returncode}): {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise KernelStartError(f"the kernel did not answer within {startup_timeout:.0f} s of starting")
            msg_id = kc.kernel_info()
            got = self._reply(msg_id, min(2.0, max(0.1, deadline - time.monotonic())))
            if got is not None:
                return

    # -- the watchdog ---------------------------------------------------------------------------
    def _io_bytes(self, limit_entries: int = 10_000) -> int:
        """Bytes under the io folder (an over-full folder counts as over the cap)."""
        total, seen, stack = 0, 0, [str(self.io_dir)]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for e in it:
                        seen += 1
                        if seen > limit_entries:
                            return self.limits.io_bytes + 1
                        try:
                            if e.is_dir(follow_symlinks=False):
                                stack.append(e.path)
                            else:
                                total += e.stat(follow_symlinks=False).st_blocks * 512
                        except OSError:
                            pass
            except OSError:
                pass
        return total

    def _tree_usage(self) -> tuple[int, int]:
        """(anonymous memory in bytes, number of processes) of everything under the sandbox."""
        import psutil

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return 0, 0
        anon = 0
        for p in procs:
            try:
                m = p.memory_info()
                anon += max(0, m.rss - getattr(m, "shared", 0))
            except psutil.Error:
                pass
        return anon, len(procs)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            if self.proc is None or self.proc.poll() is not None:
                return
            hit = None
            if self._io_bytes() > self.limits.io_bytes:
                hit = "disk"
            elif self.cgroup is None:
                anon, n = self._tree_usage()
                if anon > self.limits.memory_bytes:
                    hit = "memory"
                elif n > self.limits.max_procs:
                    hit = "processes"
            if hit:
                self.limit_hit = hit
                self._kill_tree()
                return

    def limit_message(self) -> str:
        """Why the sandbox was stopped, for the student ("" if no cap was hit)."""
        hit = self.limit_hit
        if hit is None and self.cgroup is not None and self.cgroup.oom_killed():
            hit = self.limit_hit = "memory"
        return {
            "memory": f"your code used more than {self.limits.memory_bytes / 2**30:g} GiB of memory (all its "
                      "processes together), and the grader stopped it",
            "processes": f"your code started more than {self.limits.max_procs} processes, and the grader stopped it",
            "disk": f"your code wrote more than {self.limits.io_bytes >> 20} MiB to the grader's folder, and the "
                    "grader stopped it",
        }.get(hit or "", "")

    def _stderr_tail(self) -> str:
        try:
            with open(self.io_dir / "kernel-stderr.txt", "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 600))
                return f.read().decode(errors="replace").strip().replace("\n", " | ")
        except OSError:
            return ""

    def _reply(self, msg_id: str, timeout: float):
        """The shell reply to ``msg_id`` within ``timeout`` seconds, else None."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self.kc.get_shell_msg(timeout=min(left, 0.1))
            except queue.Empty:
                if self.proc.poll() is not None:
                    self.dead = True
                    return None
                continue
            except Exception:  # an undecodable message: treat as no answer
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return msg

    def _kernel_pid(self) -> int | None:
        """The outer pid of the Python process of the kernel (a grandchild, under bwrap)."""
        if not self.sandboxed:
            return self.proc.pid
        import psutil

        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                argv = p.cmdline()
                if argv and not argv[0].endswith("bwrap") and "ipykernel_launcher" in argv:
                    return p.pid
        except psutil.Error:
            pass
        return None

    def interrupt(self) -> None:
        pid = self._kernel_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Kill the kernel and everything in its sandbox (its process group, and bwrap's
        PID namespace, which the kernel empties when its first process dies)."""
        self._stop.set()
        if self.kc is not None:
            try:
                self.kc.stop_channels()
            except Exception:
                pass
            self.kc = None
        self._kill_tree()
        if self.cgroup is not None:
            if self.limit_hit is None and self.cgroup.oom_killed():
                self.limit_hit = "memory"
            self.cgroup.remove()
            self.cgroup = None
        self.dead = True
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _kill_tree(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        return False

    # -- running code -------------------------------------------------------------------------
    def execute(self, code: str, timeout: float) -> tuple[str, dict]:
        """Run ``code``; returns (status, info).

        status: ``ok``; ``error`` (info has ename, evalue); ``timeout`` (interrupted in time,
        the kernel lives on); ``killed`` (it ignored the interrupt and was killed);
        ``dead`` (the kernel died).
        """
        if self.dead or self.kc is None:
            return "dead", {}
        try:
            msg_id = self.kc.execute(code, silent=False, store_history=False, allow_stdin=False, stop_on_error=False)
        except Exception:
            self.dead = True
            return "dead", {}
        reply = self._reply(msg_id, timeout)
        if reply is None:
            if self.dead or self.proc.poll() is not None:
                self.kill()
                return "dead", {}
            self.interrupt()
            if self._reply(msg_id, GRACE_S) is not None:
                return "timeout", {}
            self.kill()
            return "killed", {}
        content = reply.get("content", {})
        if content.get("status") == "ok":
            return "ok", {}
        return "error", {"ename": str(content.get("ename", ""))[:200], "evalue": str(content.get("evalue", ""))[:500]}
