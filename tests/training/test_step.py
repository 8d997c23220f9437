"""The train step: learns, sharded = single device, accumulation = full batch, donation, decay mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.evals import heldout
from llama_jax.training import losses, optim, step as train
from llama_jax.parallel import sharding
from llama_jax.errors import ConfigError
from llama_jax.model.transformer import Transformer

from _adam_bound import adam_param_tolerance  # tests/training/ is on sys.path (pytest rootdir-less)

CFG = C.TINY
OPT = optim.OptimizerConfig(peak_lr=3e-3, final_lr=3e-4, warmup_steps=0, total_steps=100)
B, T = 8, 16


def make_batch(seed=0, b=B, t=T, vocab=CFG.vocab_size):
  """A packed batch as the data pipeline makes it: two documents per row, padding at the end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  segment_ids = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  for i in range(b):
    cut, end = rng.integers(2, t - 4), rng.integers(t - 3, t + 1)
    segment_ids[i, :cut], segment_ids[i, cut:end] = 1, 2
    positions[i, :cut], positions[i, cut:end] = np.arange(cut), np.arange(end - cut)
  loss_mask = (segment_ids > 0).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids, positions=positions,
              loss_mask=loss_mask)


def _mesh(shape):
  data, fsdp, tensor = shape
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor])


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def mesh8():
  return _mesh((1, 4, 2))


@pytest.fixture(scope="module")
def step8(mesh8):
  return train.make_train_step(CFG, OPT, mesh8)


@pytest.fixture(scope="module")
def host_state():
  """An initial state on one device, as host arrays (each test puts it where it needs it)."""
  state = train.create_train_state(CFG, OPT, _mesh((1, 1, 1)), jax.random.key(0))
  return _host(state.replace(rng=jax.random.key_data(state.rng)))


def _put(host_state, mesh, opt=OPT):
  state = jax.device_put(host_state, train.state_shardings(CFG, opt, mesh))
  return state.replace(rng=jax.random.wrap_key_data(state.rng))


def test_create_train_state_is_sharded_like_params(mesh8):
  state = train.create_train_state(CFG, OPT, mesh8, jax.random.key(0))
  adam = state.opt_state[1][0]  # chain(clip, adamw(...)): adamw's ScaleByAdamState
  for moments in (adam.mu, adam.nu):
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(moments)):
      assert m.sharding == p.sharding and m.shape == p.shape
  assert tuple(adam.mu["layers"]["mlp"]["w_gate"].sharding.spec) == (None, "fsdp", "tensor")
  assert adam.count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated


def test_loss_goes_down_on_a_repeated_batch(host_state, mesh8, step8):
  state, batch = _put(host_state, mesh8), make_batch()
  losses_seen = []
  for _ in range(6):
    state, metrics = step8(state, batch)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[-1] < 0.7 * losses_seen[0], losses_seen
  assert int(state.step) == 6
  assert float(metrics["tokens"]) == batch["loss_mask"].sum()
  assert float(metrics["lr"]) == pytest.approx(float(optim.make_schedule(OPT)(5)))
  assert np.isfinite(float(metrics["grad_norm"]))


def test_adam_amplifies_ulp_noise_beyond_a_fixed_atol():
  """Why the sharded-step test compares params at a derived bound: two float64 AdamW steps on a gradient
  just below ε, perturbed by 1e-8 (1e-7 of a 0.05 gradient, an ulp-level reduction-order difference),
  move the param by more than the old atol of 1e-6; the bound covers it, and is tight for a large gradient."""
  opt, lrs = OPT, [3e-3, 3e-3]

  def adam(gs):
    m = v = p = 0.0
    for t, (g, lr) in enumerate(zip(gs, lrs), start=1):
      m, v = opt.b1 * m + (1 - opt.b1) * g, opt.b2 * v + (1 - opt.b2) * g * g
      p -= lr * (m / (1 - opt.b1**t)) / (np.sqrt(v / (1 - opt.b2**t)) + opt.eps)
    return p

  for g, dg in [(1e-6, 1e-8), (-3e-6, 1e-8), (0.0, 1e-8), (0.05, 1e-8)]:
    ga, gb = [np.float64(g), np.float64(-0.5 * g)], [np.float64(g + dg), np.float64(-0.5 * g - dg)]
    diff = abs(adam(ga) - adam(gb))
    tol = adam_param_tolerance([{"w": ga[0]}, {"w": ga[1]}], [{"w": gb[0]}, {"w": gb[1]}], lrs,
                               dataclasses.replace(opt, clip_norm=None), {"w": np.float64(0.0)})["w"]
    assert diff <= tol, (g, diff, tol)
    if abs(g) < opt.eps:
      assert diff > 1e-6, (g, diff)  # the old fixed atol was not a bound
    else:
      assert tol < 1e-8, tol  # where the gradient is above the noise, the bound stays tight


def _grads_on(mesh, params, batch):
  f = jax.jit(lambda p, b: train.accumulated_grads(Transformer(CFG), losses.pretrain_loss, p, b, 1)[0])
  with sharding.use(mesh, sharding.logical_rules(CFG, mesh)):
    return _host(f(params, batch))


