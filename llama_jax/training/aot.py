"""Ahead-of-time compilation of the train step from abstract arrays, and what it costs per device.

`compile_train_step` lowers and compiles the real `make_train_step` for a mesh from ShapeDtypeStructs with
shardings only (nothing is allocated), on CPU with N fake devices or on the compile-only devices of a TPU
topology (`tpu_devices`, needs libtpu). `measure` reads the compiled object: memory per device
(`memory_analysis()`), FLOPs (`cost_analysis()`), and the collectives of the optimized HLO (`as_text()`)
with the number of times each runs per step (a collective in the layer scan's while body runs
num_layers times; the trip count is in the HLO). `expected` gives the analytic values for the same mesh.

Byte convention for collectives: the *array* each one assembles or reduces, per device and per step —
an all-gather's result, a reduce-scatter's or all-reduce's operand. A ring moves (n−1)/n of that per
device for an all-gather or reduce-scatter over n devices and 2(n−1)/n for an all-reduce (`wire_bytes`).
Under this convention FSDP (fsdp = n, tensor = t) costs per step:
  all-gather      2·P/t  (every weight before its forward and again for its backward; the input
                  embedding and the output layer only once: the backward of a lookup reads no
                  weights, and the loss takes the output layer's gradients in its forward pass)
                  × grad_accum_steps
  reduce(-scatter) G/t   (each gradient once; XLA's CPU backend emits an all-reduce, TPU/GPU a
                  reduce-scatter or an all-reduce of the same array) × grad_accum_steps
with P and G the bytes of all parameters and gradients in param_dtype. Tensor parallelism adds
all-reduces of activations [B/(data·fsdp), T/context, D]: 2 per layer forward, 2 backward, 2 more
when the remat policy recomputes the forward.

Memory per device: total = arguments + outputs − donated (aliased) + temporaries, the peak XLA plans
for. The CPU compiler's temporaries are only a guide to an accelerator's (other fusion and scheduling);
a TPU topology compile gives the real ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.parallel import sharding
from llama_jax.training import flops as flops_lib
from llama_jax.training import step as train
from llama_jax.training.optim import OptimizerConfig

GiB = 2**30

# HBM per device (vendor spec sheets). `topology` is the jax TPU topology name prefix (libtpu).
@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  hbm_bytes: int
  topology: str | None = None


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("tpu-v5p", int(95.74 * GiB), "v5p"),  # what libtpu's compiler reports as available
    Target("tpu-v6e", 32 * 10**9, "v6e"),
    Target("tpu-v5e", 16 * 10**9, "v5e"),
    Target("h100", 80 * 10**9),
    Target("h200", 141 * 10**9),
)}
# Share of HBM a plan may use: the runtime, the compiler's scratch and fragmentation take the rest.
HBM_USABLE = 0.9

MESH_AXES = sharding.MESH_AXES


def parse_mesh(spec: str) -> dict[str, int]:
  """'fsdp=8' or 'data=2,fsdp=16,tensor=4' → {'data': 2, 'fsdp': 16, 'context': 1, 'tensor': 4}."""
  out = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, spec.split(",")):
    name, _, value = part.partition("=")
    if name not in out or not value.isdigit() or int(value) < 1:
      raise ConfigError(f"--mesh={spec}: give axis=degree pairs over {MESH_AXES} (e.g. fsdp=8 or "
                        "data=2,fsdp=4), or --mesh=auto.")
    out[name] = int(value)
  return out


def mesh_devices(mesh: dict[str, int]) -> int:
  return math.prod(mesh.values())


def mesh_str(mesh: dict[str, int]) -> str:
  return ",".join(f"{a}={mesh[a]}" for a in MESH_AXES if mesh[a] != 1) or "fsdp=1"


def use_fake_cpu_devices(n: int) -> None:
  """Ask for `n` CPU devices. XLA reads the flag when the backend starts (first jax.devices()), so
  this works after `import jax` but not after a device was touched."""
  import os
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("use_fake_cpu_devices must run before the first jax.devices().")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def tpu_devices(topology: str) -> list:
  """Compile-only devices of a TPU topology such as 'v5p:4x4x4' (needs libtpu installed)."""
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # libtpu missing or the name unknown: say which, in one line
    raise ConfigError(f"--topology={topology}: jax cannot describe it on this host ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu (jax[tpu]) in a separate "
                      "venv, or drop --topology to compile on fake CPU devices.") from e


def auto_mesh(model_cfg: ModelConfig, n_devices: int, hbm_bytes: int) -> dict[str, int]:
  """The smallest FSDP degree (a divisor of n) whose params + grads + AdamW moments (16 bytes per fp32
  param) take at most half the usable HBM, the remaining devices data-parallel; tensor = context = 1.
  The other half is left for activations (pick batch per chip and remat to fit it)."""
  state = 16 * model_cfg.param_count()
  for fsdp in (d for d in range(1, n_devices + 1) if n_devices % d == 0):
    if model_cfg.dim % fsdp == 0 and state / fsdp <= 0.5 * HBM_USABLE * hbm_bytes:
      return {"data": n_devices // fsdp, "fsdp": fsdp, "context": 1, "tensor": 1}
  raise ConfigError(f"--mesh=auto: the model's state ({state / GiB:.0f} GiB) does not fit in half the HBM "
                    f"of {n_devices} devices; use more devices (--devices) or a bigger --target.")


def abstract_batch(batch_size: int, seq_len: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch as ShapeDtypeStructs, B split over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh, ndim=2)
  names = ["inputs", "targets", "segment_ids", "positions", "loss_mask"]
  if mesh.shape["context"] > 1:
    names.append("row_index")
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sh) for k in names}


def compile_train_step(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh, batch_size: int,
                       seq_len: int) -> tuple[Any, float]:
  """(compiled train step, seconds to lower and compile), from abstract state and batch only."""
  train.check_batch_shape(batch_size, seq_len, model_cfg, opt_cfg, mesh)
  state = train.abstract_state(model_cfg, opt_cfg, mesh)
  batch = abstract_batch(batch_size, seq_len, mesh)
  step = train.make_train_step(model_cfg, opt_cfg, mesh)
  t0 = time.perf_counter()
  with sharding.use(mesh, sharding.logical_rules(model_cfg, mesh)):
    lowered = step.jitted.lower(state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # a TPU compile refuses a program larger than HBM
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise ConfigError(f"does not fit: {str(e).splitlines()[0]}; lower --batch_per_chip, or use "
                        "--remat_policy=full, --attention_impl=blockwise or a larger --mesh fsdp.") from e
  return compiled, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# Collectives in the optimized HLO.

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][a-z\-]*)\((.*)$")
_CALLS = re.compile(r"\b(?:body|calls|to_apply|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_COND = re.compile(r"condition=%?([\w.\-]+)")
_S32_CONST = re.compile(r"= [su]32\[\]\S* constant\((\d+)\)")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _array_bytes(shape_text: str) -> list[int]:
  """Bytes of each array in an HLO shape ('f32[64,128]{1,0}' or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return out


def _scalars(shape_text: str) -> list[bool]:
  return [dims == "" for dtype, dims in _ARRAY.findall(shape_text) if dtype in _DTYPE_BYTES]


def _group_size(line: str, n_devices: int) -> int:
  if "source_target_pairs=" in line:  # collective-permute: each device sends to one peer
    return 2
  if m := _GROUPS_IOTA.search(line):
    return int(m.group(2))
  if m := _GROUPS_LIST.search(line):
    return len(m.group(1).split(","))
  if m := _GROUPS_MESH.search(line):  # mesh['axis_0'=8,'axis_1'=1] {'axis_0'}
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  return n_devices  # replica_groups={} : all devices


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of COLLECTIVES
  bytes: int  # the array it assembles (all-gather: result) or reduces (operand), per device
  group: int  # devices in its replica group
  runs: int  # executions per step (trip counts of the loops around it)
  where: str  # the computation that holds it


def wire_bytes(c: Collective) -> float:
  """Bytes one device sends per execution on a ring (bidirectional algorithms halve the time, not this)."""
  n = c.group
  if n <= 1:
    return 0.0
  if c.kind == "all-reduce":
    return 2 * (n - 1) / n * c.bytes
  if c.kind in ("all-gather", "reduce-scatter", "all-to-all"):
    return (n - 1) / n * c.bytes
  return float(c.bytes)  # collective-permute: the whole buffer to one peer


@dataclasses.dataclass(frozen=True)
class _Module:
  comps: dict[str, list[str]]  # computation name -> its instruction lines
  runs: dict[str, int]  # computation name -> executions per step


def _parse_module(hlo_text: str) -> _Module:
  """Computations and how often each runs per step: the sum over the instructions that call it of the
  caller's count, times the trip count where the caller is a while loop's body."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if not line.startswith(" "):
      if m := _COMP.match(line.strip()):
        current = m.group(1)
        comps[current] = []
        entry = current if line.startswith("ENTRY") else entry
      continue
    if current is not None:
      comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  def trip_count(line: str) -> int:
    if m := _TRIP.search(line):  # CPU and GPU annotate it
      return int(m.group(1))
    # TPU does not: read `i < N` off the condition (the scan counts from 0 in steps of 1).
    cond = comps.get(m.group(1), []) if (m := _COND.search(line)) else []
    consts = [int(c) for l in cond for c in _S32_CONST.findall(l)]
    if len(consts) == 1 and any("direction=LT" in l for l in cond):
      return consts[0]
    return 1

  callers: dict[str, list[tuple[str, int]]] = {}
  for name, lines in comps.items():
    for line in lines:
      is_while = " while(" in line
      trip = trip_count(line) if is_while else 1
      for m in _CALLS.finditer(line):
        body = line[m.start():].startswith("body=")
        callers.setdefault(m.group(1), []).append((name, trip if is_while and body else 1))
      for m in _BRANCHES.finditer(line):
        for b in m.group(1).split(","):
          callers.setdefault(b.strip().lstrip("%"), []).append((name, 1))
  runs: dict[str, int] = {entry: 1}

  def count(name: str, depth: int = 0) -> int:
    if name not in runs:
      runs[name] = 0 if depth > 64 else sum(count(c, depth + 1) * t for c, t in callers.get(name, ()))
    return runs[name]

  for name in comps:
    count(name)
  return _Module(comps, runs)


def parse_collectives(hlo_text: str, n_devices: int) -> list[Collective]:
  """Every collective in an optimized HLO module with how often it runs per step (async pairs count
  once, at their -start)."""
  module = _parse_module(hlo_text)
  out = []
  for name, lines in module.comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      shape, op = m.group(1), m.group(2)
      kind = op.removesuffix("-start")
      if kind not in COLLECTIVES or op.endswith("-done"):
        continue
      sizes = _array_bytes(shape)
      if op.endswith("-start") and kind in ("all-gather", "collective-permute") and len(sizes) > 1:
        # (operands..., results..., u32[] contexts...): the results
        sizes = [b for b, scalar in zip(sizes, _scalars(shape)) if not scalar]
        sizes = sizes[len(sizes) // 2:]
      group = _group_size(line, n_devices)
      b = sum(sizes) * (group if kind == "reduce-scatter" else 1)  # reduce-scatter: its operand
      if module.runs[name]:
        out.append(Collective(kind, b, group, module.runs[name], name))
  return out


_NAMED = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ([a-z0-9]+\[[0-9,]*\])")
_DOT = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = ([a-z0-9]+\[[0-9,]*\])\S* dot\(%?([\w.\-]+)")
_LHS_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")


def matmul_flops(hlo_text: str) -> float:
  """2·M·N·K summed over every dot of the module times how often it runs (XLA's cost analysis counts a
  while body once, so the layer scan's matmuls would be counted for one layer)."""
  module = _parse_module(hlo_text)
  total = 0.0
  for name, lines in module.comps.items():
    shapes = {m.group(1): m.group(2) for line in lines if (m := _NAMED.match(line))}
    for line in lines:
      if not (m := _DOT.match(line)) or not module.runs[name]:
        continue
      out_dims = [int(d) for d in _ARRAY.search(m.group(1)).group(2).split(",") if d]
      lhs = shapes.get(m.group(2))
      c = _LHS_CONTRACT.search(line)
      if lhs is None or c is None:
        continue
      lhs_dims = [int(d) for d in _ARRAY.search(lhs).group(2).split(",") if d]
      k = math.prod(lhs_dims[int(i)] for i in c.group(1).split(",") if i)
      total += 2.0 * math.prod(out_dims) * k * module.runs[name]
  return total


# ----------------------------------------------------------------------------------------------------
# Measured and expected.

@dataclasses.dataclass(frozen=True)
class Report:
  """Per device, per step."""
  param_bytes: int
  opt_bytes: int
  batch_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float  # cost_analysis(): a while body counted once
  matmul_flops: float  # the HLO's dots with their trip counts
  collectives: tuple[Collective, ...]
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def collective_bytes(self, kind: str) -> int:
    return sum(c.bytes * c.runs for c in self.collectives if c.kind == kind)

  def collective_count(self, kind: str) -> int:
    return sum(c.runs for c in self.collectives if c.kind == kind)

  def collective_wire_bytes(self, kind: str) -> float:
    return sum(wire_bytes(c) * c.runs for c in self.collectives if c.kind == kind)


def _shard_bytes(tree: Any, shardings: Any) -> int:
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  total = 0
  for x, sh in zip(leaves, shs, strict=True):
    shape = sh.shard_shape(x.shape)
    total += math.prod(shape) * (jnp.dtype(x.dtype).itemsize if not jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else 8)
  return total


def measure(compiled: Any, model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh, batch_size: int,
            seq_len: int, compile_seconds: float = 0.0) -> Report:
  """Per-device memory, FLOPs and collectives of a compiled train step (`compile_train_step`).

  Parameter and optimizer bytes are the shards of the compiled program's own input shardings."""
  state = train.abstract_state(model_cfg, opt_cfg, mesh)
  batch = abstract_batch(batch_size, seq_len, mesh)
  (state_sh, batch_sh), _ = compiled.input_shardings
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  return Report(
      param_bytes=_shard_bytes(state.params, state_sh.params),
      opt_bytes=_shard_bytes(state.opt_state, state_sh.opt_state),
      batch_bytes=_shard_bytes(batch, batch_sh),
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      flops=float(cost.get("flops", float("nan"))), matmul_flops=matmul_flops(hlo),
      collectives=tuple(parse_collectives(hlo, mesh.size)),
      compile_seconds=compile_seconds)


@dataclasses.dataclass(frozen=True)
class Expected:
  """Analytic per-device, per-step values (module docstring)."""
  param_bytes: float
  grad_bytes: float
  opt_bytes: float
  all_gather_bytes: float
  gradient_reduce_bytes: float
  tensor_all_reduce_bytes: float
  flops: float


def expected(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh, batch_size: int,
             seq_len: int, wire_dtype: str | None = None) -> Expected:
  """`wire_dtype`: the dtype weights and gradients cross the links in (default param_dtype). XLA on TPU
  casts an fp32 weight shard to the compute dtype before gathering it, and reduces the gradients in
  it: pass model_cfg.dtype there."""
  f, t = mesh.shape["fsdp"], mesh.shape["tensor"]
  dp, cp = mesh.shape["data"] * f, mesh.shape["context"]
  n = model_cfg.param_count()
  itemsize = jnp.dtype(model_cfg.param_dtype).itemsize
  wire = jnp.dtype(wire_dtype or model_cfg.param_dtype).itemsize
  p = n * itemsize
  embed = model_cfg.vocab_size * model_cfg.dim * wire
  a = opt_cfg.grad_accum_steps
  # Every weight is gathered for the forward and again for the backward, but the input embedding and
  # the output layer once: the backward of a lookup reads no weights, and the loss
  # (training/losses.py) takes the output layer's gradients in its forward pass. A tied table is
  # gathered once for both.
  gathered = (2 * n * wire - (1 if model_cfg.tie_embeddings else 2) * embed) / t if f > 1 else 0.0
  reduced = n * wire / t if dp > 1 else 0.0
  per_layer = 6 if model_cfg.remat_policy != "none" else 4
  act = (batch_size // (dp * a)) * (seq_len // cp) * model_cfg.dim * jnp.dtype(model_cfg.dtype).itemsize
  tensor_ar = per_layer * model_cfg.num_layers * act * a if t > 1 else 0.0
  tokens = batch_size * seq_len
  # Remat runs a second forward of what it does not save: every matmul ("full"), or the attention
  # einsums, which have batch dimensions ("dots_with_no_batch_dims_saveable").
  weights_again = model_cfg.remat_policy == "full"
  scores_again = model_cfg.remat_policy in ("full", "dots_with_no_batch_dims_saveable")
  # The layers' matmuls; the output projection is outside the scan and never rematerialized.
  layers = flops_lib.matmul_params(model_cfg) - model_cfg.dim * model_cfg.vocab_size
  fl = tokens * (6 * flops_lib.matmul_params(model_cfg) + (2 * layers if weights_again else 0)
                 + 12 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * seq_len
                 * (8 / 6 if scores_again else 1)) / mesh.size
  return Expected(param_bytes=p / (f * t), grad_bytes=p / (f * t), opt_bytes=2 * p / (f * t),
                  all_gather_bytes=gathered * a, gradient_reduce_bytes=reduced * a,
                  tensor_all_reduce_bytes=tensor_ar, flops=fl)


def _gib(x: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 2**20)):
    if abs(x) >= size:
      return f"{x / size:10.3f} {unit}"
  return f"{x / 2**10:10.3f} KiB"


def _ratio(m: float, e: float) -> str:
  return f"{m / e:6.3f}" if e else "     -"


def format_report(r: Report, e: Expected, hbm_bytes: int | None = None, target: str = "",
                  timings: bool = True) -> str:
  """The table the entry point prints (and the golden files hold, with timings=False)."""
  rows = [f"{'per device':<34}{'measured':>14}{'analytic':>14}{'ratio':>8}",
          f"{'parameters':<34}{_gib(r.param_bytes)}{_gib(e.param_bytes)}  {_ratio(r.param_bytes, e.param_bytes)}",
          f"{'optimizer state':<34}{_gib(r.opt_bytes)}{_gib(e.opt_bytes)}  {_ratio(r.opt_bytes, e.opt_bytes)}",
          f"{'params + optimizer':<34}{_gib(r.param_bytes + r.opt_bytes)}{_gib(e.param_bytes + e.opt_bytes)}"
          f"  {_ratio(r.param_bytes + r.opt_bytes, e.param_bytes + e.opt_bytes)}",
          f"{'batch':<34}{_gib(r.batch_bytes)}",
          f"{'arguments (memory_analysis)':<34}{_gib(r.argument_bytes)}",
          f"{'outputs − donated':<34}{_gib(r.output_bytes - r.alias_bytes)}",
          f"{'activations + temporaries':<34}{_gib(r.temp_bytes)}{'':>14}  (grads ≈{_gib(e.grad_bytes).strip()} of it)",
          f"{'total':<34}{_gib(r.total_bytes)}"]
  if hbm_bytes:
    use = r.total_bytes / hbm_bytes
    fits = "fits" if r.total_bytes <= HBM_USABLE * hbm_bytes else "DOES NOT FIT"
    rows.append(f"{'HBM ' + target:<34}{_gib(hbm_bytes)}   {use:6.1%} used: {fits} "
                f"(limit {HBM_USABLE:.0%})")
  rows.append(f"{'matmul FLOPs (HLO dots x trips)':<34}{r.matmul_flops:14.4g}{e.flops:14.4g}  "
              f"{_ratio(r.matmul_flops, e.flops)}")
  rows.append(f"{'FLOPs (cost_analysis, loop once)':<34}{r.flops:14.4g}")
  rows.append("")
  rows.append(f"{'collectives per step':<22}{'runs':>6}{'array bytes':>14}{'wire/device':>14}")
  for kind in COLLECTIVES:
    rows.append(f"{kind:<22}{r.collective_count(kind):6d}{_gib(r.collective_bytes(kind))}"
                f"{_gib(r.collective_wire_bytes(kind))}")
  reduce = r.collective_bytes("reduce-scatter") + r.collective_bytes("all-reduce")
  rows.append("")
  rows.append(f"{'vs analytic (array bytes)':<34}{'measured':>14}{'analytic':>14}{'ratio':>8}")
  rows.append(f"{'FSDP all-gathers':<34}{_gib(r.collective_bytes('all-gather'))}{_gib(e.all_gather_bytes)}"
              f"  {_ratio(r.collective_bytes('all-gather'), e.all_gather_bytes)}")
  want = e.gradient_reduce_bytes + e.tensor_all_reduce_bytes
  rows.append(f"{'reduce-scatter + all-reduce':<34}{_gib(reduce)}{_gib(want)}  {_ratio(reduce, want)}")
  rows.append(f"{'  of it: gradients':<34}{'':>14}{_gib(e.gradient_reduce_bytes)}")
  rows.append(f"{'  of it: tensor-parallel acts':<34}{'':>14}{_gib(e.tensor_all_reduce_bytes)}")
  if timings:
    rows.append(f"\ncompiled in {r.compile_seconds:.1f} s")
  return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# Configs that fit.

@dataclasses.dataclass(frozen=True)
class Fit:
  """A recommended layout: `model` preset on `devices` chips of `target`."""
  model: str
  target: str
  devices: int
  mesh: str  # parse_mesh syntax
  batch_per_chip: int  # rows per data-parallel device (global batch = this × data × fsdp)
  seq_len: int
  remat_policy: str
  attention_impl: str = "blockwise"


# 405B has no row on v6e: its fp32 params, grads and AdamW moments (16 bytes per param) take 25.4 GB of
# a v6e-256 chip's 32 GB before any activation, and make_mesh keeps FSDP inside one slice.
FIT_TABLE: tuple[Fit, ...] = (
    Fit("llama3.1-8b", "tpu-v5p", 8, "fsdp=8", 4, 4096, "dots_with_no_batch_dims_saveable"),
    Fit("llama3.1-8b", "tpu-v6e", 8, "fsdp=8", 2, 4096, "full"),
    Fit("llama3.1-8b", "h100", 8, "fsdp=8", 2, 4096, "full"),
    Fit("llama3.1-70b", "tpu-v5p", 64, "fsdp=64", 2, 4096, "full"),
    Fit("llama3.1-70b", "tpu-v6e", 256, "fsdp=256", 1, 4096, "full"),  # v6e-64: 35.3 GiB (TPU compile)
    Fit("llama3.1-70b", "h100", 64, "fsdp=64", 1, 4096, "full"),
    Fit("llama3.1-405b", "tpu-v5p", 256, "fsdp=256", 1, 4096, "full"),
    Fit("llama3.1-405b", "h100", 512, "fsdp=64,tensor=8", 1, 4096, "full"),  # 64 hosts of 8
)
