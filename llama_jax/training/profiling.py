"""Where a compiled step's time goes: the optimized HLO's ops by category, joined with a profiler trace.

`hlo_ops(hlo_text)` reads the compiled program (`compiled.as_text()`) and gives every instruction the
runtime executes a category — matmul, elementwise, reduction, copy/transpose, collective — and, for
matmuls, its FLOPs (2 · output elements · contracted size, read off the dot's shapes). `trace_events`
reads a `jax.profiler` trace (`ProfileData`): on CPU each executed instruction (thunk) is an event named
after it; on TPU/GPU the device planes carry the same names. `breakdown` adds the events up per category
(time, count, and the matmuls' FLOPs, so their achieved FLOP/s), which is what
`benchmarks/profile_step.py` prints. Ops' summed times overcount the step where the runtime runs
independent ops at once (on CPU, both cores); `wall_breakdown` splits the traced wall time instead: each
instant shared equally by the ops running then, and the instants when none runs counted as idle.

Containers (while loops, calls, conditionals) are not counted: their bodies' instructions are, once per
executed iteration, so a scan over layers counts every layer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable

CATEGORIES = ("matmul", "elementwise", "reduction", "copy/transpose", "collective", "other")

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "send", "recv")
_CONTAINERS = ("while", "call", "conditional", "async-start", "async-done", "async-update")
_MOVEMENT = {"parameter", "constant", "bitcast", "copy", "transpose", "slice", "dynamic-slice",
             "dynamic-update-slice", "concatenate", "pad", "broadcast", "reshape", "tuple",
             "get-tuple-element", "iota", "gather", "scatter", "reverse", "bitcast-convert"}
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

# `%name = f32[4096,512]{1,0} opcode(%a, %b), attrs` (tuple-shaped results start with "(").
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[a-z]\w*\[[\d,]*\](?:\{[^}]*\})?)\s+"
                    r"([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Op:
  """One executed instruction: its category, FLOPs if a matmul (else 0), and its output's bytes."""
  category: str
  flops: int
  out_bytes: int
  source: str = ""  # where in the program: the op_name of its metadata, shortened (backward ops: "bwd")


def _dims(shape: str) -> tuple[str, list[int]] | None:
  m = _SHAPE.match(shape)
  if not m:
    return None
  return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def _bytes(shape: str) -> int:
  return sum(_ITEM_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in _SHAPE.findall(shape))


def _parse(hlo_text: str):
  """(computations: name -> [(instr, shape, opcode, rest)], shapes: instr -> shape)."""
  comps, shapes, current = {}, {}, None
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, shape, opcode, rest = m.groups()
      if current is not None:
        comps[current].append((name, shape, opcode, rest))
      shapes[name] = shape
      continue
    c = _COMP.match(line)
    if c:
      current = c.group(1)
      comps[current] = []
  return comps, shapes


def _dot_flops(shape: str, rest: str, shapes: dict[str, str]) -> int:
  out = _dims(shape)
  operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  lhs = _dims(shapes.get(operands[0], "")) if operands else None
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  if out is None or lhs is None or contracting is None:
    return 0
  k = math.prod(lhs[1][int(i)] for i in contracting.group(1).split(",") if i)
  return 2 * math.prod(out[1]) * k


def _source(rest: str, inner) -> str:
  """The op_name of the instruction (a fusion: of its most telling inner op), shortened."""
  names = [re.search(r'op_name="([^"]*)"', r) for _, _, o, r in inner if o in ("dot", "convolution")]
  names = [m for m in names if m] or [re.search(r'op_name="([^"]*)"', rest)]
  if not names or names[0] is None:
    return ""
  name = names[0].group(1)
  bwd = "transpose(" in name
  for junk in ("jit(train_step)/", "while/body/", "closed_call/", "checkpoint/", "transpose(", "jvp(",
               "Transformer)", "))", ")/", "/dot_general"):
    name = name.replace(junk, "/" if junk == ")/" else "")
  name = re.sub(r"/+", "/", name).strip("/")
  return ("bwd " if bwd else "") + name


def _called(rest: str, keys=("calls", "to_apply")) -> list[str]:
  """Computations an instruction applies as part of itself (a fusion's, a reduce's region)."""
  names = []
  for key in keys:
    m = re.search(key + r"=\{?([%\w.\-, ]+)\}?", rest)
    if m:
      names += [n.strip().lstrip("%") for n in m.group(1).split(",")]
  return names


