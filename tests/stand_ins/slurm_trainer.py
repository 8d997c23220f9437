"""Stand-in for experiments/<entry>.py in a SLURM task: what pretrain.py does before training,
`distributed.initialize(distributed.from_flags())`, with jax.distributed.initialize recorded instead
of run. Writes $SLURM_SUBMIT_DIR/tasks/<SLURM_PROCID or 'single'>.json."""
import json
import os
import sys
import types

recorded = []
jax = types.ModuleType("jax")  # no real jax: the arguments are what we check, and it starts fast
jax.distributed = types.SimpleNamespace(initialize=lambda **kw: recorded.append(kw))
sys.modules["jax"] = jax

from absl import flags  # noqa: E402

from llama_jax.parallel import distributed  # noqa: E402

fv = flags.FlagValues()
distributed.define_flags(fv)
fv(sys.argv[:1], known_only=True)
distributed.initialize(distributed.from_flags(fv))
out_dir = os.path.join(os.environ.get("SLURM_SUBMIT_DIR", os.getcwd()), "tasks")
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f"{os.environ.get('SLURM_PROCID', 'single')}.json"), "w") as f:
  json.dump({"initialize": recorded, "argv": sys.argv[1:], "cpus": os.environ.get("FAKE_STEP_CPUS"),
             "local_id": os.environ.get("SLURM_LOCALID"),
             "python": list(sys.version_info[:2])}, f)
