"""The Concrete ML environment the benchmark report measures its Concrete ML rows in.

Concrete ML pins its own torch (2.3.1, with CUDA wheels: several GB), so it cannot share
the project's environment: it lives in a virtual environment of its own, created by::

    python -m benchmarks.concrete_env [--path .venv-concrete]

and the report runs :mod:`benchmarks.concrete_adapter` with that environment's interpreter
as a subprocess. :func:`find` picks the interpreter: ``--concrete-python PATH`` if given,
else ``$SHE_CONCRETE_PYTHON``, else ``.venv-concrete/bin/python`` in the repository; without
a working one the Concrete ML rows are skipped and the reason is printed in the report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

#: The Concrete ML release the report measures (the one of the comparison issue).
CONCRETE_ML_VERSION = "1.9.0"
#: Where ``python -m benchmarks.concrete_env`` creates the environment by default.
DEFAULT_PATH = Path(__file__).resolve().parents[1] / ".venv-concrete"
#: Environment variable naming the Concrete ML interpreter (tests and the report read it).
ENV_VARIABLE = "SHE_CONCRETE_PYTHON"


def interpreter(venv: Path) -> Path:
    """The Python interpreter of a virtual environment."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def concrete_version(python: str | Path) -> str:
    """The Concrete ML version importable by ``python``; raises ``RuntimeError`` (with the
    reason) when that interpreter is missing or cannot import Concrete ML."""
    if not Path(python).exists():
        raise RuntimeError(f"{python} does not exist")
    probe = ("import importlib.metadata as m, concrete.ml, torch, onnx; "
             "print(m.version('concrete-ml'))")
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                              timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{python} could not be run: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{python} cannot import Concrete ML ({last})")
    return done.stdout.strip()


def find(explicit: str | None = None) -> tuple[str | None, str]:
    """``(interpreter, description)`` of the Concrete ML environment to use, or
    ``(None, reason)`` when there is none (see the module docstring for the order)."""
    if explicit:
        candidate, origin = explicit, "--concrete-python"
    elif os.environ.get(ENV_VARIABLE):
        candidate, origin = os.environ[ENV_VARIABLE], f"${ENV_VARIABLE}"
    else:
        candidate, origin = str(interpreter(DEFAULT_PATH)), "the default environment"
        if not Path(candidate).exists():
            return None, (f"no Concrete ML environment: create one with `python -m "
                          f"benchmarks.concrete_env` (or pass --concrete-python PATH or set "
                          f"${ENV_VARIABLE})")
    try:
        version = concrete_version(candidate)
    except RuntimeError as exc:
        return None, f"Concrete ML environment from {origin} unusable: {exc}"
    return candidate, f"Concrete ML {version} ({candidate})"


def create(path: Path = DEFAULT_PATH, python: str = sys.executable) -> Path:
    """Create the virtual environment at ``path`` and install Concrete ML into it; returns
    its interpreter."""
    if not interpreter(path).exists():
        print(f"creating {path}", file=sys.stderr, flush=True)
        subprocess.run([python, "-m", "venv", str(path)], check=True)
    print(f"installing concrete-ml=={CONCRETE_ML_VERSION} (pulls its own torch: several GB)",
          file=sys.stderr, flush=True)
    subprocess.run([str(interpreter(path)), "-m", "pip", "install",
                    f"concrete-ml=={CONCRETE_ML_VERSION}"], check=True)
    return interpreter(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concrete_env",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH,
                        help="where to create the environment (default: .venv-concrete)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter creating it (Concrete ML 1.9 supports Python 3.8-3.12)")
    args = parser.parse_args(argv)
    python = create(args.path, args.python)
    print(f"Concrete ML {concrete_version(python)} ready: {python}")


if __name__ == "__main__":
    main()
