"""The package's ownership rules, checked on the source: who may import the trainer, and which commands stay free
of TensorFlow (so they run on hosts that have none, and start in seconds)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "geo_contrast"


def _imported_modules(path):
    """The geo_contrast modules a source file imports (`from geo_contrast import x`, `import geo_contrast.x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "geo_contrast":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("geo_contrast."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("geo_contrast."))
    return names


@pytest.mark.parametrize("trainer", ["pretrain", "finetune", "linear_eval"])
def test_only_the_stage_runner_imports_a_stage(trainer):
    importers = sorted(p.name for p in PACKAGE.rglob("*.py") if trainer in _imported_modules(p))
    assert importers == ["stages.py"]


def test_the_probe_holds_no_data_pipeline():
    source = (PACKAGE / "linear_eval.py").read_text()
    assert "import tensorflow" not in source and "tf.data" not in source


@pytest.mark.parametrize("module", ["geo_contrast.export", "geo_contrast.convert"])
def test_commands_that_only_read_checkpoints_import_no_tensorflow(module):
    code = (f"import sys, runpy; sys.argv = ['{module}', '--help']\n"
            f"try:\n    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip().splitlines()[-1] == "[]"
