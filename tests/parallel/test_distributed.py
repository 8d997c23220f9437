"""llama_jax.parallel.distributed: every launch layout from a fake env, then a real 2-process CPU run."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from absl import flags

from llama_jax.parallel import distributed
from llama_jax.errors import ConfigError
from llama_jax.parallel.distributed import DistributedSpec, expand_hostlist, resolve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- hostlist --------------------------------------------------------------------------------------

@pytest.mark.parametrize("hostlist, hosts", [
    ("node001", ["node001"]),
    ("node001,host2", ["node001", "host2"]),
    ("node[001-003,007],gpu-a1", ["node001", "node002", "node003", "node007", "gpu-a1"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("gpu-a[1-2]-ib,cpu[3]", ["gpu-a1-ib", "gpu-a2-ib", "cpu3"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a[1,3],b[2-3],c", ["a1", "a3", "b2", "b3", "c"]),
])
def test_expand_hostlist(hostlist, hosts):
  assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-3", "node1-3]", "node[3-1]", "node[a-b]", "a,,b",
                                 "node[[1]]"])
def test_expand_hostlist_rejects(bad):
  with pytest.raises(ValueError):
    expand_hostlist(bad)


# --- explicit flags --------------------------------------------------------------------------------

def test_flags_win_over_env():
  env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "n[1-2]",
         "TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "1"}
  spec = resolve({"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}, env)
  assert spec == DistributedSpec("flags", "10.0.0.2:1234", 4, 3, None)


@pytest.mark.parametrize("flag_values, match", [
    ({"coordinator_address": "h:1", "num_processes": 2}, "--process_id missing"),
    ({"process_id": 0}, "--coordinator_address, --num_processes missing"),
    ({"coordinator_address": "host", "num_processes": 2, "process_id": 0}, "--coordinator_address"),
    ({"coordinator_address": "host:http", "num_processes": 2, "process_id": 0}, "host:port"),
    ({"coordinator_address": "h:99999", "num_processes": 2, "process_id": 0}, "host:port"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "--process_id=2"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1}, "--process_id=-1"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "--num_processes=0"),
])
def test_bad_flags(flag_values, match):
  with pytest.raises(ConfigError, match=match):
    resolve(flag_values, {})


def test_flags_object_and_ipv6():
  class F:
    coordinator_address, num_processes, process_id = "[::1]:8476", 2, 1
  assert resolve(F(), {}) == DistributedSpec("flags", "[::1]:8476", 2, 1, None)


# --- SLURM -----------------------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "other[1-2]"}


def test_slurm_one_process_per_gpu():
  env = dict(SLURM, SLURM_NTASKS_PER_NODE="8")
  # Port as jax's SlurmCluster picks it: 4242 % 4096 + 61440.
  assert resolve({}, env) == DistributedSpec("slurm", "gpu007:61586", 16, 9, (1,))


def test_slurm_tasks_per_node_inferred_and_port_override():
  env = dict(SLURM, LLAMA_JAX_COORDINATOR_PORT="12345")
  assert resolve({}, env) == DistributedSpec("slurm", "gpu007:12345", 16, 9, (1,))
  env = dict(SLURM, JAX_COORDINATOR_PORT="2222")
  assert resolve({}, env).coordinator_address == "gpu007:2222"


def test_slurm_one_process_per_host_sees_all_gpus():
  env = dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
             SLURM_NTASKS_PER_NODE="1")
  assert resolve({}, env) == DistributedSpec("slurm", "gpu007:61586", 2, 1, None)


def test_slurm_gpus_per_task_leaves_binding_to_slurm():
  env = dict(SLURM, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_PER_TASK="1")
  assert resolve({}, env).local_device_ids is None


def test_slurm_job_nodelist_fallback_and_no_job_id():
  env = {k: v for k, v in SLURM.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_JOB_ID")}
  assert resolve({}, env).coordinator_address == "other1:12345"


def test_slurm_single_task_is_single_process():
  assert resolve({}, dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0")) == distributed.SINGLE


@pytest.mark.parametrize("override, match", [
    ({"SLURM_PROCID": "16"}, "SLURM_PROCID=16"),
    ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS"),
    ({"SLURM_STEP_NODELIST": "gpu[1-"}, "SLURM_STEP_NODELIST"),
    ({"LLAMA_JAX_COORDINATOR_PORT": "70000"}, "LLAMA_JAX_COORDINATOR_PORT"),
])
def test_slurm_errors(override, match):
  with pytest.raises(ConfigError, match=match):
    resolve({}, dict(SLURM, **override))


def test_slurm_missing_nodelist():
  env = {k: v for k, v in SLURM.items() if "NODELIST" not in k}
  with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST"):
    resolve({}, env)


# --- TPU -------------------------------------------------------------------------------------------

TPU = {"TPU_WORKER_HOSTNAMES": "t1w0,t1w1,t1w2,t1w3", "TPU_WORKER_ID": "2"}


def test_tpu_vm_env():
  assert resolve({}, TPU) == DistributedSpec("tpu", "t1w0:8482", 4, 2, None)


def test_tpu_process_addresses_and_task_id():
  env = {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476", "CLOUD_TPU_TASK_ID": "1"}
  assert resolve({}, env) == DistributedSpec("tpu", "10.0.0.1:8482", 2, 1, None)


def test_multislice():
  env = dict(TPU, MEGASCALE_COORDINATOR_ADDRESS="slice0-w0:8080", MEGASCALE_NUM_SLICES="2",
             MEGASCALE_SLICE_ID="1")
  # 2 slices x 4 workers; slice 1 worker 2 is process 1 * 4 + 2.
  assert resolve({}, env) == DistributedSpec("multislice", "slice0-w0:8482", 8, 6, None)


def test_tpu_vm_without_env_defers_to_jax_metadata_detection():
  spec = resolve({}, {}, tpu_vm=True)
  assert spec == DistributedSpec("tpu") and spec.auto
  assert resolve({}, {"MEGASCALE_COORDINATOR_ADDRESS": "c:1"}) == DistributedSpec("multislice")


@pytest.mark.parametrize("env, match", [
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_ID"),
    (dict(TPU, TPU_WORKER_ID="4"), "TPU_WORKER_ID=4"),
    (dict(TPU, MEGASCALE_COORDINATOR_ADDRESS="c", MEGASCALE_NUM_SLICES="2",
          MEGASCALE_SLICE_ID="2"), "MEGASCALE_SLICE_ID=2"),
])
def test_tpu_errors(env, match):
  with pytest.raises(ConfigError, match=match):
    resolve({}, env)


def test_slurm_beats_tpu_and_nothing_is_single():
  env = dict(TPU, **SLURM)
  assert resolve({}, env).source == "slurm"
  assert resolve(None, {}) == distributed.SINGLE


def test_initialize_single_is_a_noop():
  distributed.initialize(distributed.SINGLE)  # must not start a coordinator


# --- absl flags ------------------------------------------------------------------------------------

def test_define_flags_twice_and_from_flags():
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  distributed.define_flags(fv)
  fv(["prog", "--coordinator_address=h:1", "--num_processes=2", "--process_id=1"])
  assert distributed.from_flags(fv, env={}) == DistributedSpec("flags", "h:1", 2, 1, None)
  fv2 = flags.FlagValues()
  distributed.define_flags(fv2)
  fv2(["prog"])
  assert distributed.from_flags(fv2, env=TPU).source == "tpu"


# --- a real 2-process run --------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(per_process_env, per_process_args, timeout_s=120):
  """Starts the workers, waits for all, kills them all on timeout; returns their JSON lines."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "LLAMA_JAX_"))}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
              PYTHONPATH=REPO + os.pathsep + base.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "parallel", "_distributed_worker.py"),
                             *args], env={**base, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
           for env, args in zip(per_process_env, per_process_args)]
  deadline = time.monotonic() + timeout_s
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  results = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{err[-3000:]}"
    results.append(json.loads([l for l in out.splitlines() if l.startswith("{")][-1]))
  return results


@pytest.mark.parametrize("how", ["slurm", "flags"])
def test_two_cpu_processes(how):
  port = _free_port()
  if how == "slurm":
    envs = [{"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
             "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_STEP_NODELIST": "localhost", "LLAMA_JAX_COORDINATOR_PORT": str(port)}
            for i in range(2)]
    args = [[], []]
  else:
    envs = [{}, {}]
    args = [[f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
            for i in range(2)]
  results = _launch(envs, args)
  for i, r in enumerate(results):
    assert r["source"] == how and r["spec_process_id"] == i == r["process_index"]
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
    assert r["sum"] == sum(range(16)) and r["sumsq"] == sum(v * v for v in range(16))
