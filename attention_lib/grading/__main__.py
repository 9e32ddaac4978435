"""Command line: ``python -m attention_lib.grading {assign,grade} ...``.

    python -m attention_lib.grading assign coursework/a1_softmax/master.ipynb out/
    python -m attention_lib.grading grade out/autograder submissions/*.ipynb --timeout 30
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attention_lib.grading", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("assign", help="strip solutions and hidden tests from a master notebook")
    a.add_argument("master", help="the master notebook (.ipynb)")
    a.add_argument("out", help="output folder: out/student/ and out/autograder/")

    g = sub.add_parser("grade", help="grade submissions, each in its own kernel")
    g.add_argument("autograder", help="the autograder folder written by `assign`")
    g.add_argument("submissions", nargs="+", help="submitted notebooks")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per notebook cell and per test (default 30)")
    g.add_argument("--submission-timeout", type=float, default=None,
                   help="wall-clock limit per submission in seconds (default max(120, 20 x timeout))")
    g.add_argument("--out", default="graded", help="where results go (default ./graded)")
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at once, each in its own kernel")
    args = p.parse_args(argv)

    if args.cmd == "assign":
        from .assign import AssignError, assign

        try:
            paths = assign(args.master, args.out)
        except AssignError as exc:
            print(f"assign: {args.master}: {exc}", file=sys.stderr)
            return 2
        print(f"student notebook: {paths['student']}\nautograder:       {paths['autograder']}")
        return 0

    from .grader import Autograder, grade_all

    try:
        Autograder.load(args.autograder)
    except (OSError, ValueError, KeyError, SyntaxError) as exc:
        print(f"grade: {args.autograder} is not an autograder folder written by `assign`: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    results = grade_all(args.autograder, args.submissions, args.out, timeout=args.timeout,
                        submission_timeout=args.submission_timeout, jobs=args.jobs)
    width = max(len(r["_name"]) for r in results)
    for r in results:
        print(f"{r['_name']:<{width}}  {r['score']:g} / {r['extra_data']['max_score']:g}")
    print(f"results: {args.out}/<submission>/results.json, summary: {args.out}/summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
