"""The train state, the one train step and the eval step.

`make_train_step` jits one pure `train_step(state, batch) -> (state, metrics)` with explicit shardings
and the state donated. The loss is a parameter (llama_jax/training/losses.py): pretraining, SFT and DPO differ by
the loss and the data only. With `grad_accum_steps = A` the global batch [A·B_micro, T] is split into A
microbatches that a `lax.scan` runs one after another, summing fp32 gradients; one optimizer update
per call.

Batch: a dict of int32 [B, T] arrays from the data pipeline: inputs, targets, segment_ids (0 = padding),
positions, loss_mask (1 where the target counts), and row_index when the mesh has context > 1 (the batch
is then in the context-parallel layout: llama_jax/parallel/context.py). B is split over the (data, fsdp)
mesh axes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.training import losses
from llama_jax.model import params as params_lib
from llama_jax.parallel import context, sharding
from llama_jax.errors import ConfigError
from llama_jax.config import ModelConfig
from llama_jax.model import factory
from llama_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: Any
  opt_state: Any
  # The run's base key. No current loss draws random numbers; one that does should use
  # fold_in(rng, step), so a restarted run draws the same numbers.
  rng: jax.Array


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _abstract_unboxed_params(model_cfg: ModelConfig) -> Any:
  return nn.unbox(params_lib.abstract_params(model_cfg))


def state_shardings(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh) -> TrainState:
  """NamedShardings of every leaf of the TrainState: optimizer moments shard like their params."""
  param_sh = params_lib.param_shardings(model_cfg, mesh)
  tx = make_optimizer(opt_cfg)
  abstract_opt = jax.eval_shape(tx.init, _abstract_unboxed_params(model_cfg))
  # tree_map_params finds the leaves of the optimizer state that mirror a param (mu, nu); the rest
  # (step counts) are scalars and replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: _replicated(mesh))
  return TrainState(step=_replicated(mesh), params=param_sh, opt_state=opt_sh, rng=_replicated(mesh))


def abstract_state(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and shardings of the TrainState without allocating it (a restore target)."""
  tx = make_optimizer(opt_cfg)
  p = _abstract_unboxed_params(model_cfg)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=p,
                      opt_state=jax.eval_shape(tx.init, p), rng=jax.eval_shape(lambda: jax.random.key(0)))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      state_shardings(model_cfg, opt_cfg, mesh))


def create_train_state(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh,
                       rng: jax.Array, params: Any = None) -> TrainState:
  """Params and optimizer state created directly in their shards; `rng` seeds the init and the
  state's key. `params` (already laid out on `mesh`, e.g. imported weights) replace the random init."""
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    params = params_lib.init_params(model_cfg, mesh, init_rng)
  sh = state_shardings(model_cfg, opt_cfg, mesh)
  opt_state = jax.jit(make_optimizer(opt_cfg).init, out_shardings=sh.opt_state)(params)
  # A jitted copy, not device_put: with several processes device_put refuses a PRNG key for a sharding
  # that spans other processes' devices.
  step, state_rng = jax.jit(lambda r: (jnp.zeros((), jnp.int32), r),
                            out_shardings=(sh.step, sh.rng))(state_rng)
  return TrainState(step=step, params=params, opt_state=opt_state, rng=state_rng)


def check_batch_shape(batch_size: int, seq_len: int, model_cfg: ModelConfig, opt_cfg: OptimizerConfig,
                      mesh: Mesh) -> None:
  """Errors naming the flag, before XLA sees a shape it cannot split."""
  if seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"--seq_len={seq_len} exceeds ModelConfig.max_seq_len={model_cfg.max_seq_len}; "
                      "use a shorter --seq_len.")
  a = opt_cfg.grad_accum_steps
  if batch_size % a:
    raise ConfigError(f"--batch_size={batch_size} is not divisible by --grad_accum_steps={a}; "
                      f"use a multiple of {a}.")
  flag = "--batch_size" if a == 1 else f"--batch_size/--grad_accum_steps ({batch_size}/{a})"
  sharding.check_batch(batch_size // a, mesh, flag=flag)
  context.check_seq_len(seq_len, mesh.shape["context"])


def _microbatches(x: jax.Array, accum: int) -> jax.Array:
  """[A·Bm, ...] → [A, Bm, ...], microbatch i = rows i, i + A, i + 2A, ...

  Taking strided rows keeps every microbatch spread over all data-parallel devices with no data
  movement: each device's contiguous block of rows splits into A pieces.
  """
  b = x.shape[0]
  x = jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
  return jax.lax.with_sharding_constraint(x, PartitionSpec(None, sharding.BATCH_AXES))


def _sum_microbatches(fn: Callable, init: Any, batch: Batch, accum: int) -> Any:
  """`fn(micro)`'s outputs summed over the `accum` microbatches of `batch`, one after another (a scan:
  only one microbatch's activations are alive at a time)."""
  micro = jax.tree.map(lambda x: _microbatches(x, accum), batch)

  def add(total, mb):
    return jax.tree.map(jnp.add, total, fn(mb)), None

  return jax.lax.scan(add, init, micro)[0]


def _zeros_like_aux(loss_fn: losses.LossFn, model: nn.Module, params: Any, batch: Batch,
                    accum: int) -> dict:
  """fp32 zeros shaped like the loss's aux dict (known at trace time from one microbatch's shapes)."""
  micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] // accum, *x.shape[1:]), x.dtype), batch)
  _, aux = jax.eval_shape(lambda p, mb: loss_fn(model, p, mb), params, micro)
  return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux)


