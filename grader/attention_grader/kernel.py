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
  ``MAXMSGSIZE``): an oversized reply drops the connection, and the call times out.
* Nothing printed decides anything: :mod:`.remote` reads answers from files.
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

MAX_MESSAGE = 1 << 20  # bytes: the largest shell message the grader accepts
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
        try:
            with open(self.io_dir / "kernel-stderr.txt", "wb") as err:  # capped by RLIMIT_FSIZE
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=err, env=env, close_fds=True,
                                         cwd=str(self.io_dir), preexec_fn=sandbox.preexec(self.limits))
        except OSError as exc:
            raise KernelStartError(f"could not start the kernel: {exc}") from exc
        self.pids.append(self.proc.pid)
        with _LIVE_LOCK:
            _LIVE.add(self)
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
        if self.kc is not None:
            try:
                self.kc.stop_channels()
            except Exception:
                pass
            self.kc = None
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
        self.dead = True
        with _LIVE_LOCK:
            _LIVE.discard(self)

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
