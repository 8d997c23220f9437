"""Meshes from the topology (mesh_utils; hybrid ICI x DCN across slices) and the context axis."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils

from llama_jax import config as C
from llama_jax.errors import ConfigError
from llama_jax.model import params as P
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a device: GPUs are ordered by id, multislice groups by slice_index."""
  id: int
  slice_index: int = 0
  platform: str = "gpu"
  device_kind: str = "fake"
  process_index: int = 0


def test_make_mesh_takes_keywords_only_and_has_a_context_axis():
  assert all(p.kind == p.KEYWORD_ONLY for p in inspect.signature(sharding.make_mesh).parameters.values())
  with pytest.raises(TypeError):
    sharding.make_mesh(1, -1, 1)  # pylint: disable=too-many-function-args
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
  with pytest.raises(ConfigError, match=r"--mesh_context=0: must be >= 1"):
    sharding.make_mesh(context=0)
  with pytest.raises(ConfigError, match=r"--mesh_fsdp=-1 x --mesh_context=3 does not divide the 8 devices"):
    sharding.make_mesh(context=3)


@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (2, 2, 1, 2), (1, 2, 2, 2)])
def test_device_order_is_mesh_utils(shape):
  data, fsdp, context, tensor = shape
  mesh = sharding.make_mesh(data=data, fsdp=fsdp, context=context, tensor=tensor)
  np.testing.assert_array_equal(mesh.devices, mesh_utils.create_device_mesh(shape, jax.devices()))


def test_gpu_devices_are_ordered_by_topology_not_by_list_order():
  devices = [FakeDevice(i) for i in (3, 1, 0, 2, 7, 5, 6, 4)]  # e.g. process order != global numbering
  mesh = sharding.make_mesh(fsdp=4, tensor=2, devices=devices)
  assert [d.id for d in mesh.devices.flat] == list(range(8))


def test_multislice_puts_data_across_slices():
  # Two slices of 4 devices, listed interleaved: each (fsdp, context, tensor) block is one slice.
  devices = [FakeDevice(i, slice_index=i % 2) for i in range(8)]
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all()
  np.testing.assert_array_equal(
      mesh.devices, mesh_utils.create_hybrid_device_mesh((1, 2, 1, 2), (2, 1, 1, 1), devices))
  with pytest.raises(ConfigError, match=r"--mesh_data=1: the devices span 2 slices .* a multiple of 2"):
    sharding.make_mesh(devices=devices)


def _loss_and_grads(config, params, tokens, mesh):
  def loss(p, tokens):
    logits = Transformer(config).apply({"params": p}, tokens[:, :-1])
    # fp32 log-softmax: the reference loss of the step
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  shardings = P.param_shardings(config, mesh)
  params = jax.device_put(params, shardings)
  tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  with sharding.use(mesh, sharding.logical_rules(config, mesh)):
    value, grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
  return float(value), jax.device_get(grads)


def test_context_axis_splits_the_sequence_and_keeps_the_loss():
  config = C.TINY
  base = sharding.make_mesh(fsdp=4, tensor=2)
  ctx = sharding.make_mesh(fsdp=2, context=2, tensor=2)
  params = jax.device_get(P.init_params(config, base, jax.random.key(0)))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 17)).astype(np.int32)
  # The activations' sequence dim is split over `context`.
  spec = sharding.nn.logical_to_mesh_axes(("act_batch", "act_seq"), sharding.logical_rules(config, ctx))
  assert tuple(spec) == (("data", "fsdp"), "context")
  loss1, grads1 = _loss_and_grads(config, params, tokens, base)
  loss2, grads2 = _loss_and_grads(config, params, tokens, ctx)
  assert abs(loss1 - loss2) <= 1e-6, (loss1, loss2)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
