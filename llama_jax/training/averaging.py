"""The average of several checkpoints' params, saved as params-only ([P] §3.1.3: the final pretrained
model is the average of the checkpoints kept during annealing).

Inputs are either the steps of a run directory (`<run_dir>/checkpoints/<step>/state`, written by
training.checkpoint.Checkpointer, with `<run_dir>/model_config.json` beside them), or params-only
directories written by interop.orbax.save_params. Each is restored alone, onto the mesh as the params are
laid out, and added to a compensated fp32 running sum sharded the same way (two fp32 copies), so at most
three copies of the params are ever on the devices; the sum is divided once at the end. The average is
written with interop.orbax.save_params, so `--init_from=orbax:<output>` and experiments/convert.py read it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.training import checkpoint
from llama_jax.interop import orbax as orbax_params
from llama_jax.model import params as params_lib


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


def run_sources(run_dir: str, steps: Sequence[int] | None = None) -> tuple[ModelConfig, list[Source]]:
  """The checkpoints of a pretraining run directory: `steps`, or every finished one."""
  root = epath.Path(run_dir if "://" in run_dir else os.path.abspath(run_dir))
  ckpt_dir = root / "checkpoints"
  found = checkpoint.saved_steps(str(ckpt_dir))  # finished steps only, not a write in flight
  if not found:
    raise ConfigError(f"--run_dir={run_dir}: no checkpoints in {ckpt_dir}; give the --run_dir of a "
                      "pretraining run that saved some (see --checkpoint_every).")
  if steps:
    missing = sorted(set(steps) - set(found))
    if missing:
      raise ConfigError(f"--steps: {','.join(map(str, missing))} not in --run_dir={run_dir} (it has "
                        f"{','.join(map(str, found))}); give steps it holds, or leave --steps out for all.")
    found = sorted(set(steps))
  config = _config(root, "--run_dir")
  return config, [Source(f"step {s}", str(ckpt_dir / str(s) / "state"), True) for s in found]


def params_sources(paths: Sequence[str]) -> tuple[ModelConfig, list[Source]]:
  """Params-only directories (interop.orbax.save_params); their model configs must agree."""
  if not paths:
    raise ConfigError("--inputs: no checkpoints given; list params directories, comma-separated.")
  configs = [_config(epath.Path(os.path.abspath(p)), "--inputs") for p in paths]
  for p, c in zip(paths[1:], configs[1:]):
    diff = [f"{f.name}={getattr(c, f.name)} vs {getattr(configs[0], f.name)}"
            for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(configs[0], f.name)]
    if diff:
      raise ConfigError(f"--inputs: {p} is another model than {paths[0]} ({'; '.join(diff)}); average "
                        "checkpoints of one model.")
  return configs[0], [Source(p, os.path.join(os.path.abspath(p), "params"), False) for p in paths]


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


def _restore(src: Source, target: Any) -> Any:
  item = {"params": target} if src.in_state else target
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=src.in_state)  # the optimizer state stays on disk
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(src.path, args=args)
  return out["params"] if src.in_state else out


def average_params(config: ModelConfig, sources: Sequence[Source], mesh: Mesh, flag: str = "--inputs",
                   on_each: Callable[[Source], None] = lambda s: None) -> Any:
  """The mean of the sources' params, laid out on `mesh` as `config` says, in its param_dtype."""
  if not sources:
    raise ConfigError(f"{flag}: no checkpoints to average.")
  target = params_lib.abstract_sharded_params(config, mesh)
  for src in sources:  # all checks before the first read
    _check_shapes(src, target, flag)
  shardings = jax.tree.map(lambda t: t.sharding, target)
  # fp32 whatever the param dtype, and compensated (Kahan-Babuska/TwoSum: `lo` keeps the low bits each
  # addition to `hi` rounds off), so the mean is as if summed exactly and rounded twice at the end: a
  # plain fp32 sum of N checkpoints loses up to N/2 ulps of the sum's size.
  def add(sum_hi_lo, p):
    def two_sum(hi, lo, x):
      x = x.astype(jnp.float32)
      s = hi + x
      v = s - hi
      return s, lo + ((hi - (s - v)) + (x - v))

    hi, lo = sum_hi_lo
    out = jax.tree.map(two_sum, hi, lo, p)
    return jax.tree.map(lambda o: o[0], out, is_leaf=lambda o: isinstance(o, tuple)), \
        jax.tree.map(lambda o: o[1], out, is_leaf=lambda o: isinstance(o, tuple))

  add = jax.jit(add, out_shardings=(shardings, shardings), donate_argnums=0)
  zeros = jax.jit(lambda: jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), target),
                  out_shardings=shardings)
  total = (zeros(), zeros())
  for src in sources:
    total = add(total, _restore(src, target))  # the restored copy is freed before the next is read
    on_each(src)
  n = len(sources)
  mean = lambda hi, lo, t: ((hi + lo) / n).astype(t.dtype)
  return jax.jit(lambda hi, lo: jax.tree.map(mean, hi, lo, target), out_shardings=shardings,
                 donate_argnums=0)(*total)  # the mean takes the place of `hi`


def average(output: str, mesh: Mesh, *, run_dir: str | None = None, steps: Sequence[int] | None = None,
            inputs: Sequence[str] | None = None,
            on_each: Callable[[Source], None] = lambda s: None) -> tuple[ModelConfig, Any]:
  """Average the checkpoints of `run_dir` (`steps`, default all) or the params dirs `inputs`; save to
  `output` (params-only) and return (config, average params)."""
  if (run_dir is None) == (not inputs):
    raise ConfigError("give either --run_dir (and optionally --steps) or --inputs, not both or neither.")
  if steps and run_dir is None:
    raise ConfigError("--steps picks checkpoints of --run_dir; with --inputs, list the directories instead.")
  out = os.path.abspath(output)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"--output={output} exists and is not an empty directory; give a new one.")
  if run_dir is not None:
    config, sources = run_sources(run_dir, steps)
    flag = "--run_dir"
  else:
    config, sources = params_sources(inputs)
    flag = "--inputs"
  params = average_params(config, sources, mesh, flag, on_each)
  orbax_params.save_params(out, params, config)
  return config, params
