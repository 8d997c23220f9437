"""Stand-in for `gcloud` in the tests of tpu_scripts/: a fake Cloud TPU on this machine.

Records every call (argv, one JSON line in $FAKE_GCLOUD_ROOT/calls.jsonl) and keeps TPU VMs and queued
resources in state.json. `ssh --command=C` runs C with bash in each worker's directory
(nodes/<node>/w<i>, also its $HOME) with a remote-like environment (none of the caller's variables),
and like ssh returns only when C's output is closed. Tests steer it with files in the root:
fail/<create|ssh|describe> holds how many of the next such calls fail (a stockout, ssh keys not yet there);
qr_state_on_create is the state a new queued resource gets (default ACTIVE).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.environ["FAKE_GCLOUD_ROOT"]
STATE = os.path.join(ROOT, "state.json")
WORKERS = int(os.environ.get("FAKE_WORKERS", "2"))


def load():
  if not os.path.exists(STATE):
    return {"nodes": {}, "qrs": {}}
  with open(STATE) as f:
    return json.load(f)


def save(state):
  with open(STATE + ".tmp", "w") as f:
    json.dump(state, f, indent=1)
  os.replace(STATE + ".tmp", STATE)


def should_fail(kind):
  path = os.path.join(ROOT, "fail", kind)
  if not os.path.exists(path):
    return False
  n = int(open(path).read() or 0)
  if n <= 0:
    return False
  open(path, "w").write(str(n - 1))
  return True


def error(msg, rc=1):
  print(f"ERROR: {msg}", file=sys.stderr)
  sys.exit(rc)


def split(args):
  pos, flags = [], {}
  for a in args:
    if a.startswith("--"):
      k, _, v = a[2:].partition("=")
      flags[k] = v
    else:
      pos.append(a)
  return pos, flags


def homes(state, node_names, worker):
  out = []
  for name in node_names:
    node = state["nodes"].get(name)
    if node is None:
      error(f"NOT_FOUND: node {name} was not found", 1)
    if node["state"] != "READY":
      error(f"node {name} is {node['state']}, not READY", 255)
    ws = range(node["workers"]) if worker == "all" else [int(worker)]
    out += [os.path.join(ROOT, "nodes", name, f"w{w}") for w in ws]
  return out


def make_node(state, name, args):
  state["nodes"][name] = {"state": "READY", "workers": WORKERS, "create_args": args}
  for w in range(WORKERS):
    os.makedirs(os.path.join(ROOT, "nodes", name, f"w{w}"), exist_ok=True)


def kill_trainers(name):
  """A deleted VM takes its processes with it."""
  d = os.path.join(ROOT, "nodes", name)
  for base, _, files in os.walk(d):
    for f in files:
      if f.startswith("trainer-") and f.endswith(".json"):
        try:
          os.kill(json.load(open(os.path.join(base, f)))["pid"], signal.SIGKILL)
        except (ProcessLookupError, ValueError, KeyError):
          pass
  shutil.rmtree(d, ignore_errors=True)


def ssh(home_dirs, command):
  rc = 0
  for home in home_dirs:
    os.makedirs(home, exist_ok=True)
    env = {"HOME": home, "USER": "tpu", "LANG": "C.UTF-8",
           "PATH": f"{os.environ['FAKE_REMOTE_BIN']}:/usr/bin:/bin"}
    # Like ssh: stream the output, and return once the remote command exits AND its output is closed.
    p = subprocess.Popen(["bash", "-c", command], cwd=home, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    tag = f"{os.path.basename(os.path.dirname(home))}/{os.path.basename(home)}"
    for line in p.stdout:
      print(f"{tag}: {line.decode(errors='replace').rstrip()}", flush=True)
    p.wait()
    rc = rc or p.returncode
  return rc


def scp(home_dirs, src, dest):
  for home in home_dirs:
    os.makedirs(home, exist_ok=True)
    shutil.copy(src, os.path.join(home, dest.split(":", 1)[1] or os.path.basename(src)))


def main(argv):
  with open(os.path.join(ROOT, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  if argv[:3] == ["config", "get-value", "project"]:
    print(os.environ.get("FAKE_PROJECT", ""))
    return 0
  if argv[:2] != ["compute", "tpus"]:
    error(f"stand-in gcloud does not know: {argv}")
  kind, verb, rest = argv[2], argv[3], argv[4:]
  pos, flags = split(rest)
  state = load()
  if kind == "tpu-vm":
    name = pos[0] if verb != "scp" else pos[1].split(":")[0]
    if verb == "create":
      if should_fail("create"):
        error("(gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more capacity "
              "in the zone")
      if name in state["nodes"]:
        error(f"ALREADY_EXISTS: node {name}")
      make_node(state, name, rest)
    elif verb == "describe":
      if should_fail("describe"):
        error("(gcloud.compute.tpus.tpu-vm.describe) There was a problem refreshing your current "
              "auth tokens: Connection reset by peer")
      if name not in state["nodes"]:
        error(f"(gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'nodes/{name}' was not "
              "found")
      print(state["nodes"][name]["state"])
    elif verb == "delete":
      if state["nodes"].pop(name, None) is None:
        error(f"NOT_FOUND: node {name}")
      kill_trainers(name)
    elif verb == "ssh":
      if should_fail("ssh"):
        error("ssh: connect to host 10.0.0.2 port 22: Connection refused", 255)
      return ssh(homes(state, [name], flags.get("worker", "0")), flags["command"])
    elif verb == "scp":
      if should_fail("ssh"):
        error("scp: connect to host 10.0.0.2 port 22: Connection refused", 1)
      scp(homes(state, [name], flags.get("worker", "0")), pos[0], pos[1])
    else:
      error(f"unknown tpu-vm verb {verb}")
  elif kind == "queued-resources":
    name = pos[0] if verb != "scp" else pos[1].split(":")[0]
    qr = state["qrs"].get(name)
    if verb == "create":
      if should_fail("create"):
        error("RESOURCE_EXHAUSTED: no capacity")
      if "node-id" in flags:
        nodes = [flags["node-id"]]
      else:
        nodes = [f"{flags['node-prefix']}-{i}" for i in range(int(flags["node-count"]))]
      st_file = os.path.join(ROOT, "qr_state_on_create")
      st = open(st_file).read().strip() if os.path.exists(st_file) else "ACTIVE"
      state["qrs"][name] = {"state": st, "nodes": nodes, "create_args": rest}
      for n in nodes:
        make_node(state, n, rest)
    elif verb == "describe":
      if qr is None:
        error(f"NOT_FOUND: queued resource {name}")
      print(qr["state"])
    elif verb == "delete":
      if qr is None:
        error(f"NOT_FOUND: queued resource {name}")
      for n in state["qrs"].pop(name)["nodes"]:
        state["nodes"].pop(n, None)
        kill_trainers(n)
    elif verb in ("ssh", "scp"):
      if qr is None:
        error(f"NOT_FOUND: queued resource {name}")
      node = flags.get("node", "0")
      nodes = qr["nodes"] if node == "all" else [qr["nodes"][int(node)]]
      if verb == "ssh":
        if should_fail("ssh"):
          error("ssh: connect to host 10.0.0.2 port 22: Connection refused", 255)
        return ssh(homes(state, nodes, flags.get("worker", "0")), flags["command"])
      if should_fail("ssh"):
        error("scp: connect to host 10.0.0.2 port 22: Connection refused", 1)
      scp(homes(state, nodes, flags.get("worker", "0")), pos[0], pos[1])
    else:
      error(f"unknown queued-resources verb {verb}")
  save(state)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
