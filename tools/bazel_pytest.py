"""Bazel py_test main: runs pytest on one test file from the runfiles tree, exits with its code.

Usage (from tests/BUILD): args = ["$(rootpath test_x.py)"]. Bazel runs tests with the workspace's
runfiles directory as the working directory, so the path is relative to it, pyproject.toml there
makes it pytest's rootdir, and tests/conftest.py (also in the runfiles) is loaded.
"""

import os
import sys

import pytest


def main(argv):
  if len(argv) < 2:
    print("usage: bazel_pytest.py TEST_FILE [pytest args...]", file=sys.stderr)
    return 2
  sys.dont_write_bytecode = True  # no __pycache__ next to the runfiles symlinks
  # -q comes from pyproject.toml's addopts (it is in the runfiles, as pytest's rootdir/inifile).
  args = [argv[1], "-p", "no:cacheprovider"]
  tmp = os.environ.get("TEST_TMPDIR")
  if tmp:
    args.append("--basetemp=" + os.path.join(tmp, "pytest"))
  xml = os.environ.get("XML_OUTPUT_FILE")
  if xml:
    args.append("--junitxml=" + xml)
  rc = pytest.main(args + argv[2:])
  # pytest exits 5 when it collected no test: a test target that tests nothing is a failure.
  if rc == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("no tests were collected from " + argv[1], file=sys.stderr)
  return int(rc)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
