"""The autograder moved to its own package, ``attention_grader`` (in ``grader/``)."""

import sys

if __name__ == "__main__":
    print("The instructors' autograder is its own package now: pip install -e grader, then\n"
          "  python -m attention_grader assign MASTER OUT\n"
          "  python -m attention_grader grade AUTOGRADER SUBMISSION... --out DIR", file=sys.stderr)
    sys.exit(2)
