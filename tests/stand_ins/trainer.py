"""Stand-in for experiments/<entry>.py on a fake TPU worker: records itself, runs until SIGTERM.

Writes $HOME/trainer-<pid>.json (pid, argv, cwd, Python version, the environment variables the
launch may forward) and prints a progress line to its log; on SIGTERM writes trainer-<pid>.stopped
and exits 0, like the real run saving a checkpoint. Gives up by itself after 60 s so no test leaks it.
"""
import json
import os
import signal
import sys
import time

home = os.environ["HOME"]
pid = os.getpid()
record = os.path.join(home, f"trainer-{pid}.json")
with open(record + ".tmp", "w") as f:  # then renamed: a reader never sees half a record
  json.dump({"pid": pid, "argv": sys.argv[1:], "cwd": os.getcwd(),
             "python": list(sys.version_info[:2]),
             "env": {k: v for k, v in os.environ.items() if k not in ("PATH", "HOME", "PWD")}}, f)
os.replace(record + ".tmp", record)
print(f"trainer {pid} started: {' '.join(sys.argv[1:])}", flush=True)


def stop(*_):
  open(os.path.join(home, f"trainer-{pid}.stopped"), "w").close()
  sys.exit(0)


signal.signal(signal.SIGTERM, stop)
deadline = time.time() + 60
while time.time() < deadline:
  time.sleep(0.05)
