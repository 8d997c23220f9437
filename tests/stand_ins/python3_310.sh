#!/bin/bash
# Stand-in for the TPU VM image's python3: Python 3.10, without the python3.10-venv package.
case "${1-}" in
  --version|-V) echo "Python 3.10.12" ;;
  -m)
    if [[ "${2-}" == venv ]]; then
      echo "The virtual environment was not created successfully because ensurepip is not" \
        "available. On Debian/Ubuntu systems, you need to install the python3-venv package" >&2
    else
      echo "python3.10: No module named ${2-}" >&2
    fi
    exit 1 ;;
  *) echo "Python 3.10 cannot run this (jax 0.10.2 needs Python >= 3.11)" >&2; exit 1 ;;
esac
