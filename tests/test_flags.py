"""Every `--flag` an error message names exists, and a bad command line ends in one `error:` line.

The messages are collected from the source (every string literal of llama_jax/ and experiments/ that is
not a docstring), so a message added later is checked too; the flags from the entry points themselves
(experiments/*.py via absl, the `python -m` CLIs via argparse).
"""

import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `--name`, not `--name-with-dashes` (pip's, in a command line) nor `--mesh_{axis}` (built at run time).
FLAG = re.compile(r"--([a-z][a-z0-9_]*)(?![a-z0-9_{-])")


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _string_literals(path):
  tree = ast.parse(open(path).read())
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  for n in ast.walk(tree):
    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
      yield n.lineno, n.value


def _named_flags():
  named = {}
  files = glob.glob(os.path.join(ROOT, "llama_jax", "**", "*.py"), recursive=True)
  files += glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True)
  for path in sorted(files):
    for lineno, s in _string_literals(path):
      for m in FLAG.finditer(s):
        # xla_*: XLA's own flags (the XLA_FLAGS environment variable), not ours.
        if not m.group(1).endswith("_") and not m.group(1).startswith("xla_"):
          named.setdefault(m.group(1), f"{os.path.relpath(path, ROOT)}:{lineno}")
  return named


def _absl_flags(script):
  """The flags `script` defines (imported in a fresh process: each script owns the global FLAGS)."""
  code = (f"import sys; sys.path.insert(0, {ROOT!r}); sys.argv = ['x']; import runpy; "
          f"g = runpy.run_path({script!r}, run_name='not_main'); import json; "
          "print(json.dumps(sorted(g['flags'].FLAGS)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120,
                       check=True).stdout
  return set(json.loads(out.strip().splitlines()[-1]))


def _argparse_flags():
  out = set()
  for path in glob.glob(os.path.join(ROOT, "llama_jax", "**", "*.py"), recursive=True):
    for n in ast.walk(ast.parse(open(path).read())):
      if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"
          and n.args and isinstance(n.args[0], ast.Constant) and str(n.args[0].value).startswith("--")):
        out.add(n.args[0].value[2:])
  return out


def test_every_flag_named_in_a_message_is_defined():
  defined = _argparse_flags()
  for script in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    defined |= _absl_flags(script)
  named = _named_flags()
  assert {"lr", "steps", "tokenizer", "train_files", "input"} <= set(named)  # the collector works
  missing = {f"--{k}": where for k, where in named.items() if k not in defined}
  assert not missing, f"messages name flags no entry point defines: {missing}"


@pytest.fixture(scope="module")
def corrupt_tokenizer(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
  (d / "tok.model").write_bytes(b"\x08\x96\x01 this is no sentencepiece model\xff\xfe")
  return d


def test_bad_command_lines_are_one_error_line(corrupt_tokenizer, tmp_path):
  d = corrupt_tokenizer
  script = os.path.join(ROOT, "experiments", "pretrain.py")
  cases = {
      ("--lr=-1",): "error: OptimizerConfig.peak_lr (--lr): must be > 0",
      ("--steps=0",): "error: --steps=0: must be >= 1",
      ("--final_lr=1",): "error: OptimizerConfig.final_lr (--final_lr): must be in",
      ("--tokenizer=/nope/tok.model",): "error: --tokenizer needs --train_files",
      (f"--train_files={d / 'train.jsonl'}", f"--tokenizer={d / 'tok.model'}"):
          f"error: --tokenizer={d / 'tok.model'}",
      ("--max_bad_steps=0",): "error: --max_bad_steps=0: must be >= 1",
      ("--keep_period=0",): "error: --keep_period=0: must be >= 1",
  }
  procs = {args: subprocess.Popen([sys.executable, script, "--config=smoke", f"--run_dir={tmp_path / 'run'}",
                                   f"--data_dir={tmp_path / 'data'}", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
           for args in cases}
  for args, want in cases.items():
    _, err = procs[args].communicate(timeout=180)
    lines = [l for l in err.splitlines() if l.strip()]
    assert procs[args].returncode == 1 and "Traceback" not in err, (args, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(want), (args, lines)
  assert not os.path.exists(tmp_path / "data")  # no corpus was prepared for a command that cannot run