def accumulated_grads(model: nn.Module, loss_fn: losses.LossFn, params: Any, batch: Batch, accum: int,
                      param_shardings: Any = None) -> tuple[Any, jax.Array, dict]:
  """(gradient of the mean loss, loss sum, aux sums) over the whole batch, run as `accum` microbatches.

  Each microbatch gives the gradient of its loss *sum*; dividing the total by the total count
  (aux["tokens"]) once gives exactly the full-batch gradient of the mean, whatever `accum` is.
  """
  grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(model, p, mb), has_aux=True)

  def microbatch(mb):
    (loss_sum, aux), grads = grad_fn(params, mb)
    # Accumulate in fp32 whatever the param dtype (as the paper does for its reduce-scatters).
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    return f32(grads), f32(loss_sum), f32(aux)

  if accum == 1:  # no accumulator: zeroing and adding one fp32 copy of every gradient is two more passes
    grads_sum, loss_sum, aux = microbatch(batch)
  else:
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_shardings is not None:  # the fp32 accumulator is sharded like the params
      zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    init = (zeros, jnp.zeros((), jnp.float32), _zeros_like_aux(loss_fn, model, params, batch, accum))
    grads_sum, loss_sum, aux = _sum_microbatches(microbatch, init, batch, accum)
  denom = jnp.maximum(aux["tokens"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads_sum, params)
  return grads, loss_sum, aux


def _schedule_count(opt_state: Any) -> jax.Array:
  """The optimizer's own step count (the one its LR schedule reads)."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  return counts[0]


def make_train_step(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, mesh: Mesh,
                    loss_fn: losses.LossFn = losses.pretrain_loss) -> Callable[[TrainState, Batch],
                                                                               tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)`, jitted once; `state` is donated.

  metrics (fp32 scalars, on device): loss (mean over counted tokens), grad_norm (before clipping),
  lr (the one this update used), skipped (1 if the loss or gradient norm was not finite and the update
  was dropped), tokens (aux["tokens"]: the count the loss is divided by — loss tokens, or pairs for
  DPO and the reward model), and every other sum of the loss's aux divided by that count (e.g. DPO's
  rewards/margins: a mean over pairs).
  """
  model = factory.make_model(model_cfg)
  tx = make_optimizer(opt_cfg)
  schedule = make_schedule(opt_cfg)
  state_sh = state_shardings(model_cfg, opt_cfg, mesh)
  accum = opt_cfg.grad_accum_steps

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    # [B, T], or [B, C, T] for preference pairs: microbatches split B, so a pair never splits.
    b, t = batch["inputs"].shape[0], batch["inputs"].shape[-1]
    check_batch_shape(b, t, model_cfg, opt_cfg, mesh)  # at trace time
    grads, loss_sum, aux = accumulated_grads(model, loss_fn, state.params, batch, accum, state_sh.params)
    count = jnp.maximum(aux["tokens"], 1.0)
    loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
    lr = jnp.asarray(schedule(_schedule_count(state.opt_state)), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # A NaN/Inf loss or gradient must not reach the params: keep the old params and optimizer state
    # (selected, not branched: one compiled program). The step counter still advances, so the host
    # loop's step numbers, checkpoints and logs count batches consumed and the data moves on; the
    # optimizer's own count (LR schedule, Adam's bias correction) counts only the updates applied.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1,
                              params=keep(optax.apply_updates(state.params, updates), state.params),
                              opt_state=keep(opt_state, state.opt_state))
    # Every other aux sum is reported as its mean per counted unit, like the loss.
    means = {k: v if k == "tokens" else v / count for k, v in aux.items()}
    metrics = {**means, "loss": loss, "grad_norm": grad_norm, "lr": lr,
               "skipped": (~finite).astype(jnp.float32)}
    return new_state, metrics

  # One sharding for the whole batch dict (a pytree prefix): every leaf is split on its leading B.
  jitted = jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh, ndim=1)),
                   out_shardings=(state_sh, _replicated(mesh)), donate_argnums=0)
  rules = sharding.logical_rules(model_cfg, mesh)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    with sharding.use(mesh, rules):  # the model's activation constraints resolve onto `mesh`
      return jitted(state, batch)

  step.jitted = jitted  # for .lower(...) / cost analysis
  return step


def make_eval_step(model_cfg: ModelConfig, mesh: Mesh, loss_fn: losses.LossFn = losses.pretrain_loss,
                   grad_accum_steps: int = 1) -> Callable[[Any, Batch], tuple[jax.Array, dict]]:
  """`eval_step(params, batch) -> (loss_sum, aux)`; add these up over batches, then divide by
  aux["tokens"]. The batch runs as `grad_accum_steps` microbatches, as in training: an eval batch is
  as large as a training batch, and holding its activations at once is what accumulation avoids."""
  model = factory.make_model(model_cfg)
  param_sh = params_lib.param_shardings(model_cfg, mesh)

  def eval_step(params, batch):
    b = batch["inputs"].shape[0]
    if b % grad_accum_steps:
      raise ConfigError(f"--batch_size={b} is not divisible by --grad_accum_steps={grad_accum_steps}; "
                        f"use a multiple of {grad_accum_steps}.")

    def microbatch(mb):
      loss_sum, aux = loss_fn(model, params, mb)
      return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (loss_sum, aux))

    init = (jnp.zeros((), jnp.float32), _zeros_like_aux(loss_fn, model, params, batch, grad_accum_steps))
    return _sum_microbatches(microbatch, init, batch, grad_accum_steps)

  jitted = jax.jit(eval_step, in_shardings=(param_sh, sharding.batch_sharding(mesh, ndim=1)),
                   out_shardings=_replicated(mesh))
  rules = sharding.logical_rules(model_cfg, mesh)

  def step(params, batch):
    with sharding.use(mesh, rules):
      return jitted(params, batch)

  return step
