"""The runtime imports no torch (docs/architecture.md): every ``she`` module imports, and a
client and server run, in a process where importing torch fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, pkgutil, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, NoTorch())
import she
names = [m.name for m in pkgutil.walk_packages(she.__path__, "she.") if m.name != "she.__main__"]
for name in names:
    importlib.import_module(name)
import numpy as np
plan = she.compile(she.load(she.io.assets.demo_model_path()), poly_modulus_degree=None)
assert "torch" not in sys.modules
print(len(names), plan.params.poly_modulus_degree)
"""


def test_runtime_imports_without_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr
    modules, ring = out.stdout.split()
    assert int(modules) >= 20 and int(ring) >= 4096
