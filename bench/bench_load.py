"""200 concurrent agents against one ganymede-api: runs tests/test_load.py (which asserts zero errors and
zero lost) and records the latencies it prints in BENCHMARKS.md, with the date, machine and command.

    .venv/bin/python bench/bench_load.py
"""
import os
import subprocess
import sys

import common


def main():
    common.require_services()
    test = os.path.join(common.ROOT, "tests", "test_load.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test],
                          cwd=common.ROOT, capture_output=True, text=True)
    figures = [line[len("FIGURES "):] for line in proc.stdout.splitlines() if line.startswith("FIGURES ")]
    if proc.returncode != 0 or not figures:
        sys.exit(f"tests/test_load.py failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    common.record(common.command_line(__file__), figures[-1])
    print(figures[-1])


if __name__ == "__main__":
    main()
