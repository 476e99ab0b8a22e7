"""The released POLAR code, for tests that compare against it (issue 15).

`make test` installs `xtuner==0.2.0 --no-deps` into the venv (its files are read, never its
package imported: `xtuner/__init__.py` needs mmengine) and transformers 4.48 with its tokenizers
into `.venv/transformers4` (the released remote code does not import under transformers 5).
`run_released` runs a script in a subprocess with that directory first on `sys.path`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRANSFORMERS4 = Path(sys.prefix) / "transformers4"
ROOT = Path(__file__).resolve().parents[1]


def xtuner_dir() -> Path:
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("xtuner is not installed: `make venv` installs xtuner==0.2.0 --no-deps")
    return Path(list(spec.submodule_search_locations)[0])


def require_transformers4() -> Path:
    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.fail(f"{TRANSFORMERS4} is missing: `make venv` installs transformers 4.48 there")
    return TRANSFORMERS4


def run_released(script: str, *args: str, timeout: float = 600) -> dict:
    """Runs `script` (Python source) under transformers 4.48 with `args` as sys.argv[1:]; the
    script prints one JSON object as its last stdout line, which is returned."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(require_transformers4()), str(ROOT)])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"released-stack subprocess failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
