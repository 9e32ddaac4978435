"""The student's functions, seen from the grader: proxies that run them in the kernel.

``RemoteNamespace`` is what the public checks and hidden tests receive as ``ns``. Its
entries are :class:`RemoteFunction` proxies: calling one saves the arguments to a file
(``torch.save`` of plain data), runs one fixed request cell in the student's kernel, and
loads the answer from another file with ``torch.load(weights_only=True)``. Only plain
data comes back: ``torch.Tensor`` itself (no subclass, strided, on the CPU, a plain
dtype), ``int``, ``float``, ``bool``, ``str``, ``None`` and lists, tuples and dicts of
those. Anything else makes the call fail. The comparison with the oracle then runs in
the grader's process, on tensors that the student's code can no longer touch.

A gradient is one more request: the proxy's output is attached to the grader's autograd
graph by :class:`_RemoteGrad`, whose backward asks the kernel for the vector-Jacobian
product of the student's function at the same inputs.
"""

from __future__ import annotations

import io
import itertools
import os
import pathlib
import re
import stat
import uuid

import torch

from attention_lib.grading.testing import CheckFailure

__all__ = ["RemoteNamespace", "RemoteFunction", "KernelLost", "KernelTimeout", "NoAnswer", "clean_answer"]

MAX_ANSWER = 64 << 20  # bytes of one answer file (also the kernel's RLIMIT_FSIZE)
MAX_ITEMS = 10_000  # values in one answer (list items, dict entries, tensors), all levels together
MAX_TENSOR_BYTES = 2 * MAX_ANSWER  # bytes of all the answer's tensors once materialised (stride 0 included)
DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool}
SERVE_SOURCE = (pathlib.Path(__file__).with_name("_kernel_side.py")).read_text()
SERVE = "__attention_grader_serve__"


class KernelLost(BaseException):
    """The kernel died (crash, exit, out of memory) during a request.

    BaseException, like KeyboardInterrupt: a check's ``except Exception`` cannot hide it.
    """


class KernelTimeout(KernelLost):
    """A request ran past the timeout (the kernel was interrupted, or killed)."""

    def __init__(self, killed: bool):
        super().__init__("killed" if killed else "interrupted")
        self.killed = killed


class NoAnswer(BaseException):
    """The kernel finished the request without a readable answer."""


class _Opaque:
    """Stands for an object the kernel could not send as plain data."""


def _opaque(type_name: str):
    name = re.sub(r"\W", "_", str(type_name))[:60] or "object"
    return type(name, (_Opaque,), {"__repr__": lambda self: f"<{name} object>"})()


class _Budget:
    """What one answer may still hold: items and materialised tensor bytes."""

    def __init__(self):
        self.items, self.bytes = MAX_ITEMS, MAX_TENSOR_BYTES

    def take(self, items: int = 1, nbytes: int = 0) -> None:
        self.items -= items
        self.bytes -= nbytes
        if self.items < 0:
            raise NoAnswer(f"the answer holds more than {MAX_ITEMS} values")
        if self.bytes < 0:
            raise NoAnswer(f"the answer's tensors hold more than {MAX_TENSOR_BYTES >> 20} MiB")


def clean_answer(x, depth: int = 0, budget: _Budget | None = None):
    """Validate what ``torch.load`` returned: plain data only, exact types (no subclasses),
    at most MAX_ITEMS values and MAX_TENSOR_BYTES of tensor data (counted as materialised,
    so a stride-0 view of one element counts as its full size). Tensors come back as
    contiguous copies that share nothing with the loaded storage."""
    budget = budget or _Budget()
    if depth > 10:
        raise NoAnswer("the answer is nested too deeply")
    budget.take()
    if type(x) is torch.Tensor:
        if x.layout != torch.strided or x.device.type != "cpu" or x.dtype not in DTYPES or x.is_quantized:
            raise NoAnswer(f"the answer holds a tensor the grader does not accept ({x.layout}, {x.device}, {x.dtype})")
        budget.take(0, x.numel() * x.element_size())
        return x.detach().clone(memory_format=torch.contiguous_format)
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) in (list, tuple):
        budget.take(len(x))
        return type(x)(clean_answer(v, depth + 1, budget) for v in x)
    if type(x) is dict:
        budget.take(len(x))
        if set(x) == {"__opaque__"} and type(x["__opaque__"]) is str:
            return _opaque(x["__opaque__"])
        if not all(type(k) is str for k in x):
            raise NoAnswer("the answer holds a dict with keys that are not strings")
        return {k: clean_answer(v, depth + 1, budget) for k, v in x.items()}
    raise NoAnswer(f"the answer holds a {type(x).__name__}, which is not plain data")


