"""One process of the 2-process CPU test: flags/env -> resolve -> initialize -> a global sum.

Run by tests/test_distributed.py; prints one JSON line for it to parse.
"""
import json

from absl import app

from llama_jax.parallel import distributed

distributed.define_flags()


def main(argv):
  del argv
  spec = distributed.from_flags()
  distributed.initialize(spec, timeout_s=60)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()), ("x",))
  # Process p holds rows [8p, 8p + 8) of arange(16); only a cross-process reduction sees all 16.
  n = 2 * jax.local_device_count()
  local_x = np.arange(n, dtype=np.float32) + jax.process_index() * n
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local_x,
                                             (n * jax.process_count(),))
  replicated = NamedSharding(mesh, P())
  total = jax.jit(jnp.sum, out_shardings=replicated)(x)
  sq = jax.jit(lambda v: v @ v, out_shardings=replicated)(x)
  print(json.dumps({
      "source": spec.source, "spec_process_id": spec.process_id,
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
      "sum": float(total), "sumsq": float(sq),
  }), flush=True)


if __name__ == "__main__":
  app.run(main)
