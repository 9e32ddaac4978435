"""The sandbox of one submission: a bubblewrap (``bwrap``) command line and OS limits.

What the kernel of a submission gets (see book/coursework.md, "What is protected"):

* a new, empty root in which only what Python needs is bound **read-only**: ``/usr``,
  ``/etc``, the interpreter's prefixes and the folders on ``sys.path`` (a folder on
  ``sys.path`` that contains something to hide, such as a repository root with an
  editable install, is replaced by the packages the kernel needs from it);
* a private ``/tmp`` (a tmpfs of ``scratch_mib``, also its home and working folder), a
  private ``/dev/shm`` (a tmpfs of ``shm_mib``) and
  one bound folder, ``/io``, through which it talks to the grader;
* new user, PID, network, IPC, UTS and cgroup namespaces (no network; it sees only its
  own processes; when the sandbox ends, every process in it is killed), no capabilities,
  user ``nobody``, a new session (no terminal), a cleared environment;
* ``RLIMIT_AS`` (the memory cap, per process), ``RLIMIT_FSIZE`` (the largest file it may
  write) and ``RLIMIT_CORE = 0``, set before ``bwrap`` starts and inherited;
* where the grader may create cgroups (root, or a delegated cgroup v2 tree), a memory
  cgroup holding the memory cap for **all** the sandbox's processes together (tmpfs pages
  included) and a pids cgroup (at most ``max_procs`` processes): :class:`Cgroup`. Without
  them, the grader's watchdog (:mod:`.kernel`) sums the sandbox's memory and counts its
  processes four times a second and kills the sandbox over the caps;
* inside, the user is ``nobody`` (65534) without capabilities; when the grader runs as
  root, that user is root's own uid mapped into the user namespace, so it may read
  whatever is bound whatever its permissions: which is why only the folders above are.
"""

from __future__ import annotations

import os
import pathlib
import resource
import shutil
import subprocess
import sys

__all__ = ["SandboxUnavailable", "Limits", "Cgroup", "bwrap_path", "check_bwrap", "sandbox_argv", "preexec",
           "INSTALL_HINT"]

