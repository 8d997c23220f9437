"""experiments/convert.py as a user runs it: HF → Orbax → HF round trip; every bad input is one line."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_jax import config as C
from llama_jax.interop import hf
from llama_jax.model import params as P
from llama_jax.parallel import sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "convert.py")
# PYTHONPATH: this checkout's llama_jax, not an editable install's.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _run(*args):
  return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  config = dataclasses.replace(C.TINY, num_layers=3)
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  path = str(tmp_path_factory.mktemp("cli") / "hf")
  hf.save_hf(P.init_params(config, mesh, jax.random.key(1)), config, path, dtype="float32")
  return path


def test_hf_to_orbax_to_hf_is_exact(tiny_hf, tmp_path):
  for args in (["--from_format=hf", f"--input={tiny_hf}", "--to_format=orbax", f"--output={tmp_path}/o"],
               ["--from_format=orbax", f"--input={tmp_path}/o", "--to_format=hf", "--hf_dtype=float32",
                "--mesh_tensor=2", f"--output={tmp_path}/hf"]):
    out, err = _run(*args).communicate(timeout=300)
    assert "wrote" in out, err[-3000:]
  src, back = load_file(f"{tiny_hf}/model.safetensors"), load_file(f"{tmp_path}/hf/model.safetensors")
  assert src.keys() == back.keys()
  for k in src:
    np.testing.assert_array_equal(back[k], src[k], err_msg=k)


def _defined_flags():
  text = open(SCRIPT).read()
  return set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', text))


def test_bad_inputs_give_one_line_and_exit_1(tiny_hf, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  (truncated / "config.json").write_text(open(f"{tiny_hf}/config.json").read())
  blob = open(f"{tiny_hf}/model.safetensors", "rb").read()
  (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 3])
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  (wrong / "config.json").write_text(open(f"{tiny_hf}/config.json").read())
  tensors = load_file(f"{tiny_hf}/model.safetensors")
  key = "model.layers.2.mlp.down_proj.weight"
  tensors[key] = np.ascontiguousarray(tensors[key][:, :64])
  save_file(tensors, str(wrong / "model.safetensors"))
  out = f"--output={tmp_path}/out"
  cases = {
      "missing input dir": ([f"--input={tmp_path}/nope", out], "no such directory"),
      "hf dir without config.json": ([f"--input={empty}", out], "no config.json"),
      "meta dir without params.json": (["--from_format=meta", f"--input={empty}", out], "no params.json"),
      "corrupt safetensors": ([f"--input={truncated}", out], "not a readable safetensors file"),
      "wrong shape": ([f"--input={wrong}", out], rf"tensor {key} has shape \(64, 64\), but config.json "
                      r"implies \(64, 128\)"),
      "output is a file": ([f"--input={tiny_hf}", f"--output={a_file}"], "--output=.* is a file"),
      "orbax without model_config.json": (["--from_format=orbax", f"--input={empty}", out],
                                          "no model_config.json"),
      "bad mesh": ([f"--input={tiny_hf}", out, "--mesh_tensor=3"], "--mesh_tensor=3"),
  }
  procs = {name: _run(*args) for name, (args, _) in cases.items()}
  flags = _defined_flags()
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert proc.returncode == 1, (name, stderr[-2000:])
    assert "Traceback" not in stderr, (name, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr[-2000:])
    assert re.search(cases[name][1], lines[0]), (name, lines[0])
    named = set(re.findall(r"--(\w+)", lines[0]))
    assert named <= flags, (name, named - flags)
