"""The command-line tools, end to end, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# As a user runs them: no torchrun variables (the test process has its own group's).
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def run_tool(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_step_prints_throughput():
    out = run_tool("tools/benchmark_step.py", "--model-preset", "tiny-2l",
                   "--micro-batch-tokens", "512", "--steps", "2", "--warmup-steps", "1")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["tokens_per_step"] > 0
    assert 0 < result["packing_efficiency"] <= 1
    assert "tokens/s" in out


def test_demo_trains_and_saves_a_checkpoint(tmp_path):
    out = run_tool("tools/demo_synthetic.py", "--model-preset", "tiny-2l", "--time-budget", "3",
                   "--save", str(tmp_path / "ckpt"), "--report", str(tmp_path / "report.json"))
    assert "held-out policy discrimination" in out
    assert (tmp_path / "ckpt" / "metadata.json").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] > 0


def test_fp8_request_on_cpu_fails_clearly():
    proc = subprocess.run([sys.executable, "tools/benchmark_step.py", "--fp8-format", "hybrid",
                           "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode != 0
    assert "FP8 (hybrid) needs Transformer Engine" in proc.stderr