def write_request(path: pathlib.Path, obj) -> None:
    """``torch.save(obj)`` to a new regular file at ``path``, never through what is there.

    The student's code shares the folder: whatever sits at ``path`` (a symlink to a host file,
    a FIFO) is unlinked, and the file is created with O_EXCL | O_NOFOLLOW, so the grader writes
    only a file it has just created.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getbuffer())


def read_answer(path: pathlib.Path):
    """Load an answer file written by the kernel: a regular file (not a link, FIFO or device),
    at most MAX_ANSWER bytes, read in one go and unpickled with ``weights_only=True``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise NoAnswer("your kernel's answer is not a regular file")
        if st.st_size > MAX_ANSWER:
            raise NoAnswer(f"your kernel's answer is {st.st_size >> 20} MiB, over the limit of {MAX_ANSWER >> 20} MiB")
        data = f.read(MAX_ANSWER + 1)
    if len(data) > MAX_ANSWER:
        raise NoAnswer(f"your kernel's answer is over the limit of {MAX_ANSWER >> 20} MiB")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise NoAnswer(f"your kernel's answer could not be read as plain data ({type(exc).__name__})") from None


_SIZE_MISMATCH = re.compile(r"size of tensor a \(\d+\) must match the size of tensor b \(\d+\)")


def _error_hint(ename: str, evalue: str) -> str:
    """A sentence on the likely cause of a common error, or ""."""
    if ename == "RuntimeError" and _SIZE_MISMATCH.search(evalue):
        return (". This is a broadcasting error: two tensors whose shapes do not line up met in an elementwise "
                "operation. A reduction without keepdim=True (x.sum(-1) instead of x.sum(-1, keepdim=True)) drops "
                "the axis, so the result no longer lines up with the rows; print the shapes to see which.")
    return ""


