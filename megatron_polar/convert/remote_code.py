"""The remote code an `InternLM2ForRewardModel` export needs, found rather than written.

The export's `config.json` has an `auto_map` naming `configuration_internlm2.InternLM2Config`
and `modeling_internlm2.InternLM2ForRewardModel`; transformers (`trust_remote_code=True`),
lmdeploy, vLLM and sglang read those files from the model directory. We never write that code
ourselves: we ship POLAR's released files unchanged, from the first of

1. the imported HF directory (kept in the checkpoint's `hf/`), when its `modeling_internlm2.py`
   defines `class InternLM2ForRewardModel`: a POLAR checkpoint's own code. An InternLM2.5 base
   model's `modeling_internlm2.py` is the causal-LM code, which need not define the reward
   class, so it is not shipped as the reward model's code;
2. the installed xtuner package (`pip install --no-deps xtuner==0.2.0`), whose
   `xtuner/tools/model_converters/modeling_internlm2_reward/` holds the files POLAR's released
   checkpoints carry. xtuner is located with `importlib.util.find_spec`, never imported: its
   `__init__` needs mmengine and the rest of its training stack.

With neither, the export is still written and a warning says which files its `auto_map` names
and how to get them. (Loading the files needs `einops`, which they import; transformers names
it when it is missing.)
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REMOTE_CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
XTUNER_REMOTE_CODE = Path("tools", "model_converters", "modeling_internlm2_reward")
XTUNER_INSTALL = "pip install --no-deps xtuner==0.2.0"
_REWARD_CLASS = re.compile(r"^class\s+InternLM2ForRewardModel\b", re.MULTILINE)


@dataclass(frozen=True)
class RemoteCode:
    """Where the shipped `configuration_internlm2.py` / `modeling_internlm2.py` come from."""

    directory: Path
    origin: str  # "the imported HF directory" or "xtuner X.Y.Z"

    def describe(self) -> str:
        return f"{', '.join(REMOTE_CODE_FILES)} from {self.origin} ({self.directory})"


def defines_reward_model(directory: Path) -> bool:
    """True when `directory` has both files and its modeling file defines the reward class."""
    directory = Path(directory)
    if not all((directory / name).is_file() for name in REMOTE_CODE_FILES):
        return False
    source = (directory / "modeling_internlm2.py").read_text(encoding="utf-8", errors="replace")
    return _REWARD_CLASS.search(source) is not None


def xtuner_remote_code_dir() -> Optional[Path]:
    """xtuner's `modeling_internlm2_reward/` when xtuner is installed (located, not imported)."""
    try:
        spec = importlib.util.find_spec("xtuner")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / XTUNER_REMOTE_CODE
        if defines_reward_model(candidate):
            return candidate
    return None


def _xtuner_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"xtuner {version('xtuner')}"
    except PackageNotFoundError:
        return "xtuner"


def find_reward_remote_code(imported: Optional[Path]) -> Optional[RemoteCode]:
    """The released reward-model code to ship, or None when none can be had (see module doc)."""
    if imported is not None and defines_reward_model(imported):
        return RemoteCode(Path(imported), "the imported HF directory")
    found = xtuner_remote_code_dir()
    if found is not None:
        return RemoteCode(found, _xtuner_version())
    return None


def missing_remote_code_warning(out: Path) -> str:
    return (f"{out}/config.json's auto_map names {' and '.join(REMOTE_CODE_FILES)} "
            "(InternLM2Config, InternLM2ForRewardModel), which this export lacks: neither the "
            "imported HF directory had a modeling_internlm2.py defining InternLM2ForRewardModel "
            f"nor is xtuner installed. `{XTUNER_INSTALL}` (no dependencies needed) and export "
            "again, or copy the two files from POLAR's released model into the directory; "
            "without them trust_remote_code loaders (transformers, lmdeploy, vLLM, sglang) "
            "cannot load it. `--format llama-seqcls` needs no remote code.")


def ship_remote_code(code: Optional[RemoteCode], imported: Optional[Path],
                     target: Path) -> list[str]:
    """Copy the reward-model files from `code` (if any) and the other `.py` files of the
    imported directory (e.g. a tokenizer's `tokenization_internlm2.py`) into `target`; an
    imported `configuration_/modeling_internlm2.py` that `code` does not come from (a base
    model's causal-LM code) is left out. Returns the names copied."""
    names = []
    if imported is not None and Path(imported).is_dir():
        for path in sorted(Path(imported).glob("*.py")):
            if path.name not in REMOTE_CODE_FILES:
                shutil.copy2(path, target / path.name)
                names.append(path.name)
    for name in REMOTE_CODE_FILES if code is not None else ():
        shutil.copy2(code.directory / name, target / name)
        names.append(name)
    return names
