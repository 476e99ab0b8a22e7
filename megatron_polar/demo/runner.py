"""The demo's stage machinery: `Stage` (a directory plus `stage.json`) and `run_stage`, which
reuses a finished stage or runs it under a progress bar (`Bar`); `run_cli`, which runs one of the
project's CLIs as a subprocess; JSONL files in and out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_polar.data.records import atomic_file

REPO = Path(__file__).resolve().parents[2]


class Stage:
    """A directory plus `stage.json`: done when it records the same key."""

    def __init__(self, workdir: Path, name: str, key: str):
        self.dir = workdir / name
        self.name, self.key = name, key
        self.stamp = self.dir / "stage.json"

    def done(self) -> Optional[dict]:
        if self.stamp.is_file():
            data = json.loads(self.stamp.read_text())
            if data.get("key") == self.key:
                return data["result"]
        return None

    def finish(self, result: dict) -> dict:
        with atomic_file(self.stamp) as f:
            f.write(json.dumps({"key": self.key, "result": result}, indent=2).encode())
        return result


def run_stage(stage: Stage, work: Callable[[Stage, "Bar"], dict], total: int, unit: str,
              fresh: bool = True) -> dict:
    """Reuse `stage` if done, else run `work(stage, bar)` under a progress bar."""
    found = stage.done()
    if found is not None:
        print(f"[{stage.name}] reused ({stage.dir})")
        return found
    # A stage that resumes (sampling, training) continues only work begun with its settings.
    started = stage.dir / "started.json"
    if fresh or not started.is_file() or json.loads(started.read_text())["key"] != stage.key:
        shutil.rmtree(stage.dir, ignore_errors=True)
    stage.dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"key": stage.key}))
    start = time.time()
    with Bar(stage.name, total, unit) as bar:
        result = work(stage, bar)
    result["seconds"] = round(time.time() - start, 1)
    return stage.finish(result)


class Bar:
    """A tqdm bar per stage (plain lines when stderr is not a terminal)."""

    def __init__(self, name: str, total: int, unit: str):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=f"{name:>10}", unit=unit, dynamic_ncols=True,
                         mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set(self, n: int) -> None:
        self._bar.update(n - self._bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_cli(cmd: list[str], log: Path, on_line: Optional[Callable[[str], None]] = None,
            threads: Optional[int] = None) -> None:
    """Run one of the project's CLIs, its output to `log`; an error shows the log's tail."""
    env = _cli_env()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in that process
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=REPO)
        for line in proc.stdout:
            out.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {code}); see {log}:\n{tail}")



def write_jsonl(path: Path, records) -> int:
    n = 0
    with atomic_file(path) as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
            n += 1
    return n


def read_jsonl(pattern_dir: Path, glob: str = "*/*.jsonl") -> list[dict]:
    out = []
    for path in sorted(pattern_dir.glob(glob)):
        with open(path, encoding="utf-8") as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out
