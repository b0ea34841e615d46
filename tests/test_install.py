"""The card's folders install as ``headlab.*`` only: no top-level ``kernels`` for transformers to trip on."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib.util, sys
tops = ["kernels", "probes", "interventions", "analyses", "dashboard"]
leaked = [name for name in tops if importlib.util.find_spec(name) is not None]
assert not leaked, f"top-level modules importable: {leaked}"
import headlab.kernels, headlab.probes, headlab.analyses, headlab.interventions, headlab.dashboard
from transformers.utils import is_kernels_available
assert not is_kernels_available(), "transformers thinks the HF kernel hub is installed"
import torch, headlab
from headlab.probes import AttentionProbe
loaded = headlab.load("tiny-qwen3", device="cpu")
ids = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad(), AttentionProbe(loaded) as probe:
    logits = loaded.model(ids).logits
assert logits.shape == (1, 4, loaded.model.config.vocab_size) and len(probe.last) == 4
print("ok")
"""


def test_no_top_level_card_modules_after_install(tmp_path):
    # A fresh interpreter outside the repository: only what is installed is importable.
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
