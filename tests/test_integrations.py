"""The optional ecosystems stay optional: the core imports none of them."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import aace, aace.cli, aace.integrations, aace.models, aace.training.trainer
extras = ("timm", "lightning", "tensorboard", "huggingface_hub", "torch.utils.tensorboard")
print(sorted(m for m in sys.modules if m in extras or m.startswith(tuple(e + "." for e in extras))))
"""


def test_core_imports_no_extra():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
