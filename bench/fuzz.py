"""Run the fuzz tests at length: far more examples than CI runs, freshly drawn.

    python bench/fuzz.py --examples 200000            # about 200,000 examples over the tests
    python bench/fuzz.py --examples 50000 --seed 7    # repeatable
    python bench/fuzz.py -k mutated                   # one property only

The properties are those of ``tests/test_fuzz.py``; this script only scales them
(``LAZYLLAMA_FUZZ_EXAMPLES``) and draws new examples (``LAZYLLAMA_FUZZ_RANDOM``) instead of the
fixed ones CI uses. A failure prints the shrunk input and a ``@reproduce_failure`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200_000, help="total, spread over tests")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: fresh)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("-x", dest="exitfirst", action="store_true", help="stop at the first bug")
    args = parser.parse_args(argv)

    os.environ["LAZYLLAMA_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["LAZYLLAMA_FUZZ_RANDOM"] = "1"
    os.environ.setdefault("LAZYLLAMA_DISABLE_PROGRESS_BARS", "1")

    import pytest

    pytest_args = [str(ROOT / "tests" / "test_fuzz.py"), "-q", "-p", "no:cacheprovider"]
    pytest_args += ["--hypothesis-show-statistics", "--rootdir", str(ROOT)]
    if args.seed is not None:
        pytest_args.append(f"--hypothesis-seed={args.seed}")
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    if args.exitfirst:
        pytest_args.append("-x")
    return int(pytest.main(pytest_args))


if __name__ == "__main__":
    sys.exit(main())