def test_sharded_step_equals_single_device(host_state, mesh8, step8):
  mesh1 = _mesh((1, 1, 1))
  step1 = train.make_train_step(CFG, OPT, mesh1)
  s1, s8 = _put(host_state, mesh1), _put(host_state, mesh8)
  grads1, grads8, lrs = [], [], []
  for seed in (0, 1):
    batch = make_batch(seed)
    # The gradients each run is about to apply agree to a few float32 ulps of their scale (2e-6 of the
    # leaf's largest entry: 1.2e-7 per rounding, times the depth of a reduction over B·T = 128 tokens).
    g1, g8 = _grads_on(mesh1, s1.params, batch), _grads_on(mesh8, s8.params, batch)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())
    grads1.append(g1)
    grads8.append(g8)
    s1, m1 = step1(s1, batch)
    s8, m8 = step8(s8, batch)
    for k in m1:
      np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-6)
    lrs.append(float(m1["lr"]))
  # Adam divides by √v̂, so the same ulp-level gradient differences move params by up to ~lr·δ/ε where a
  # gradient is below ε: compare at the bound that follows from the measured gradients (see above).
  p1, p8 = _host(s1.params), _host(s8.params)
  tol = adam_param_tolerance(grads1, grads8, lrs, OPT, p1)
  for a, b, t in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), jax.tree.leaves(tol)):
    assert np.all(np.abs(a.astype(np.float64) - b) <= t), np.max(np.abs(a - b) - t)
  # Most coordinates (gradient well above ε) still agree to float32 rounding.
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1))])
  assert np.median(diffs) < 1e-7, np.median(diffs)


def test_accumulated_grads_equal_full_batch_grads(host_state, mesh8):
  model = Transformer(CFG)
  params = _put(host_state, mesh8).params
  batch = make_batch(2, b=16)

  def grads(accum):
    f = jax.jit(lambda p, b: train.accumulated_grads(model, losses.pretrain_loss, p, b, accum))
    with sharding.use(mesh8, sharding.logical_rules(CFG, mesh8)):
      return _host(f(params, batch))

  (g1, l1, aux1), (g4, l4, aux4) = grads(1), grads(4)
  assert aux1["tokens"] == aux4["tokens"] == batch["loss_mask"].sum()
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_train_step_with_grad_accumulation(host_state, mesh8, step8):
  """A=2 over a batch of 16 gives the same loss and gradient norm as A=1 over the same batch."""
  opt2 = dataclasses.replace(OPT, grad_accum_steps=2)
  step2 = train.make_train_step(CFG, opt2, mesh8)
  batch = make_batch(3, b=16)
  _, m1 = step8(_put(host_state, mesh8), batch)
  _, m2 = step2(_put(host_state, mesh8, opt2), batch)
  for k in m1:
    np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-6)
  with pytest.raises(ConfigError, match=r"--batch_size/--grad_accum_steps \(12/2\)=6"):
    step2(_put(host_state, mesh8, opt2), make_batch(b=12))  # microbatch of 6 does not split over 4


def test_donation_consumes_the_old_state(host_state, mesh8, step8):
  state = _put(host_state, mesh8)
  old_leaf = state.params["layers"]["mlp"]["w_up"]
  new, _ = step8(state, make_batch())
  assert old_leaf.is_deleted()  # the buffers were reused for the new state
  new, metrics = step8(new, make_batch())  # and the new state is fine to step again
  assert np.isfinite(float(metrics["loss"])) and int(new.step) == 2


def test_zero_gradient_step_decays_matrices_not_norms(host_state, mesh8):
  """A pluggable loss with zero gradient: only the weight decay moves params, and not the norm scales."""
  def zero_loss(model, params, batch):
    del model
    return 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(params)), {"tokens": jnp.sum(batch["loss_mask"] * 0 + 1.0)}

  step = train.make_train_step(CFG, OPT, mesh8, loss_fn=zero_loss)
  new, metrics = step(_put(host_state, mesh8), make_batch())
  assert float(metrics["grad_norm"]) == 0.0
  p0, p1 = host_state.params, _host(new.params)
  np.testing.assert_array_equal(p1["final_norm"]["scale"], p0["final_norm"]["scale"])
  np.testing.assert_array_equal(p1["layers"]["attn_norm"]["scale"], p0["layers"]["attn_norm"]["scale"])
  factor = 1 - OPT.peak_lr * OPT.weight_decay
  np.testing.assert_allclose(p1["layers"]["mlp"]["w_up"], p0["layers"]["mlp"]["w_up"] * factor, rtol=1e-6)
  np.testing.assert_allclose(p1["embedding"], p0["embedding"] * factor, rtol=1e-6)


def test_eval_step_matches_train_loss(host_state, mesh8, step8):
  state, batch = _put(host_state, mesh8), make_batch(4)
  loss_eval = heldout.evaluate(train.make_eval_step(CFG, mesh8), state.params, [batch])
  _, metrics = step8(state, batch)  # the train loss is at the params before the update
  assert loss_eval == pytest.approx(float(metrics["loss"]), rel=1e-6)


