#!/bin/bash
# Stand-in for curl on a worker: `curl ... https://astral.sh/uv/install.sh` prints an installer that
# puts the uv stand-in in ~/.local/bin, as the real installer does. Anything else fails (no network).
for a in "$@"; do
  if [[ "$a" == https://astral.sh/uv/*install.sh ]]; then
    echo 'mkdir -p "$HOME/.local/bin" && cp "@UV@" "$HOME/.local/bin/uv" && echo "installed uv"'
    exit 0
  fi
done
echo "curl: (6) Could not resolve host" >&2
exit 6
