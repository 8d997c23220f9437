"""One model factory: params, the train/eval steps and sampling all build their model through it."""

import jax
import numpy as np

from llama_jax import config as C
from llama_jax.inference import sample
from llama_jax.model import factory, params as P
from llama_jax.model.transformer import Transformer
from llama_jax.parallel import sharding
from llama_jax.training import step as train


def test_every_user_builds_the_model_through_make_model(monkeypatch):
  built = []
  make = factory.make_model

  def recording(config):
    built.append(config)
    return make(config)

  monkeypatch.setattr(factory, "make_model", recording)
  cfg = C.TINY
  assert isinstance(make(cfg), Transformer)
  P.abstract_params(cfg)
  assert built == [cfg]
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  train.make_eval_step(cfg, mesh)
  n = len(built)
  assert n >= 2 and all(c == cfg for c in built)
  params = P.init_params(cfg, mesh, jax.random.key(0))
  new = sample.generate(cfg, params, [[1, 2, 3]], max_new_tokens=2)
  assert len(built) > n and len(new[0]) == 2 and np.all(np.asarray(new[0]) < cfg.vocab_size)