def test_eval_uses_the_training_microbatches(host_state, mesh8):
  """Defect 8: eval ran the whole global batch at once; it runs the same microbatches as training."""
  seen = []

  def recording_loss(model, params, batch):
    seen.append(batch["inputs"].shape)  # at trace time: the rows one forward pass holds
    return losses.pretrain_loss(model, params, batch)

  params, batch = _put(host_state, mesh8).params, make_batch(6, b=16)
  l1 = heldout.evaluate(train.make_eval_step(CFG, mesh8, recording_loss), params, [batch])
  assert set(seen) == {(16, T)}
  seen.clear()
  l2 = heldout.evaluate(train.make_eval_step(CFG, mesh8, recording_loss, grad_accum_steps=2), params, [batch])
  assert set(seen) == {(8, T)}  # every trace of the loss sees one microbatch, never the 16 rows
  assert l2 == pytest.approx(l1, rel=1e-6)


def _scaled_loss(model, params, batch):
  """The pretraining loss times the batch's mean `scale`: a NaN there poisons the loss and gradient."""
  loss_sum, aux = losses.pretrain_loss(model, params, batch)
  return loss_sum * jnp.mean(batch["scale"]), aux


def _hits_loss(model, params, batch):
  """Pretraining loss plus one more metric sum: how many counted targets are the argmax."""
  logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  loss_sum, aux = losses.pretrain_loss(model, params, batch)
  hits = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"]).astype(jnp.float32)
  return loss_sum, {**aux, "hits": hits}


def test_aux_metric_sums_flow_through_the_step(host_state, mesh8):
  """A loss's aux sums reach the metrics summed over microbatches, whatever the loss, and divided by the
  count the loss is divided by (aux["tokens"], itself reported as the sum)."""
  batch = make_batch(7, b=16)
  model = Transformer(CFG)
  logits = _host(jax.jit(lambda p: model.apply({"params": p}, batch["inputs"], batch["positions"],
                                               batch["segment_ids"]))(host_state.params))
  want = ((logits.argmax(-1) == batch["targets"]) * batch["loss_mask"]).sum()
  for accum in (1, 2):
    opt = dataclasses.replace(OPT, grad_accum_steps=accum)
    _, m = train.make_train_step(CFG, opt, mesh8, loss_fn=_hits_loss)(_put(host_state, mesh8, opt), batch)
    assert float(m["tokens"]) == batch["loss_mask"].sum()
    assert float(m["hits"]) == pytest.approx(want / batch["loss_mask"].sum(), rel=1e-7)


def test_non_finite_step_is_skipped(host_state, mesh8):
  """Defect 3: a NaN loss/gradient leaves params and optimizer state bitwise as they were; the step
  counter advances and metrics["skipped"] says so."""
  step = train.make_train_step(CFG, OPT, mesh8, loss_fn=_scaled_loss)
  state = _put(host_state, mesh8)
  state, m = step(state, {**make_batch(0), "scale": np.ones(B, np.float32)})
  assert float(m["skipped"]) == 0.0
  before = _host((state.params, state.opt_state))
  poison = np.ones(B, np.float32)
  poison[3] = np.nan
  state, m = step(state, {**make_batch(1), "scale": poison})
  assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  after = _host((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2
  state, m = step(state, {**make_batch(2), "scale": np.ones(B, np.float32)})
  assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
  assert not np.array_equal(_host(state.params)["embedding"], before[0]["embedding"])


def test_batch_and_seq_len_errors_name_the_flag(mesh8):
  with pytest.raises(ConfigError, match="--seq_len"):
    train.check_batch_shape(8, CFG.max_seq_len + 1, CFG, OPT, mesh8)
  with pytest.raises(ConfigError, match="--batch_size"):
    train.check_batch_shape(6, 16, CFG, OPT, mesh8)
  with pytest.raises(ConfigError, match="--grad_accum_steps"):
    train.check_batch_shape(8, 16, CFG, dataclasses.replace(OPT, grad_accum_steps=3), mesh8)


def test_cross_entropy_matches_float64_numpy():
  rng = np.random.default_rng(5)
  logits = (rng.standard_normal((2, 5, 11)) * 4).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
  mask = (rng.random((2, 5)) > 0.3).astype(np.int32)
  x = logits.astype(np.float64)
  logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  nll = logz - np.take_along_axis(x, targets[..., None], -1)[..., 0]
  from beartype import beartype
  from jaxtyping import jaxtyped
  total, count = jaxtyped(typechecker=beartype)(losses.cross_entropy)(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert total.dtype == jnp.float32 and float(count) == mask.sum()
  np.testing.assert_allclose(float(total), (nll * mask).sum(), rtol=1e-6)
  # bf16 logits are upcast before the normalizer.
  total_bf16, _ = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, mask)
  assert total_bf16.dtype == jnp.float32
