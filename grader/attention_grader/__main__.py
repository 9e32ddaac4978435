"""Command line of the autograder.

    python -m attention_grader assign MASTER OUT
    python -m attention_grader grade AUTOGRADER SUBMISSION... --out DIR [--timeout S] [--jobs N]
                                     [--memory-gib G] [--no-sandbox]
    python -m attention_grader gradescope AUTOGRADER OUT.zip

Exit codes of ``grade``: 0 every submission was graded; 1 some submission could not be
read (missing, not a notebook), a kernel could not start, or the grader failed on one;
2 bad arguments, not an autograder folder, or no sandbox; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attention_grader", description="The attention course's autograder.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assign", help="split a master notebook into a student notebook and an autograder folder")
    a.add_argument("master", help="the master notebook (.ipynb)")
    a.add_argument("out", help="output folder: OUT/student/ and OUT/autograder/")

    g = sub.add_parser("grade", help="grade submissions, each in its own sandboxed kernel")
    g.add_argument("autograder", help="the autograder folder written by `assign`")
    g.add_argument("submissions", nargs="+", help="submitted notebooks")
    g.add_argument("--out", required=True, help="results go to OUT/<name>/results.json and OUT/summary.csv")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per notebook cell and per call of a student function (default 30)")
    g.add_argument("--submission-timeout", type=float, default=None,
                   help="wall-clock limit per submission in seconds (default max(120, 20 x timeout))")
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at once (default 1)")
    g.add_argument("--memory-gib", type=float, default=2.0, help="address-space limit of each kernel process in GiB (default 2)")
    g.add_argument("--no-sandbox", action="store_true",
                   help="run kernels without bubblewrap (only inside a throwaway container or VM of your own)")

    z = sub.add_parser("gradescope", help="write a Gradescope autograder zip (setup.sh, run_autograder)")
    z.add_argument("autograder", help="the autograder folder written by `assign`")
    z.add_argument("zip", help="the zip file to write")
    return p


def _grade(args) -> int:
    import pathlib

    from . import kernel, sandbox
    from .autograder import Autograder
    from .grader import Options, grade_all

    if args.timeout <= 0 or args.jobs < 1 or args.memory_gib <= 0:
        print("grade: --timeout and --memory-gib must be positive, --jobs at least 1", file=sys.stderr)
        return 2
    try:
        ag = Autograder.load(args.autograder)
    except Exception as exc:
        print(f"grade: {args.autograder} is not an autograder folder written by `assign`: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    opts = Options(timeout=args.timeout, submission_timeout=args.submission_timeout,
                   memory_gib=args.memory_gib, sandbox=not args.no_sandbox)
    if opts.sandbox:
        try:
            opts.bwrap = sandbox.check_bwrap()
        except sandbox.SandboxUnavailable as exc:
            print(f"grade: refusing to grade without a sandbox.\n{exc}", file=sys.stderr)
            return 2
    else:
        print("grade: --no-sandbox: student code runs unconfined, as this user.", file=sys.stderr)
    for s in args.submissions:
        if not pathlib.Path(s).is_file():
            print(f"grade: {s}: no such file (it is graded 0 and the exit code will be 1)", file=sys.stderr)

    width = max(len(pathlib.Path(s).name) for s in args.submissions)
    width = max(width, 12)

    def progress(done, total, name, res):
        print(f"[{done:>{len(str(total))}}/{total}] {name:<{width}} {res['score']:g} / {res['extra_data']['max_score']:g}",
              file=sys.stderr, flush=True)

    try:
        rows = grade_all(ag.folder, args.submissions, args.out, opts=opts, jobs=args.jobs, progress=progress)
    except KeyboardInterrupt:
        kernel.kill_all()
        print("grade: interrupted; no summary was written.", file=sys.stderr)
        return 130
    for name, r in rows:
        print(f"{name}  {r['score']:g} / {r['extra_data']['max_score']:g}")
    print(f"results: {args.out}/<name>/results.json, summary: {args.out}/summary.csv")
    problems = [(n, r) for n, r in rows if r["extra_data"]["problem"]]
    for n, r in problems:
        print(f"grade: {n}: {r['extra_data']['problem']}: {r['output'].splitlines()[0]}", file=sys.stderr)
    return 1 if problems else 0


# Import names that differ from what to pip install.
_PIP_NAMES = {"yaml": "PyYAML", "zmq": "pyzmq", "attention_lib": "attention-lib"}  # the last: not on PyPI


def _missing(cmd: str, exc: ModuleNotFoundError) -> int:
    """A dependency of the grader is not installed: say what to install, not a traceback."""
    name = (exc.name or "").split(".")[0]
    pip_name = _PIP_NAMES.get(name, name)
    just = "" if name == "attention_lib" else f"\nor install just that one: pip install {pip_name}"
    print(f"{cmd}: the autograder needs the package {pip_name!r} (import {name}), which is not installed.\n"
          "Install the grader with its dependencies, from the root of a clone of the course repository:\n"
          f"  pip install -e . -e grader{just}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] == "attention_grader":
            raise  # our own module missing is a bug, not an installation problem
        return _missing(args.cmd, exc)


def _run(args) -> int:
    if args.cmd == "assign":
        from .assign import AssignError, assign

        try:
            paths = assign(args.master, args.out)
        except AssignError as exc:
            print(f"assign: {args.master}: {exc}", file=sys.stderr)
            return 2
        print(f"student notebook: {paths['student']}\nautograder:       {paths['autograder']}")
        return 0
    if args.cmd == "gradescope":
        from .gradescope import write_zip

        try:
            path = write_zip(args.autograder, args.zip)
        except (OSError, ValueError) as exc:
            print(f"gradescope: {exc}", file=sys.stderr)
            return 2
        print(f"Gradescope autograder: {path}")
        return 0
    return _grade(args)


if __name__ == "__main__":
    sys.exit(main())
