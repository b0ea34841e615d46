"""The card's folders are ``headlab.*`` only, and Python started in the repository root still loads models.

transformers (>= 5.25) requires HF's kernel hub, a top-level package named ``kernels``; the project's
``kernels/`` folder must never stand in for it (``headlab/bare_imports.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from notebook_helpers import execute

ROOT = Path(__file__).resolve().parent.parent
CARD_FOLDERS = ["kernels", "probes", "interventions", "analyses", "dashboard"]

LOAD_AND_PROBE = """
import torch, headlab
from headlab.probes import AttentionProbe
loaded = headlab.load({model!r}, device="cpu")
ids = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad(), AttentionProbe(loaded) as probe:
    logits = loaded.model(ids).logits
assert logits.shape == (1, 4, loaded.model.config.vocab_size) and len(probe.last) == loaded.arch.n_layers
"""

BARE_NAMES = """
import importlib, importlib.util, pathlib, sys
root = pathlib.Path({root!r})
for name in {folders!r}:
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue  # refused, or nothing of that name installed
    where = pathlib.Path(module.__file__).resolve()
    assert not where.is_relative_to(root / name), f"bare {{name}} is the project's folder: {{where}}"
    assert name == "kernels", f"bare {{name}} importable: {{where}}"
import kernels
from kernels import CUDAProperties  # what transformers imports from the hub package
import headlab.kernels, headlab.probes, headlab.analyses, headlab.interventions, headlab.dashboard
assert headlab.kernels.attention_with_stats is not None
"""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           **{k: v for k, v in os.environ.items() if k.startswith("HEADLAB_")}}
    return subprocess.run([sys.executable, "-c", code + "\nprint('ok')"], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("where", ["elsewhere", "repository root"])
def test_card_folders_are_never_bare_modules(where, tmp_path):
    proc = _python(BARE_NAMES.format(root=str(ROOT), folders=CARD_FOLDERS),
                   cwd=tmp_path if where == "elsewhere" else ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_hf_kernel_hub_is_what_transformers_sees_from_the_root():
    proc = _python("from transformers.utils import is_kernels_available\nassert is_kernels_available()\n"
                   "from transformers.integrations import hub_kernels", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_bare_probes_import_says_what_to_import():
    proc = _python("import probes", cwd=ROOT)
    assert proc.returncode != 0 and "importable only as 'headlab.probes'" in proc.stderr


@pytest.mark.parametrize("where", ["elsewhere", "repository root"])
def test_load_and_probe_a_tiny_model(where, tmp_path):
    proc = _python(LOAD_AND_PROBE.format(model="tiny-qwen3"), cwd=tmp_path if where == "elsewhere" else ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_smollm2_loads_from_the_repository_root():
    proc = _python(LOAD_AND_PROBE.format(model="smollm2-135m"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_python_m_pytest_from_the_repository_root(tmp_path):
    # pytest puts the root on sys.path: a test that loads a model must still find HF's kernel hub.
    test = tmp_path / "test_from_root.py"
    test.write_text("import headlab\n\ndef test_load():\n    headlab.load('tiny-llama', device='cpu')\n"
                    "    import kernels\n    assert 'site-packages' in kernels.__file__\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                           str(test)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout


def test_notebook_saved_in_the_repository_root(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, headlab, kernels\nprint(os.getcwd())\nloaded = headlab.load('tiny-llama', device='cpu')\n"
        "assert 'site-packages' in kernels.__file__, kernels.__file__")])
    executed = execute(nb, workdir=ROOT, kernel_root=tmp_path)
    outputs = [o for c in executed.cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    assert any(str(ROOT) in o.get("text", "") for o in outputs)
