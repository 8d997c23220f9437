"""Stand-in for `uv` on a fake worker or cluster node: venvs and installs without a network.

`uv venv --python X DIR` makes DIR/bin/python this test's interpreter when X >= 3.11, else the
image's python3 (3.10, the stand-in next to this file). `uv pip install` writes what it would install
(the -r files expanded) to <venv>/installed.txt and, like pip, refuses jax on Python < 3.11.
"""
import os
import sys

REAL_PY = "@REAL_PY@"
PY310 = "@PY310@"


def version_of(request):
  try:
    return tuple(int(p) for p in request.split(".")[:2])
  except ValueError:
    return (0, 0)


def requirements(path, seen=()):
  out = []
  for line in open(path):
    line = line.split("#", 1)[0].strip()
    if line.startswith("-r"):
      out += requirements(os.path.join(os.path.dirname(path), line[2:].strip()))
    elif line:
      out.append(line)
  return out


def main(args):
  if args[:1] == ["--version"]:
    print("uv 0.0.0 (stand-in)")
    return 0
  if args[:1] == ["venv"]:
    request, target, rest = None, ".venv", args[1:]
    i = 0
    while i < len(rest):
      a = rest[i]
      if a == "--python":
        request, i = rest[i + 1], i + 2
        continue
      if a.startswith("--python="):
        request = a.split("=", 1)[1]
      elif not a.startswith("-"):
        target = a
      i += 1
    new = request is not None and version_of(request) >= (3, 11)
    bindir = os.path.join(target, "bin")
    os.makedirs(bindir, exist_ok=True)
    py = os.path.join(bindir, "python")
    with open(py, "w") as f:  # exec keeps the pid: the trainer's pid is this python's
      f.write(f'#!/bin/sh\nexec "{REAL_PY if new else PY310}" "$@"\n')
    os.chmod(py, 0o755)
    with open(os.path.join(target, "stand-in.cfg"), "w") as f:
      f.write(f"version = {'3.11' if new else '3.10'}\n")
    with open(os.path.join(bindir, "activate"), "w") as f:
      f.write(f'export VIRTUAL_ENV="{os.path.abspath(target)}"\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    return 0
  if args[:2] == ["pip", "install"]:
    rest, venv, reqs = args[2:], os.environ.get("VIRTUAL_ENV", ".venv"), []
    i = 0
    while i < len(rest):
      a = rest[i]
      if a in ("--python", "-r", "-e"):
        v = rest[i + 1]
        if a == "--python":
          venv = os.path.dirname(os.path.dirname(v))
        elif a == "-r":
          reqs += requirements(v)
        else:
          reqs.append(f"-e {v}")
        i += 2
        continue
      if not a.startswith("-"):
        reqs.append(a)
      i += 1
    cfg = os.path.join(venv, "stand-in.cfg")
    if not os.path.exists(cfg):
      print(f"error: no virtual environment at {venv}", file=sys.stderr)
      return 2
    if "3.10" in open(cfg).read() and any(r.startswith("jax") for r in reqs):
      print("error: No solution found: jax==0.10.2 requires Python>=3.11", file=sys.stderr)
      return 1
    with open(os.path.join(venv, "installed.txt"), "a") as f:
      f.writelines(r + "\n" for r in reqs)
    return 0
  print(f"stand-in uv does not know: {args}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