def _same(a, b) -> bool:
    """``b`` (sent back after the call) equals ``a`` (what was sent), NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        if type(b) is not torch.Tensor or a.shape != b.shape or a.dtype != b.dtype:
            return False
        a = a.detach()
        return bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else (a == b)).all())
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x


class Channel:
    """Requests to one kernel: a file in, one fixed cell run, a file out."""

    def __init__(self, kernel, io_dir: pathlib.Path, inner_io: str, timeout: float):
        self.kernel, self.io_dir, self.inner_io, self.timeout = kernel, pathlib.Path(io_dir), inner_io, timeout
        self.counter = itertools.count()
        self.slowest = 0.0

    def request(self, req: dict) -> dict:
        import time

        n = next(self.counter)
        req = dict(req, id=uuid.uuid4().hex)
        req_file, res_file = self.io_dir / f"req-{n}.pt", self.io_dir / f"res-{n}.pt"
        try:
            write_request(req_file, req)
        except OSError as exc:  # something of the student's took the name between unlink and create
            raise NoAnswer(f"the grader could not send its request ({exc.strerror})") from None
        code = f"{SERVE}(globals(), {self.inner_io + '/' + req_file.name!r}, {self.inner_io + '/' + res_file.name!r})"
        start = time.monotonic()
        status, info = self.kernel.execute(code, self.timeout)
        self.slowest = max(self.slowest, time.monotonic() - start)
        try:
            req_file.unlink(missing_ok=True)
        except OSError:
            pass
        try:
            if status in ("timeout", "killed"):
                raise KernelTimeout(status == "killed")
            if status == "dead":
                raise KernelLost("dead")
            res = read_answer(res_file)
            if res is None:
                why = f" ({info.get('ename')}: {info.get('evalue')})" if status == "error" else ""
                raise NoAnswer(f"your kernel did not answer the grader's request{why}")
            res = clean_answer(res)
            if type(res) is not dict or res.get("id") != req["id"] or type(res.get("ok")) is not bool:
                raise NoAnswer("your kernel's answer is not an answer to the grader's request")
            return res
        finally:
            for f in (res_file, res_file.with_name(res_file.name + ".part")):
                try:
                    f.unlink(missing_ok=True)
                except OSError:
                    pass


class _RemoteGrad(torch.autograd.Function):
    """Attach a remote call's output to the grader's graph; backward is a remote VJP."""

    @staticmethod
    def forward(ctx, fn, req, out, *inputs):
        ctx.fn, ctx.req = fn, req
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.fn._vjp(ctx.req, grad_out)
        return (None, None, None, *grads)


class RemoteFunction:
    """The student's function ``name``, called in the kernel."""

    def __init__(self, ns: RemoteNamespace, name: str, info: dict):
        self._ns, self.__name__, self.info = ns, name, info

    def __repr__(self) -> str:
        return f"<the student's {self.__name__}>"

    def _request(self, args, kwargs, *, grad=(), measure=False, grad_outputs=None) -> dict:
        req = {"op": "call", "name": self.__name__, "args": [_detached(a) for a in args],
               "kwargs": {k: _detached(v) for k, v in kwargs.items()}, "grad": list(grad),
               "measure": measure, "grad_outputs": grad_outputs}
        res = self._ns.channel().request(req)
        if not res["ok"]:
            ename, evalue, where = (str(res.get(k, "")) for k in ("ename", "evalue", "where"))
            if ename == "NotImplementedError":
                raise CheckFailure(f"`{self.__name__}` is not implemented yet (it raised NotImplementedError).")
            raise CheckFailure(f"`{self.__name__}` raised {ename}: {evalue}{where}{_error_hint(ename, evalue)}")
        return res

    def _check_in_place(self, args, kwargs, res) -> None:
        after_args, after_kwargs = res.get("args"), res.get("kwargs")
        if type(after_args) is not list or len(after_args) != len(args) or type(after_kwargs) is not dict:
            raise NoAnswer("your kernel's answer does not list the arguments after the call")
        for i, (a, b) in enumerate(zip(args, after_args)):
            if not _same(a, b):
                raise CheckFailure(
                    f"`{self.__name__}` modified its argument {i + 1} in place. Do not change the inputs: "
                    "use out-of-place operations (`x = x - m`, not `x -= m` or `x.sub_(m)`).")
        for k, a in kwargs.items():
            if not _same(a, after_kwargs.get(k)):
                raise CheckFailure(
                    f"`{self.__name__}` modified its argument `{k}` in place. Do not change the inputs: "
                    "use out-of-place operations (`x = x - m`, not `x -= m` or `x.sub_(m)`).")

    def __call__(self, *args, **kwargs):
        grad = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad] \
            if torch.is_grad_enabled() else []
        res = self._request(args, kwargs, grad=grad)
        self._check_in_place(args, kwargs, res)
        out = res.get("result")
        if grad and res.get("requires_grad") is True and type(out) is torch.Tensor and out.is_floating_point():
            req = (args, kwargs, grad)
            out = _RemoteGrad.apply(self, req, out, *[args[i] for i in grad])
        return out

    def measure(self, *args, **kwargs):
        """``(result, peak_bytes)``: ``attention_lib.memory.peak_memory`` run in the kernel.

        The byte count is measured in the student's process: see book/coursework.md.
        """
        res = self._request(args, kwargs, measure=True)
        self._check_in_place(args, kwargs, res)
        peak = res.get("peak")
        if type(peak) is not int:
            raise NoAnswer("your kernel's answer has no memory measurement")
        return res.get("result"), peak

    def _vjp(self, req, grad_out):
        args, kwargs, grad = req
        res = self._request(args, kwargs, grad=grad, grad_outputs=grad_out.detach().contiguous())
        grads = res.get("grads")
        if type(grads) is not list or len(grads) != len(grad):
            raise NoAnswer("your kernel's answer has no gradients")
        out = []
        for i, g in zip(grad, grads):
            if g is None:
                g = torch.zeros_like(args[i])
            if type(g) is not torch.Tensor or g.shape != args[i].shape:
                raise CheckFailure(f"the gradient of `{self.__name__}` with respect to argument {i + 1} has the wrong shape.")
            out.append(g.to(args[i].dtype))
        return out


class RemoteNamespace:
    """The notebook's globals as the checks see them: ``name in ns``, ``ns[name]``."""

    def __init__(self, channel_of, cells=()):
        self.channel = channel_of  # a callable: the current kernel's Channel (it may restart)
        self.cells = tuple(cells)  # the submission's code cells, read from the file here (never run here)
        self._info: dict[str, dict | None] = {}

    def _probe(self, name: str):
        if name not in self._info:
            res = self.channel().request({"op": "probe", "names": [name]})
            info = res.get("info") if res.get("ok") else None
            entry = info.get(name) if type(info) is dict else None
            self._info[name] = entry if type(entry) is dict else None
        return self._info[name]

    def __contains__(self, name: str) -> bool:
        return self._probe(name) is not None

    def __getitem__(self, name: str):
        info = self._probe(name)
        if info is None:
            raise KeyError(name)
        if info.get("callable") is not True:
            return _opaque(info.get("type", "object"))
        return RemoteFunction(self, name, info)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def uses(self, name: str) -> list[str]:
        """Global names that the student's function ``name`` refers to (for feedback only)."""
        info = self._probe(name)
        names = info.get("names") if info else None
        return [n for n in names if type(n) is str] if type(names) is list else []
