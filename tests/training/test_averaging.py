"""Checkpoint averaging: the average of three checkpoints on a 2x4 mesh equals the float64 NumPy mean, from
a run directory or params-only directories; it is read back by --init_from; bad input is one line."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from llama_jax import config as C
from llama_jax.errors import ConfigError
from llama_jax.interop import orbax as orbax_params
from llama_jax.model import params as P
from llama_jax.parallel import sharding
from llama_jax.training import averaging, checkpoint, optim
from llama_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "average.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
# 4 KV heads so that tensor=4 splits them.
CFG = dataclasses.replace(C.TINY, num_layers=1, num_kv_heads=4)
STEPS = (10, 20, 30)


def _mesh():
  return sharding.make_mesh(fsdp=2, tensor=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run directory with three train-state checkpoints (params from three seeds), as pretraining writes
  it, and the same params as params-only directories; plus their params in float64 on the host."""
  root = tmp_path_factory.mktemp("avg")
  mesh = _mesh()
  ckpt = checkpoint.Checkpointer(str(root / "run" / "checkpoints"), save_interval_steps=1, async_save=False)
  host = []
  for i, step in enumerate(STEPS):
    state = step_lib.create_train_state(CFG, optim.OptimizerConfig(), mesh, jax.random.key(i))
    ckpt.save(step, state, force=True)
    orbax_params.save_params(str(root / f"p{step}"), state.params, CFG)
    host.append(jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(state.params)))
  ckpt.close()
  (root / "run" / "model_config.json").write_text(json.dumps(dataclasses.asdict(CFG)))
  return root, host


def _assert_mean(avg, host, which):
  ref = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *[host[i] for i in which])
  for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(avg)), jax.tree.leaves(ref)):
    assert a.dtype == np.float32
    # fp32, summed exactly (compensated) and rounded twice: within 1e-7 of the leaf's scale.
    err = np.max(np.abs(a.astype(np.float64) - r)) / np.max(np.abs(r))
    assert err <= 1e-7, (jax.tree_util.keystr(path), err)


def test_average_of_a_run_equals_the_float64_mean_and_loads_as_init_from(run, tmp_path):
  root, host = run
  mesh = _mesh()
  seen = []
  config, avg = averaging.average(str(tmp_path / "avg"), mesh, run_dir=str(root / "run"),
                                  on_each=lambda s: seen.append(s.label))
  assert seen == ["step 10", "step 20", "step 30"] and config == CFG
  _assert_mean(avg, host, [0, 1, 2])
  # Sharded as the params are; what --init_from=orbax: reads is the same average.
  want = P.param_shardings(CFG, mesh)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, avg, want)))
  config2, loaded = orbax_params.load_params(str(tmp_path / "avg"), mesh)
  assert config2 == CFG
  for a, b in zip(jax.tree.leaves(jax.device_get(avg)), jax.tree.leaves(jax.device_get(loaded))):
    np.testing.assert_array_equal(a, b)


def test_steps_and_params_dirs(run, tmp_path):
  root, host = run
  _, avg = averaging.average(str(tmp_path / "a"), _mesh(), run_dir=str(root / "run"), steps=[30, 10])
  _assert_mean(avg, host, [0, 2])
  _, avg = averaging.average(str(tmp_path / "b"), _mesh(), inputs=[str(root / f"p{s}") for s in STEPS])
  _assert_mean(avg, host, [0, 1, 2])


def test_bad_input_names_the_flag(run, tmp_path):
  root, _ = run
  mesh = _mesh()
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(ConfigError, match=r"--run_dir=.*empty_run: no checkpoints"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(tmp_path / "empty_run"))
  with pytest.raises(ConfigError, match=r"--steps: 15 not in --run_dir"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), steps=[10, 15])
  with pytest.raises(ConfigError, match="either --run_dir"):
    averaging.average(str(tmp_path / "o"), mesh)
  # A params dir of another model: its config says so.
  other = dataclasses.replace(CFG, num_layers=2)
  orbax_params.save_params(str(tmp_path / "other"), P.init_params(other, mesh, jax.random.key(9)), other)
  with pytest.raises(ConfigError, match=r"--inputs: .*other is another model .*num_layers=2 vs 1"):
    averaging.average(str(tmp_path / "o"), mesh, inputs=[str(root / "p10"), str(tmp_path / "other")])
  # A run whose model_config.json does not match its checkpoints: the shapes say so, before any read.
  bad_run = tmp_path / "bad_run"
  bad_run.mkdir()
  os.symlink(root / "run" / "checkpoints", bad_run / "checkpoints")
  (bad_run / "model_config.json").write_text(json.dumps(dataclasses.asdict(other)))
  with pytest.raises(ConfigError, match=r"--run_dir: step 10 does not match the model config \(\['layers'\]"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(bad_run))
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("x")
  with pytest.raises(ConfigError, match="--output=.*taken exists"):
    averaging.average(str(tmp_path / "taken"), mesh, inputs=[str(root / "p10")])


def _defined_flags():
  return set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', open(SCRIPT).read()))


def test_the_entry_point_prints_each_checkpoint_and_errors_in_one_line(run, tmp_path):
  root, _ = run
  proc = subprocess.run([sys.executable, SCRIPT, f"--run_dir={root / 'run'}", "--steps=10,20",
                         f"--output={tmp_path / 'avg'}"], capture_output=True, text=True, env=ENV, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("added step 10") and lines[1].startswith("added step 20"), proc.stdout
  assert lines[2] == f"wrote the average to {tmp_path / 'avg'}"
  proc = subprocess.run([sys.executable, SCRIPT, f"--inputs={tmp_path / 'nope'}",
                         f"--output={tmp_path / 'x'}"], capture_output=True, text=True, env=ENV, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 1
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --inputs="), proc.stderr[-2000:]
  assert set(re.findall(r"--(\w+)", err[0])) <= _defined_flags()
