"""The weighted average of several checkpoints' params, streamed leaf by leaf and saved as params-only.

[P] §3.1.3: the final pretrained model is the (Polyak) average of the checkpoints kept during annealing;
per-stage model averaging averages the final checkpoints of several runs. Sources are the steps of a run
directory (`<run_dir>/checkpoints/<step>/state`, written by training.checkpoint.Checkpointer, with
`<run_dir>/model_config.json` beside them: all, some `--steps`, or the `--last` K), the latest checkpoint of
each of several run directories, or params-only directories written by interop.orbax.save_params.

Streaming. One leaf (parameter array) at a time: for each source in turn, that leaf alone is restored
(an Orbax partial restore of a one-leaf tree) onto the mesh in its sharded layout and added, times its
weight, to a compensated fp32 running sum of that leaf sharded the same way; the sum is rounded to the
param dtype, written into the output checkpoint with an Orbax partial save (orbax.checkpoint.experimental
.v1.partial: each call adds keys to one pending checkpoint; `finalize` merges them), and freed before the
next leaf is read. So, per leaf:
  device memory: the restored leaf, the fp32 sum's two halves (hi, lo) and the averaged leaf, i.e. at most
    about 4 fp32 copies of ONE leaf (the largest: the embedding), never a copy of the whole model;
  host memory: the averaged leaf's shards on their way to disk (one leaf's addressable shards per host:
    the whole leaf on a single host) plus what Orbax/TensorStore buffer while reading one leaf's shards.
The output is `<output>/params` (the finalized pytree, moved into place) and `<output>/model_config.json`,
exactly what interop.orbax.save_params writes, so `--init_from=orbax:<output>` and experiments/convert.py
read it; model_config.json is written last, so a directory without it is an interrupted write.
`average_params` (the average as an in-memory tree, e.g. a run's latest params) streams the same way but
keeps the averaged leaves on the devices: one copy of the params, the size of what it returns.

Arithmetic: the weights are normalized in float64 and each split into two fp32 numbers (w = w_hi + w_lo to
~48 bits); w_hi·x is formed exactly (Dekker's TwoProduct) and w_lo·x rounded (its error is ~2^-48 of the
term), and the terms are summed with TwoSum (Kahan-Babuska: `lo` keeps the low bits each addition to `hi`
rounds off). The mean is thus as if computed exactly and rounded once to fp32 (then to the param dtype).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh
from orbax.checkpoint.experimental.v1 import partial as ocp_partial

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.training import checkpoint
from llama_jax.interop import orbax as orbax_params
from llama_jax.model import params as params_lib

_PENDING = "_partial"  # <output>/_partial: the pending partial-save checkpoint; its pytree is moved to params
_STATE = "state"  # the pytree's directory name inside an orbax.checkpoint.experimental.v1 checkpoint


@dataclasses.dataclass(frozen=True)
class Source:
  label: str  # what the user sees: "step 300" or the directory
  path: str  # the Orbax pytree directory
  in_state: bool  # a train state with the params under "params", or the params alone


def _config(path: epath.Path, flag: str) -> ModelConfig:
  if not (path / orbax_params.CONFIG_FILE).exists():
    raise ConfigError(f"{flag}={path}: no {orbax_params.CONFIG_FILE}; give a run directory of "
                      "experiments/pretrain.py or a params directory of experiments/convert.py.")
  return orbax_params.read_config(str(path))


def _same_model(flag: str, names: Sequence[str], configs: Sequence[ModelConfig]) -> ModelConfig:
  for p, c in zip(names[1:], configs[1:]):
    diff = [f"{f.name}={getattr(c, f.name)} vs {getattr(configs[0], f.name)}"
            for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(configs[0], f.name)]
    if diff:
      raise ConfigError(f"{flag}: {p} is another model than {names[0]} ({'; '.join(diff)}); average "
                        "checkpoints of one model.")
  return configs[0]


def _run_root(run_dir: str) -> epath.Path:
  return epath.Path(run_dir if "://" in run_dir else os.path.abspath(run_dir))


def _run_steps(run_dir: str, flag: str) -> tuple[epath.Path, list[int]]:
  ckpt_dir = _run_root(run_dir) / "checkpoints"
  found = checkpoint.saved_steps(str(ckpt_dir))  # finished steps only, not a write in flight
  if not found:
    raise ConfigError(f"{flag}={run_dir}: no checkpoints in {ckpt_dir}; give the {flag} of a "
                      "pretraining run that saved some (see --checkpoint_every).")
  return ckpt_dir, found


def run_sources(run_dir: str, steps: Sequence[int] | None = None,
                last: int | None = None) -> tuple[ModelConfig, list[Source]]:
  """The checkpoints of a pretraining run directory: `steps`, the `last` K, or every finished one."""
  if steps and last is not None:
    raise ConfigError("--steps and --last both pick checkpoints of --run_dir; give one of them.")
  if last is not None and last < 1:
    raise ConfigError(f"--last={last}: give a number of checkpoints >= 1.")
  ckpt_dir, found = _run_steps(run_dir, "--run_dir")
  if steps:
    missing = sorted(set(steps) - set(found))
    if missing:
      raise ConfigError(f"--steps: {','.join(map(str, missing))} not in --run_dir={run_dir} (it has "
                        f"{','.join(map(str, found))}); give steps it holds, or leave --steps out for all.")
    found = sorted(set(steps))
  elif last is not None:
    if last > len(found):
      raise ConfigError(f"--last={last}: --run_dir={run_dir} has {len(found)} checkpoints "
                        f"({','.join(map(str, found))}); give --last={len(found)} or fewer.")
    found = found[-last:]
  config = _config(_run_root(run_dir), "--run_dir")
  return config, [Source(f"step {s}", str(ckpt_dir / str(s) / "state"), True) for s in found]


def latest_sources(run_dirs: Sequence[str]) -> tuple[ModelConfig, list[Source]]:
  """The latest checkpoint of each of several runs (per-stage model averaging); their models must agree."""
  if not run_dirs:
    raise ConfigError("--run_dirs: no runs given; list pretraining run directories, comma-separated.")
  sources = []
  for d in run_dirs:
    ckpt_dir, found = _run_steps(d, "--run_dirs")
    sources.append(Source(f"{d} step {found[-1]}", str(ckpt_dir / str(found[-1]) / "state"), True))
  configs = [_config(_run_root(d), "--run_dirs") for d in run_dirs]
  return _same_model("--run_dirs", run_dirs, configs), sources


def params_sources(paths: Sequence[str]) -> tuple[ModelConfig, list[Source]]:
  """Params-only directories (interop.orbax.save_params); their model configs must agree."""
  if not paths:
    raise ConfigError("--inputs: no checkpoints given; list params directories, comma-separated.")
  configs = [_config(epath.Path(os.path.abspath(p)), "--inputs") for p in paths]
  return _same_model("--inputs", paths, configs), \
      [Source(p, os.path.join(os.path.abspath(p), "params"), False) for p in paths]


def normalized_weights(weights: Sequence[float] | None, sources: Sequence[Source]) -> list[float]:
  """One non-negative weight per source, normalized (in float64) to sum 1; None: uniform."""
  if weights is None or len(weights) == 0:
    return [1.0 / len(sources)] * len(sources)
  given = ",".join(f"{w:g}" for w in weights)
  if len(weights) != len(sources):
    raise ConfigError(f"--weights={given}: {len(weights)} weights for {len(sources)} checkpoints "
                      f"({', '.join(s.label for s in sources)}); give one per checkpoint, in that order.")
  bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
  if bad:
    raise ConfigError(f"--weights={given}: {bad[0]:g} is not a non-negative number; give weights >= 0 "
                      "(they are normalized to sum 1).")
  total = math.fsum(weights)
  if total <= 0:
    raise ConfigError(f"--weights={given}: all zero; give at least one positive weight.")
  return [float(np.float64(w) / np.float64(total)) for w in weights]


def _check_shapes(src: Source, target: Any, flag: str) -> None:
  """Every saved param has the shape the model config gives it, checked from the metadata (no reads)."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(src.path).item_metadata.tree
  saved = tree["params"] if src.in_state else tree
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
  have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  bad = [f"{k}: {have.get(k, 'missing')} vs {want[k]}" for k in want if have.get(k) != tuple(want[k])]
  if bad:
    raise ConfigError(f"{flag}: {src.label} does not match the model config ({bad[0]}"
                      f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); average checkpoints of "
                      "one model.")


