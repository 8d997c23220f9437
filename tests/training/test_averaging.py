"""Checkpoint averaging: the (weighted) average of three checkpoints on a 2x4 mesh equals the float64 NumPy
weighted mean, from a run directory (all, --steps, --last K), the latest of several runs, or params-only
directories; it is streamed one param at a time; --init_from reads it back; bad input is one line."""

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
from llama_jax.interop import init_from, orbax as orbax_params
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


def _assert_mean(avg, host, which, weights=None):
  w = np.ones(len(which)) if weights is None else np.asarray(weights, np.float64)
  w = w / w.sum()
  ref = jax.tree.map(lambda *xs: np.tensordot(w, np.stack(xs), axes=1), *[host[i] for i in which])
  for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(avg)), jax.tree.leaves(ref)):
    assert a.dtype == np.float32
    # fp32, weighted and summed exactly (TwoProduct, TwoSum) and rounded once: within 1e-7 of the leaf's
    # scale (a plain fp32 w*x summed would be off by up to ~1.2e-7 of it).
    err = np.max(np.abs(a.astype(np.float64) - r)) / np.max(np.abs(r))
    assert err <= 1e-7, (jax.tree_util.keystr(path), err)


def _load(out, mesh):
  """What --init_from=orbax:<out> reads; the output holds nothing but the params and their config."""
  assert sorted(os.listdir(out)) == ["model_config.json", "params"]
  config, params = init_from.load_pretrained(f"orbax:{out}", mesh)
  assert config == CFG
  want = P.param_shardings(CFG, mesh)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, params, want)))
  return params


def test_average_of_a_run_equals_the_float64_mean_and_loads_as_init_from(run, tmp_path):
  root, host = run
  mesh = _mesh()
  seen = []
  config, sources = averaging.average(str(tmp_path / "avg"), mesh, run_dir=str(root / "run"),
                                      on_each=lambda s, w: seen.append((s.label, w)))
  assert seen == [("step 10", 1 / 3), ("step 20", 1 / 3), ("step 30", 1 / 3)] and config == CFG
  _assert_mean(_load(tmp_path / "avg", mesh), host, [0, 1, 2])
  # The in-memory average (a run's latest params, continued.latest_params) streams the same way.
  mem = averaging.average_params(CFG, sources, mesh, "--run_dir")
  saved = jax.device_get(_load(tmp_path / "avg", mesh))
  for a, b in zip(jax.tree.leaves(jax.device_get(mem)), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
  # The average generates: the KV-cache generator on the loaded params equals the cache-free oracle.
  from llama_jax.inference import generate, sample
  params = _load(tmp_path / "avg", mesh)
  prompts = [[1, 5, 9], [1, 7]]
  new = generate.generate(CFG, params, prompts, 6, mesh=mesh)
  assert new == sample.generate(CFG, params, prompts, 6) and all(len(t) == 6 for t in new)


def test_weighted_average_of_three_sources(run, tmp_path):
  root, host = run
  mesh = _mesh()
  weights = [3.0, 1.0, 0.7]
  averaging.average(str(tmp_path / "w"), mesh, inputs=[str(root / f"p{s}") for s in STEPS], weights=weights)
  _assert_mean(_load(tmp_path / "w", mesh), host, [0, 1, 2], weights)
  # A zero weight leaves that checkpoint out.
  averaging.average(str(tmp_path / "z"), mesh, run_dir=str(root / "run"), weights=[0, 1, 2])
  _assert_mean(_load(tmp_path / "z", mesh), host, [1, 2], [1, 2])


def test_last_k_steps_and_the_latest_of_several_runs(run, tmp_path):
  root, host = run
  mesh = _mesh()
  seen = []
  averaging.average(str(tmp_path / "last"), mesh, run_dir=str(root / "run"), last=2,
                    on_each=lambda s, w: seen.append(s.label))
  assert seen == ["step 20", "step 30"]
  _assert_mean(_load(tmp_path / "last", mesh), host, [1, 2])
  averaging.average(str(tmp_path / "steps"), mesh, run_dir=str(root / "run"), steps=[30, 10])
  _assert_mean(_load(tmp_path / "steps", mesh), host, [0, 2])
  # Three runs (their checkpoints linked from the fixture's): each contributes its latest step only.
  runs = []
  for name, steps in (("ra", (10, 20)), ("rb", (10, 30)), ("rc", (10,))):
    (tmp_path / name / "checkpoints").mkdir(parents=True)
    for s in steps:
      os.symlink(root / "run" / "checkpoints" / str(s), tmp_path / name / "checkpoints" / str(s))
    os.symlink(root / "run" / "model_config.json", tmp_path / name / "model_config.json")
    runs.append(str(tmp_path / name))
  seen = []
  averaging.average(str(tmp_path / "runs"), mesh, run_dirs=runs, weights=[1, 2, 5],
                    on_each=lambda s, w: seen.append(s.label))
  assert seen == [f"{runs[0]} step 20", f"{runs[1]} step 30", f"{runs[2]} step 10"]
  _assert_mean(_load(tmp_path / "runs", mesh), host, [1, 2, 0], [1, 2, 5])


def test_streams_one_leaf_at_a_time(run, tmp_path, monkeypatch):
  """Every Orbax restore brings exactly one param, and the arrays alive at any restore are a few copies of
  one leaf (the old whole-tree restore held 3 copies of all params)."""
  root, _ = run
  mesh = _mesh()
  leaf_bytes = [4 * int(np.prod(x.shape)) for x in jax.tree.leaves(P.abstract_sharded_params(CFG, mesh))]
  baseline = sum(a.nbytes for a in jax.live_arrays())
  calls, peak = [], [0]
  real = averaging.ocp.PyTreeCheckpointer.restore

  def spy(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    calls.append(len(jax.tree.leaves(out)))
    peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays()) - baseline)
    return out

  monkeypatch.setattr(averaging.ocp.PyTreeCheckpointer, "restore", spy)
  averaging.average(str(tmp_path / "avg"), mesh, run_dir=str(root / "run"))
  assert calls == [1] * (len(STEPS) * len(leaf_bytes))
  # hi + lo + the restored leaf: 3 fp32 copies of the largest leaf, well under one copy of the params.
  assert peak[0] <= 3 * max(leaf_bytes) < sum(leaf_bytes), (peak[0], max(leaf_bytes), sum(leaf_bytes))


