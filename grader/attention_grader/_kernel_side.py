# The only code the grader runs in a student's kernel, sent as one cell after the
# student's own cells. It holds nothing secret: it loads a request (plain data) from a
# file, calls the student's function and saves what came back (plain data) to another
# file. The student may replace or break it; the grader then gets no answer, or an
# answer that it checks like any other: every verdict is made in the grader's process.


def __attention_grader_serve__(ns, req_path, res_path):
    import os
    import traceback

    import torch

    def plain(x, depth=0):
        if depth > 8:
            return {"__opaque__": "deeply nested object"}
        if isinstance(x, torch.Tensor):
            try:
                t = torch.Tensor.as_subclass(x.detach(), torch.Tensor)
                return t.clone() if t.layout == torch.strided else {"__opaque__": f"{t.layout} tensor"}
            except Exception:
                return {"__opaque__": type(x).__name__}
        if x is None or type(x) in (bool, int, float, str):
            return x
        if isinstance(x, (list, tuple)):
            return (list if type(x) is list else tuple)(plain(v, depth + 1) for v in list(x)[:10000])
        if type(x) is dict:
            return {str(k): plain(v, depth + 1) for k, v in list(x.items())[:10000]}
        return {"__opaque__": type(x).__name__}

    res = {}
    try:
        req = torch.load(req_path, weights_only=True)
        res["id"] = req["id"]
        if req["op"] == "probe":
            info = {}
            for name in req["names"]:
                if name not in ns:
                    info[name] = None
                    continue
                v = ns[name]
                code = getattr(v, "__code__", None)
                info[name] = {"callable": callable(v), "type": type(v).__name__,
                              "names": [str(n) for n in getattr(code, "co_names", ())]}
            res["info"] = info
            res["ok"] = True
        else:
            fn = ns[req["name"]]
            args, kwargs, grad = list(req["args"]), dict(req["kwargs"]), list(req["grad"])
            for i in grad:
                args[i] = args[i].requires_grad_(True)
            torch.manual_seed(0)
            with (torch.enable_grad() if grad else torch.no_grad()):
                if req["measure"]:
                    from attention_lib.memory import peak_memory

                    out, peak = peak_memory(fn, *args, **kwargs)
                    res["peak"] = int(peak)
                else:
                    out = fn(*args, **kwargs)
                if req["grad_outputs"] is not None:
                    inputs = [args[i] for i in grad]
                    res["grads"] = [plain(g) for g in torch.autograd.grad(out, inputs, req["grad_outputs"], allow_unused=True)]
            res["requires_grad"] = bool(isinstance(out, torch.Tensor) and out.requires_grad)
            res["result"] = plain(out)
            res["args"] = [plain(a) for a in args]  # after the call: the grader looks for in-place changes
            res["kwargs"] = {k: plain(v) for k, v in kwargs.items()}
            res["ok"] = True
    except BaseException as exc:  # the student's error, reported as data
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "ipykernel_" in f.filename or f.filename.startswith("<ipython-input")]
        where = ""
        if frames:
            f = frames[-1]
            where = f" (in `{f.name}`, line {f.lineno}: `{(f.line or '').strip()[:120]}`)"
        msg = str(exc).strip().splitlines()
        res.update(ok=False, ename=type(exc).__name__, evalue=(msg[0][:300] if msg else ""), where=where)
    torch.save(res, res_path + ".part")
    os.replace(res_path + ".part", res_path)
