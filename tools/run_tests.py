"""Runs the test suite once per Keras backend, each in its own process.

Usage: python tools/run_tests.py [--backends jax,tensorflow,torch] [pytest args...]

A backend whose package is not installed is reported as SKIPPED (never as
passed). Exit status is non-zero if any backend run fails or if no test ran
at all (pytest's "no tests collected", exit 5, counts as a failure).
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys

BACKENDS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args, pytest_args = parser.parse_known_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for backend in args.backends.split(","):
        if importlib.util.find_spec(BACKENDS[backend]) is None:
            results[backend] = ("SKIPPED", f"package {BACKENDS[backend]!r} is not installed", 0)
            continue
        env = dict(os.environ, KERAS_BACKEND=backend)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        print(f"\n===== KERAS_BACKEND={backend}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode == 0:
            status = "OK"
        elif proc.returncode == 5:
            status = "FAILED (no tests ran)"
        else:
            status = f"FAILED (exit {proc.returncode})"
        results[backend] = (status, summary, proc.returncode)
    print("\n===== per-backend results")
    passed = failed = skipped = 0
    for backend, (status, summary, _) in results.items():
        print(f"{backend:>10}: {status:<22} {summary}")
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", summary):
            if word == "passed":
                passed += int(n)
            elif word == "skipped":
                skipped += int(n)
            else:
                failed += int(n)
    ran_any = any(s == "OK" for s, _, _ in results.values())
    bad = [b for b, (s, _, _) in results.items() if s.startswith("FAILED")]
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if bad or not ran_any else 0


if __name__ == "__main__":
    sys.exit(main())