INSTALL_HINT = (
    "The grader runs every submission in a bubblewrap sandbox, and `bwrap` is not usable here.\n"
    "Install it with `apt-get install bubblewrap` (Debian/Ubuntu; `make bwrap` does it when root),\n"
    "`dnf install bubblewrap` (Fedora) or `apk add bubblewrap` (Alpine). If you run the grader\n"
    "inside a throwaway container or virtual machine of your own, you may pass --no-sandbox instead:\n"
    "student code then runs unconfined, as your user, with your files and your network."
)
SANDBOX_UID = 65534  # nobody
# what a Python kernel needs from /etc (not passwords, keys or the host's configuration)
ETC = ["ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "alternatives", "passwd", "group"]
IO_DIR = "/io"
HOME = "/tmp"


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot create namespaces here."""


class Limits:
    """OS limits for one kernel (all inherited by what the student starts)."""

    def __init__(self, memory_gib: float = 2.0, file_mib: int = 64, scratch_mib: int = 256, io_mib: int = 192,
                 max_procs: int = 64, shm_mib: int = 64):
        self.memory_bytes = int(memory_gib * 2**30)  # all the sandbox's processes together
        self.file_bytes = int(file_mib * 2**20)  # one file
        self.scratch_bytes = int(scratch_mib * 2**20)  # its /tmp (a tmpfs: memory, counted in memory_bytes)
        self.shm_bytes = int(shm_mib * 2**20)  # its /dev/shm (a tmpfs too)
        self.io_bytes = int(io_mib * 2**20)  # its /io folder (on the grader's disk), checked by the watchdog
        self.max_procs = max_procs  # processes and threads (pids cgroup) / processes (watchdog)


class Cgroup:
    """A memory and a pids cgroup for one sandbox, if this process may create them.

    cgroup v1 (``/sys/fs/cgroup/{memory,pids}``) or v2 (a group under the root of the
    unified hierarchy, when its ``cgroup.subtree_control`` has ``memory`` and ``pids``).
    ``Cgroup.create(limits)`` returns None when neither is writable (not root, no
    delegation); the watchdog then enforces the caps.
    """

    ROOT = pathlib.Path("/sys/fs/cgroup")

    def __init__(self, dirs: list[pathlib.Path], version: int):
        self.dirs, self.version = dirs, version

    @classmethod
    def create(cls, limits: Limits, tag: str) -> Cgroup | None:
        name = f"attention-grader-{os.getpid()}-{tag}"
        try:
            if (cls.ROOT / "memory" / "memory.limit_in_bytes").exists() and (cls.ROOT / "pids").is_dir():
                mem, pids = cls.ROOT / "memory" / name, cls.ROOT / "pids" / name
                mem.mkdir()
                group = cls([mem], 1)
                pids.mkdir()
                group.dirs.append(pids)
                (mem / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
                if (mem / "memory.memsw.limit_in_bytes").exists():  # swap counts too
                    (mem / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes))
                (pids / "pids.max").write_text(str(4 * limits.max_procs))  # threads count as pids
                return group
            control = cls.ROOT / "cgroup.subtree_control"
            if control.exists() and {"memory", "pids"} <= set(control.read_text().split()):
                d = cls.ROOT / name
                d.mkdir()
                group = cls([d], 2)
                (d / "memory.max").write_text(str(limits.memory_bytes))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(4 * limits.max_procs))
                return group
        except OSError:
            if "group" in locals():
                group.remove()
        return None

    def join(self) -> None:
        """Move the calling process into the group (from ``preexec_fn``, before exec)."""
        for d in self.dirs:
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for memory."""
        try:
            d = self.dirs[0]
            name = "memory.oom_control" if self.version == 1 else "memory.events"
            fields = dict(line.split()[:2] for line in (d / name).read_text().splitlines() if line.strip())
            return int(fields.get("oom_kill", 0)) > 0
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        """Kill what is left in the group and delete it."""
        import signal
        import time

        for _ in range(50):
            left = []
            for d in self.dirs:
                try:
                    left += [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    pass
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            gone = True
            for d in self.dirs:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    gone = False
            if gone:
                return
            time.sleep(0.05)


def bwrap_path() -> str | None:
    return shutil.which("bwrap") or (("/usr/bin/bwrap") if os.path.exists("/usr/bin/bwrap") else None)


def check_bwrap() -> str:
    """The path of a bwrap that works here, else raise SandboxUnavailable with the install hint."""
    path = bwrap_path()
    if path is None:
        raise SandboxUnavailable(INSTALL_HINT)
    probe = [path, "--ro-bind", "/", "/", "--unshare-all", "--unshare-user", "--die-with-parent", "--cap-drop", "ALL",
             "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "true"]
    try:
        r = subprocess.run(probe, capture_output=True, timeout=30, preexec_fn=preexec(Limits()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"`{path}` could not run ({exc}).\n{INSTALL_HINT}") from exc
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()
        raise SandboxUnavailable(
            f"`{path}` is installed but cannot create a sandbox here: {err}\n"
            "(it needs root, or unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1).\n"
            + INSTALL_HINT
        )
    return path


def _under(path: pathlib.Path, root: pathlib.Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _package_dirs(packages: list[str]) -> list[pathlib.Path]:
    """The folders of ``packages`` as imported by this interpreter (editable installs too)."""
    import importlib.util

    out = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            out += [pathlib.Path(p).resolve() for p in spec.submodule_search_locations]
        elif spec is not None and spec.origin:
            out.append(pathlib.Path(spec.origin).resolve())
    return out


def readonly_paths(hidden: list[pathlib.Path], packages: list[str]) -> list[pathlib.Path]:
    """What the kernel may read: system folders, Python's prefixes and sys.path, minus ``hidden``.

    A candidate folder that contains a hidden path (a repository with the masters, say) is
    not bound; the ``packages`` found in it are bound instead.
    """
    hidden = [h.resolve() for h in hidden]
    cwd = pathlib.Path.cwd().resolve()
    cands = [pathlib.Path("/usr")] + [pathlib.Path("/etc") / e for e in ETC]
    cands += [pathlib.Path(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    cands += [pathlib.Path(p) for p in sys.path if p and os.path.isdir(p)]
    cands.append(pathlib.Path(sys.executable).resolve().parent)
    out: list[pathlib.Path] = []
    for c in cands:
        c = c.resolve()
        if not c.exists() or c == pathlib.Path("/") or c == cwd:  # never the caller's own folder
            continue
        if any(_under(h, c) for h in hidden):  # binding c would show a hidden path
            continue
        out.append(c)
    for p in _package_dirs(packages):
        if not any(_under(p, h) for h in hidden):
            out.append(p)
    # keep the outermost folders only, in a stable order
    keep: list[pathlib.Path] = []
    for p in sorted(set(out), key=lambda p: (len(p.parts), str(p))):
        if not any(_under(p, k) for k in keep):
            keep.append(p)
    return keep


def sandbox_argv(bwrap: str, io_dir: pathlib.Path, hidden: list[pathlib.Path], limits: Limits,
                 packages: list[str], env: dict[str, str]) -> list[str]:
    """``bwrap ... --`` for one kernel (append the kernel's command)."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    for link in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        p = pathlib.Path("/" + link)
        if p.is_symlink():
            argv += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            argv += ["--ro-bind", str(p), str(p)]
    # /tmp first: the read-only binds below may live under it (a clone in /tmp) and must land on top.
    argv += ["--size", str(limits.scratch_bytes), "--tmpfs", "/tmp"]
    bound = readonly_paths(hidden, packages)
    for p in bound:
        argv += ["--ro-bind", str(p), str(p)]
    for h in hidden:  # a hidden folder inside a bound one: cover it with an empty tmpfs
        h = h.resolve()
        if h.is_dir() and any(_under(h, b) for b in bound):
            argv += ["--tmpfs", str(h)]
    # bwrap's /dev has a /dev/shm that any process may fill: give it a small tmpfs of its own
    argv += ["--dev", "/dev", "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm", "--proc", "/proc",
             "--bind", str(io_dir), IO_DIR, "--chdir", HOME, "--"]
    return argv


def preexec(limits: Limits, cgroup: Cgroup | None = None):
    """A ``preexec_fn`` that sets the OS limits (inherited by bwrap and everything below it)."""

    def apply() -> None:
        if cgroup is not None:
            cgroup.join()
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()  # its own process group: the grader's Ctrl-C does not reach it

    return apply