def test_bad_input_names_the_flag(run, tmp_path):
  root, _ = run
  mesh = _mesh()
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(ConfigError, match=r"--run_dir=.*empty_run: no checkpoints"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(tmp_path / "empty_run"))
  with pytest.raises(ConfigError, match=r"--run_dirs=.*empty_run: no checkpoints"):
    averaging.average(str(tmp_path / "o"), mesh, run_dirs=[str(root / "run"), str(tmp_path / "empty_run")])
  with pytest.raises(ConfigError, match=r"--steps: 15 not in --run_dir"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), steps=[10, 15])
  with pytest.raises(ConfigError, match=r"--last=4: --run_dir=.* has 3 checkpoints \(10,20,30\)"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), last=4)
  with pytest.raises(ConfigError, match=r"--steps and --last both"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), steps=[10], last=1)
  with pytest.raises(ConfigError, match="one of --run_dir"):
    averaging.average(str(tmp_path / "o"), mesh)
  with pytest.raises(ConfigError, match="one of --run_dir"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), inputs=[str(root / "p10")])
  # Weights: one per checkpoint, non-negative, not all zero.
  with pytest.raises(ConfigError, match=r"--weights=1,2: 2 weights for 3 checkpoints \(step 10, step 20"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), weights=[1, 2])
  with pytest.raises(ConfigError, match=r"--weights=1,-1,2: -1 is not a non-negative number"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), weights=[1, -1, 2])
  with pytest.raises(ConfigError, match=r"--weights=0,0,0: all zero"):
    averaging.average(str(tmp_path / "o"), mesh, run_dir=str(root / "run"), weights=[0, 0, 0])
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
  with pytest.raises(ConfigError, match=r"--run_dirs: .*bad_run is another model than .*num_layers=2 vs 1"):
    averaging.average(str(tmp_path / "o"), mesh, run_dirs=[str(root / "run"), str(bad_run)])
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("x")
  with pytest.raises(ConfigError, match="--output=.*taken exists"):
    averaging.average(str(tmp_path / "taken"), mesh, inputs=[str(root / "p10")])
  assert not (tmp_path / "o").exists()  # nothing is written before every check has passed


def _defined_flags():
  return set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', open(SCRIPT).read()))


def test_the_entry_point_prints_each_checkpoint_and_errors_in_one_line(run, tmp_path):
  root, _ = run
  proc = subprocess.run([sys.executable, SCRIPT, f"--run_dir={root / 'run'}", "--last=2", "--weights=1,3",
                         f"--output={tmp_path / 'avg'}"], capture_output=True, text=True, env=ENV, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("step 20: weight 0.25 (") and lines[1].startswith("step 30: weight 0.75 ("), \
      proc.stdout
  assert lines[2] == f"wrote the average of 2 checkpoints to {tmp_path / 'avg'}"
  proc = subprocess.run([sys.executable, SCRIPT, f"--inputs={tmp_path / 'nope'}",
                         f"--output={tmp_path / 'x'}"], capture_output=True, text=True, env=ENV, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 1
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --inputs="), proc.stderr[-2000:]
  assert set(re.findall(r"--(\w+)", err[0])) <= _defined_flags()