def _nest(keys: Sequence[str], leaf: Any) -> dict:
  for k in reversed(keys):
    leaf = {k: leaf}
  return leaf


def _get(tree: Any, keys: Sequence[str]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


def _restore_leaf(src: Source, keys: Sequence[str], target: jax.ShapeDtypeStruct) -> jax.Array:
  """The one param at `keys` of `src`, laid out as `target` says; nothing else is read."""
  item = _nest((["params"] if src.in_state else []) + list(keys), target)
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(src.path, args=args)
  return _get(out, (["params"] if src.in_state else []) + list(keys))


def _split(a):  # Veltkamp: a = hi + lo, each with at most 12 significant bits (fp32: 24)
  c = a * 4097.0
  hi = c - (c - a)
  return hi, a - hi


def _add(hi, lo, x, w_hi, w_lo):
  """(hi, lo) += (w_hi + w_lo)·x, compensated: w_hi·x exactly (TwoProduct), each addition's error kept."""
  def two_sum(s_hi, s_lo, y):
    s = s_hi + y
    v = s - s_hi
    return s, s_lo + ((s_hi - (s - v)) + (y - v))

  x = x.astype(jnp.float32)
  p = w_hi * x
  (xh, xl), (wh, wl) = _split(x), _split(w_hi)
  e = ((wh * xh - p) + wh * xl + wl * xh) + wl * xl  # w_hi·x - p, exactly
  hi, lo = two_sum(hi, lo, p)
  return hi, lo + (e + w_lo * x)


_add_jit = jax.jit(_add, donate_argnums=(0, 1))  # elementwise: the sum keeps the param's sharding
_round = jax.jit(lambda hi, lo, dtype: (hi + lo).astype(dtype), static_argnums=2, donate_argnums=0)


def _averaged_leaves(config: ModelConfig, sources: Sequence[Source], mesh: Mesh, flag: str,
                     weights: Sequence[float] | None) -> Iterator[tuple[list[str], jax.Array]]:
  """(keys, weighted mean) per param, one leaf at a time; all checks before the first read."""
  if not sources:
    raise ConfigError(f"{flag}: no checkpoints to average.")
  w = normalized_weights(weights, sources)
  target = params_lib.abstract_sharded_params(config, mesh)
  for src in sources:
    _check_shapes(src, target, flag)
  w_hi = [np.float32(x) for x in w]
  w_lo = [np.float32(x - float(h)) for x, h in zip(w, w_hi)]
  for path, t in jax.tree_util.tree_leaves_with_path(target):
    keys = [k.key for k in path]
    hi = jnp.zeros(t.shape, jnp.float32, device=t.sharding)
    lo = jnp.zeros(t.shape, jnp.float32, device=t.sharding)
    for src, wh, wl in zip(sources, w_hi, w_lo):
      if wh == 0 and wl == 0:
        continue  # a zero weight reads nothing
      hi, lo = _add_jit(hi, lo, _restore_leaf(src, keys, t), wh, wl)  # the restored leaf is freed here
    yield keys, _round(hi, lo, t.dtype)


def average_params(config: ModelConfig, sources: Sequence[Source], mesh: Mesh, flag: str = "--inputs",
                   weights: Sequence[float] | None = None) -> Any:
  """The weighted mean of the sources' params as a tree on `mesh` (one copy of the params, on the
  devices), laid out as `config` says, in its param_dtype."""
  out: dict = {}
  for keys, leaf in _averaged_leaves(config, sources, mesh, flag, weights):
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def write_average(output: str, config: ModelConfig, sources: Sequence[Source], mesh: Mesh,
                  flag: str = "--inputs", weights: Sequence[float] | None = None) -> None:
  """Streams the weighted mean of the sources' params into `output` (params-only, as
  interop.orbax.save_params writes it), one leaf at a time: no copy of the whole params is ever made."""
  out = epath.Path(os.path.abspath(output))
  pending = out / _PENDING
  for keys, leaf in _averaged_leaves(config, sources, mesh, flag, weights):
    ocp_partial.save(pending, _nest(keys, leaf))
    del leaf  # written: the next leaf takes its place
  ocp_partial.finalize(pending)
  if jax.process_index() == 0:
    (pending / _STATE).rename(out / "params")
    shutil.rmtree(pending)
    # Last: its presence says the params are complete.
    (out / orbax_params.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))


