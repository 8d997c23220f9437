"""A Python toolchain whose interpreter is the project's virtualenv, `<workspace>/.venv`.

`bazel-bootstrap` (Bazel 4) has no hermetic Python: the tests run on the venv's interpreter, so
they see jax, torch, transformers... from its site-packages. The path is found when Bazel loads
the workspace (nothing is hard-coded); set LLAMA_JAX_PYTHON=/abs/path/to/python to override.
"""

def _venv_python_impl(rctx):
    interpreter = rctx.os.environ.get("LLAMA_JAX_PYTHON", "")
    if not interpreter:
        workspace = rctx.path(Label("@//:WORKSPACE")).dirname
        interpreter = str(workspace) + "/.venv/bin/python"
    if not interpreter.startswith("/"):
        fail("LLAMA_JAX_PYTHON must be an absolute path, got %r" % interpreter)
    if not rctx.path(interpreter).exists:
        fail(("No Python interpreter at %s: create the venv first " +
              "(python3 -m venv .venv && pip install -r requirements-test.txt && " +
              "pip install --no-deps -e .), or set LLAMA_JAX_PYTHON.") % interpreter)
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{interpreter}",
    python_version = "PY3",
    stub_shebang = "#!{interpreter}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(interpreter = interpreter))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["LLAMA_JAX_PYTHON"],
    local = True,
)
