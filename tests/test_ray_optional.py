"""Ray is an optional extra: without it SHE imports and works, and the Ray commands say
which extra they need (these tests run whether or not Ray is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from she.cli import main
from she.io import assets

REPO = Path(__file__).resolve().parents[1]


def test_she_never_imports_ray_unless_asked():
    code = ("import sys, she, she.cli, she.serve.service, she.serve.ray_batch, she.serve.ray_serve; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", [
    ["batch", "MODEL", "x.npy", "-o", "out"],
    ["serve", "MODEL", "--ray", "--replicas", "2"],
])
def test_ray_commands_without_ray_name_the_extra(command, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    command = [str(assets.demo_model_path()) if a == "MODEL" else a for a in command]
    assert main([*command, "--json"]) == 2
    assert "pip install 'she[ray]'" in capsys.readouterr().out
