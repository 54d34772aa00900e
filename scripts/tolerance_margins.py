"""Runs the test suite with the tolerance audit and lists the comparisons whose measured error
is above a tenth of their bound (the margin rule of ``tests/tolerances.py``).

    python scripts/tolerance_margins.py [pytest arguments]   # default: the whole suite, -n 2

Prints one line per call site: the largest ratio of measured error to bound over every call
and parametrisation, and the test that reached it. Exits 1 when a rounding bound is above the
margin; the bounds of approximate claims (``assert_approximately``, marked ``appr``) are the
approximation's size and are listed, not held to the margin.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import subprocess
import sys
import tempfile


def main(argv: list[str]) -> int:
    margin = 0.1
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TOLERANCE_AUDIT": tmp}
        args = argv or ["-q", "-n", "2"]
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], env=env
        )
        worst: dict[str, tuple[float, str]] = {}
        approximations: set[str] = set()
        calls = collections.Counter()
        for path in glob.glob(os.path.join(tmp, "*.jsonl")):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    calls[r["where"]] += 1
                    if r.get("kind") == "approximation":
                        approximations.add(r["where"])
                    if r["ratio"] >= worst.get(r["where"], (-1.0, ""))[0]:
                        worst[r["where"]] = (r["ratio"], r["test"])
    over = {k: v for k, v in worst.items() if v[0] > margin and k not in approximations}
    for where, (ratio, test) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
        flag = "OVER" if where in over else "appr" if where in approximations else "ok  "
        print(f"{flag} {ratio:9.3g}  {where:40s} ({calls[where]} calls) {test}")
    print(
        f"{len(worst)} call sites, {len(over)} above {margin:g} of their bound; pytest exit {code}"
    )
    return 1 if over or code else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
