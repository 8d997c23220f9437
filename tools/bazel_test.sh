#!/usr/bin/env bash
# CI: the test suite under Bazel, offline. Installs nothing: it needs `bazel` (Debian:
# apt-get install bazel-bootstrap, Bazel 4.2) and the venv at <repo>/.venv (see .ci/run).
# Extra arguments go to `bazel test` (flags and/or targets; no target means //...), e.g.
#   tools/bazel_test.sh //tests:test_config
#   tools/bazel_test.sh --nocache_test_results --local_test_jobs=1
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bazel > /dev/null; then
  echo "bazel not found: apt-get install bazel-bootstrap" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "no venv at $PWD/.venv: create it first (see .ci/run)" >&2
  exit 1
fi

args=("$@")
has_target=0
for a in "$@"; do
  case "$a" in -*) ;; *) has_target=1 ;; esac
done
if [ "$has_target" -eq 0 ]; then args+=(//...); fi

start=$(date +%s)
set +e
bazel test "${args[@]}"
rc=$?
set -e
echo "bazel test ${args[*]}: exit ${rc} in $(( $(date +%s) - start ))s"
exit "$rc"