def average(output: str, mesh: Mesh, *, run_dir: str | None = None, steps: Sequence[int] | None = None,
            last: int | None = None, run_dirs: Sequence[str] | None = None,
            inputs: Sequence[str] | None = None, weights: Sequence[float] | None = None,
            on_each: Callable[[Source, float], None] = lambda s, w: None) -> tuple[ModelConfig, list[Source]]:
  """Average the checkpoints of `run_dir` (`steps` or the `last` K, default all), the latest of each of
  `run_dirs`, or the params dirs `inputs`, weighted by `weights` (default uniform); stream the average into
  `output` (params-only). Returns (config, the sources averaged)."""
  if sum([run_dir is not None, bool(run_dirs), bool(inputs)]) != 1:
    raise ConfigError("give one of --run_dir (with --steps or --last), --run_dirs or --inputs.")
  if (steps or last is not None) and run_dir is None:
    raise ConfigError("--steps and --last pick checkpoints of --run_dir; with --run_dirs or --inputs, "
                      "list the directories instead.")
  out = os.path.abspath(output)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"--output={output} exists and is not an empty directory; give a new one.")
  if run_dir is not None:
    (config, sources), flag = run_sources(run_dir, steps, last), "--run_dir"
  elif run_dirs:
    (config, sources), flag = latest_sources(run_dirs), "--run_dirs"
  else:
    (config, sources), flag = params_sources(inputs), "--inputs"
  w = normalized_weights(weights, sources)
  for src, x in zip(sources, w):
    on_each(src, x)
  write_average(out, config, sources, mesh, flag, weights)
  return config, sources
