"""Multi-host launch: turn flags and the environment into `jax.distributed.initialize` arguments.

`resolve` is pure (flags and an env mapping in, a `DistributedSpec` out) so every cluster layout is
testable with a fake env dict; `initialize` is the one side effect. Precedence:
explicit flags > SLURM > TPU env (multislice, then one slice) > TPU VM auto-detect > single process.

Where a cluster is also auto-detected by jax (jax/_src/clusters, jax 0.10), we compute the same
numbers: SlurmCluster (first host of SLURM_STEP_NODELIST, port SLURM_JOB_ID % 4096 + 61440) and
BaseTpuCluster/GkeTpuCluster (coordinator port 8482; processes = slices * workers per slice;
process id = slice_id * workers + worker_id). We then pass them explicitly with auto-detection
off, so a one-process-per-host SLURM job is not silently cut to one GPU (jax#16788).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any, Literal, Mapping

from llama_jax.errors import ConfigError

Source = Literal["flags", "slurm", "tpu", "multislice", "single"]

PORT_ENV = "LLAMA_JAX_COORDINATOR_PORT"
JAX_PORT_ENV = "JAX_COORDINATOR_PORT"  # jax's own override, honoured too
TPU_COORDINATOR_PORT = 8482  # jax cloud_tpu_cluster.coordinator_port
FLAG_NAMES = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """Arguments for `jax.distributed.initialize`; all None means "let jax auto-detect" (TPU VM)."""

  source: Source
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: every device the process can see

  @property
  def auto(self) -> bool:
    return self.coordinator_address is None


SINGLE = DistributedSpec("single", None, 1, 0, None)


# --- helpers -------------------------------------------------------------------------------------

def _int(value: Any, name: str, fix: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer; {fix}") from None


def _port(env: Mapping[str, str], default: int) -> int:
  for name in (PORT_ENV, JAX_PORT_ENV):
    if env.get(name):
      port = _int(env[name], name, "set it to a free TCP port, e.g. 12345.")
      if not 0 < port < 65536:
        raise ConfigError(f"{name}={port} is not a TCP port; use 1..65535.")
      return port
  return default


def _host(address: str) -> str:
  """'host', 'host:port' or '[v6]:port' -> host (MEGASCALE_COORDINATOR_ADDRESS carries a port)."""
  if address.startswith("["):
    return address[: address.index("]") + 1]
  return address.split(":")[0]


def expand_hostlist(hostlist: str) -> list[str]:
  """Expands Slurm's compressed host list: 'node[001-003,007],gpu-a1' -> node001 ... node007, gpu-a1.

  Ranges keep the zero padding of their lower bound (as `scontrol show hostnames` does); several
  bracket groups in one name expand as a product, e.g. 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2.
  """
  items, depth, start = [], 0, 0
  for i, ch in enumerate(hostlist + ","):
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if not 0 <= depth <= 1:
      raise ValueError("unbalanced brackets")
    if ch == "," and depth == 0:
      items.append(hostlist[start:i].strip())
      start = i + 1
  if depth or not all(items):
    raise ValueError("unbalanced brackets or an empty host name")
  hosts: list[str] = []
  for item in items:
    parts = re.split(r"\[([^\]]*)\]", item)  # literal, group, literal, group, ..., literal
    choices: list[list[str]] = []
    for i, part in enumerate(parts):
      if i % 2 == 0:
        choices.append([part])
        continue
      group = []
      for rng in part.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", rng.strip())
        if not m:
          raise ValueError(f"bad range {rng!r} in {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
          raise ValueError(f"descending range {rng!r} in {item!r}")
        group += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
      choices.append(group)
    hosts += ["".join(p) for p in itertools.product(*choices)]
  if not hosts:
    raise ValueError("empty host list")
  return hosts


def _get(flags: Any, name: str) -> Any:
  if flags is None:
    return None
  if isinstance(flags, Mapping):
    return flags.get(name)
  return getattr(flags, name, None)


# --- the sources, in precedence order ------------------------------------------------------------

def _from_flags(flags: Any) -> DistributedSpec | None:
  values = {n: _get(flags, n) for n in FLAG_NAMES}
  given = {n for n, v in values.items() if v not in (None, "")}
  if not given:
    return None
  if given != set(FLAG_NAMES):
    missing = ", ".join(f"--{n}" for n in FLAG_NAMES if n not in given)
    raise ConfigError(
        f"{missing} missing: give --coordinator_address, --num_processes and --process_id together, "
        "or none of them to detect SLURM/TPU from the environment.")
  address = str(values["coordinator_address"])
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address={address!r} needs host:port, e.g. 10.0.0.2:12345.")
  num = _int(values["num_processes"], "--num_processes", "pass the total number of processes.")
  pid = _int(values["process_id"], "--process_id", "pass this process's index.")
  if num < 1:
    raise ConfigError(f"--num_processes={num} must be >= 1.")
  if not 0 <= pid < num:
    raise ConfigError(f"--process_id={pid} must be in [0, --num_processes={num}).")
  return DistributedSpec("flags", address, num, pid, None)


def _from_slurm(env: Mapping[str, str]) -> DistributedSpec | None:
  # Only an srun task (SLURM_LOCALID is srun's, as jax's SlurmCluster requires): a plain python in
  # an salloc shell has the job's variables but no peers, so it is one process.
  if any(v not in env for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
    return None
  fix = "launch through `srun` inside an allocation (see tpu_scripts/slurm/train.sbatch)."
  num = _int(env["SLURM_NTASKS"], "SLURM_NTASKS", fix)
  pid = _int(env["SLURM_PROCID"], "SLURM_PROCID", fix)
  if num == 1:
    return None
  if not 0 <= pid < num:
    raise ConfigError(f"SLURM_PROCID={pid} is outside [0, SLURM_NTASKS={num}); {fix}")
  # jax reads the step's node list; the job's is the fallback outside a step.
  nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(v)), None)
  if nodelist_var is None:
    raise ConfigError(f"SLURM_NTASKS={num} but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                      f"is set; {fix}")
  try:
    hosts = expand_hostlist(env[nodelist_var])
  except ValueError as e:
    raise ConfigError(f"{nodelist_var}={env[nodelist_var]!r}: {e}.") from None
  # Same default port as jax's SlurmCluster, so either path finds the same coordinator.
  default_port = (_int(env["SLURM_JOB_ID"], "SLURM_JOB_ID", fix) % 4096 + 61440
                  if env.get("SLURM_JOB_ID") else 12345)
  address = f"{hosts[0]}:{_port(env, default_port)}"

  per_node = env.get("SLURM_NTASKS_PER_NODE", "")
  tasks_per_node = int(per_node) if per_node.isdigit() else -(-num // len(hosts))
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if env.get("SLURM_GPUS_PER_TASK") or 0 < len(visible) < tasks_per_node:
    # GPUs bound per task (--gpus-per-task, or a site's binding: CUDA_VISIBLE_DEVICES lists fewer
    # GPUs than the node has tasks), so the process already sees only its devices; indexing them
    # by SLURM_LOCALID would be wrong (jax#23452).
    local = None
  elif tasks_per_node > 1:
    # One process per GPU, each task seeing the whole node: drive GPU number SLURM_LOCALID.
    local = (_int(env.get("SLURM_LOCALID", ""), "SLURM_LOCALID", fix),)
  else:
    local = None  # one process per host drives all its GPUs
  return DistributedSpec("slurm", address, num, pid, local)


def _from_tpu(env: Mapping[str, str], tpu_vm: bool) -> DistributedSpec | None:
  workers_var = next((v for v in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if env.get(v)),
                     None)
  multislice = bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
  source: Source = "multislice" if multislice else "tpu"
  if workers_var is None:
    # On a GCE TPU VM the worker list lives in instance metadata, not the env: jax's
    # GceTpuCluster reads it, so initialize() with no arguments.
    return DistributedSpec(source) if (tpu_vm or multislice) else None

  workers = [w.strip() for w in env[workers_var].split(",") if w.strip()]
  id_var = next((v for v in ("TPU_WORKER_ID", "CLOUD_TPU_TASK_ID") if env.get(v)), None)
  if id_var is None:
    raise ConfigError(f"{workers_var} lists {len(workers)} workers but neither TPU_WORKER_ID nor "
                      "CLOUD_TPU_TASK_ID is set; set TPU_WORKER_ID to this worker's index.")
  worker = _int(env[id_var], id_var, "set it to this worker's index.")
  if not 0 <= worker < len(workers):
    raise ConfigError(f"{id_var}={worker} is outside [0, {len(workers)}) for {workers_var}.")

  slices = _int(env.get("MEGASCALE_NUM_SLICES") or 1, "MEGASCALE_NUM_SLICES", "use the slice count.")
  slice_id = _int(env.get("MEGASCALE_SLICE_ID") or 0, "MEGASCALE_SLICE_ID", "use this slice's index.")
  if slices < 1 or not 0 <= slice_id < slices:
    raise ConfigError(f"MEGASCALE_SLICE_ID={slice_id} is outside [0, MEGASCALE_NUM_SLICES={slices}).")
  # The megascale coordinator is the host of process 0 (jax BaseTpuCluster relies on this too).
  host = _host(env["MEGASCALE_COORDINATOR_ADDRESS"] if multislice else workers[0])
  return DistributedSpec(source, f"{host}:{_port(env, TPU_COORDINATOR_PORT)}",
                         slices * len(workers), slice_id * len(workers) + worker, None)


def resolve(flags: Any, env: Mapping[str, str], *, tpu_vm: bool = False) -> DistributedSpec:
  """Chooses the launch layout; `flags` is a mapping or object with the three flag names.

  `tpu_vm` says that TPU chips are attached (see `on_tpu_vm`); without a worker list in the env
  that yields an all-None spec for jax's metadata-based auto-detection.
  """
  return (_from_flags(flags) or _from_slurm(env) or _from_tpu(env, tpu_vm) or SINGLE)


# --- side effects --------------------------------------------------------------------------------

def on_tpu_vm() -> bool:
  """True when TPU chips are attached over PCI (jax's own check, cloud_tpu_init)."""
  try:
    from jax._src import hardware_utils  # private; absent in some jax builds
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # noqa: BLE001 - any failure means "not detectably a TPU VM"
    return False


def initialize(spec: DistributedSpec, *, timeout_s: int = 300) -> None:
  """Starts jax.distributed for `spec`; a no-op for a single process. Call before any jax op."""
  import jax
  from absl import logging

  logging.info("llama_jax.parallel.distributed: %s", spec)
  if spec.source == "single":
    return
  if spec.auto:
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return
  jax.distributed.initialize(
      coordinator_address=spec.coordinator_address,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
      # We already resolved everything; jax's detection would force one GPU per SLURM task.
      cluster_detection_method="deactivate",
      initialization_timeout=timeout_s)


# --- absl flags ----------------------------------------------------------------------------------

def define_flags(flag_values=None) -> None:
  """Registers --coordinator_address/--num_processes/--process_id; safe to call twice."""
  from absl import flags

  fv = flags.FLAGS if flag_values is None else flag_values
  if "coordinator_address" in fv:
    return
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0. Set with --num_processes and --process_id to skip "
                      "SLURM/TPU detection.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Total number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                       flag_values=fv)


def from_flags(flag_values=None, env: Mapping[str, str] | None = None) -> DistributedSpec:
  """`resolve` with parsed absl flags and the process environment."""
  from absl import flags

  fv = flags.FLAGS if flag_values is None else flag_values
  values = {n: fv[n].value for n in FLAG_NAMES if n in fv}
  return resolve(values, os.environ if env is None else env, tpu_vm=on_tpu_vm())