def hlo_ops(hlo_text: str) -> dict[str, Op]:
  """Every instruction that runs as its own unit (top level and inside loop/call bodies; a fusion's
  insides are part of the fusion) → its `Op`."""
  comps, shapes = _parse(hlo_text)
  # Computations that run only inside another instruction (fusions, reduce regions, wrapped ops); loop
  # bodies, conditions and branches run instruction by instruction and stay.
  fused = {c for instrs in comps.values() for _, _, _, rest in instrs for c in _called(rest)}

  def contents(comp: str) -> list[tuple[str, str, str, str]]:
    out = []
    for instr in comps.get(comp, []):
      out.append(instr)
      if instr[2] in ("fusion", "custom-call"):
        for c in _called(instr[3], ("calls",)):
          out += contents(c)
    return out

  ops = {}
  for comp, instrs in comps.items():
    if comp in fused:
      continue
    for name, shape, opcode, rest in instrs:
      base = opcode.removesuffix("-start").removesuffix("-done")
      if opcode in _CONTAINERS or opcode in ("parameter", "constant", "tuple", "get-tuple-element"):
        continue
      calls = _called(rest, ("calls",))
      inner = [(name, shape, opcode, rest)] + (contents(calls[0]) if calls else [])
      opcodes = {o for _, _, o, _ in inner} - {"fusion", "parameter"}
      flops = sum(_dot_flops(s, r, shapes) for _, s, o, r in inner if o in ("dot", "convolution"))
      if base in _COLLECTIVES:
        cat = "collective"
      elif "dot" in opcodes or "convolution" in opcodes or (opcode == "custom-call" and flops):
        cat = "matmul"
      elif opcodes & {"transpose", "copy"} or opcodes <= _MOVEMENT:
        # Data movement, or arithmetic written out through a layout change (a transposing copy
        # fused in): the transposed write is what such a fusion costs.
        cat = "copy/transpose"
      elif opcodes & {"reduce", "reduce-window", "sort"}:
        cat = "reduction"
      elif opcode == "custom-call":
        cat = "other"
      else:
        cat = "elementwise"
      ops[name] = Op(cat, flops, _bytes(shape), _source(rest, inner))
  return ops


def trace_events(profile) -> Iterable[tuple[str, int]]:
  """(event name, duration ns) of every event of a `jax.profiler.ProfileData`."""
  return ((name, end - start) for name, start, end in trace_spans(profile))


def trace_spans(profile) -> Iterable[tuple[str, int, int]]:
  """(event name, start ns, end ns) of every event of a `jax.profiler.ProfileData`."""
  for plane in profile.planes:
    for line in plane.lines:
      for ev in line.events:
        yield ev.name, ev.start_ns, ev.end_ns


@dataclasses.dataclass
class Row:
  category: str
  seconds: float = 0.0  # summed over events (per step when divided by the steps traced)
  events: int = 0
  flops: float = 0.0


def breakdown(ops: dict[str, Op], events: Iterable[tuple[str, int]], steps: int = 1,
              ) -> tuple[dict[str, Row], dict[str, Row], dict[str, Row]]:
  """Summed event time, counts and FLOPs per step: (per category, per matmul, per other instruction)."""
  cats = {c: Row(c) for c in CATEGORIES}
  per_op, others = {}, {}
  for name, ns in events:
    op = ops.get(name)
    if op is None:
      continue
    table = per_op if op.category == "matmul" else others
    for row in (cats[op.category], table.setdefault(name, Row(op.category))):
      row.seconds += ns * 1e-9 / steps
      row.events += 1
      row.flops += op.flops / steps
  for row in [*cats.values(), *per_op.values(), *others.values()]:
    row.events //= steps
  return cats, per_op, others


@dataclasses.dataclass
class Wall:
  """Traced wall time per step: `span` from the first op's start to the last op's end, `idle` the part
  of it when no op ran, and the rest split over the ops running at each instant."""
  span: float
  idle: float
  by_category: dict[str, float]
  by_source: dict[tuple[str, str], float]  # (category, source) -> seconds


def wall_breakdown(ops: dict[str, Op], spans: Iterable[tuple[str, int, int]], steps: int = 1) -> Wall:
  """Split the wall time of the traced ops (events not naming an op of `ops` are ignored) per step."""
  evs = [(ops[n], a, b) for n, a, b in spans if n in ops and b > a]
  by_src: dict[tuple[str, str], float] = {}
  if not evs:
    return Wall(0.0, 0.0, {c: 0.0 for c in CATEGORIES}, by_src)
  edges = sorted([(a, 1, i) for i, (_, a, _) in enumerate(evs)] + [(b, 0, i) for i, (_, _, b) in enumerate(evs)])
  running: set[int] = set()
  idle, last = 0, edges[0][0]
  for t, starts, i in edges:  # at equal times ends (0) come before starts (1)
    if t > last:
      if running:
        share = (t - last) / len(running)
        for j in running:
          key = (evs[j][0].category, evs[j][0].source)
          by_src[key] = by_src.get(key, 0.0) + share
      else:
        idle += t - last
      last = t
    (running.add if starts else running.discard)(i)
  per = lambda ns: ns * 1e-9 / steps
  by_cat = {c: per(sum(v for (cat, _), v in by_src.items() if cat == c)) for c in CATEGORIES}
  return Wall(per(edges[-1][0] - edges[0][0]), per(idle), by_cat, {k: per(v) for k, v in by_src.items()})
