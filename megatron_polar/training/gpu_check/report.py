"""The report: the environment (`environment_info`), items merged over the ranks
(`merge_ranks`), the JSON file (`build_report`, `write_report`), the table on stdout
(`format_table`) and the exit status (`exit_code`)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_polar.training.gpu_check.common import FLEX_FLOOR, FLEX_RATIO, PER_PARAM_FACTOR, TOL
from megatron_polar.training.gpu_check.env import CheckEnv, tf32_enabled


def environment_info(env: Optional[CheckEnv]) -> dict:
    import megatron.core

    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "megatron_core": getattr(megatron.core, "__version__", None),
        "transformer_engine": None,
    }
    if env is not None and env.te:
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(device=torch.cuda.get_device_name(),
                    capability=list(torch.cuda.get_device_capability()),
                    device_memory_gib=round(props.total_memory / 2**30, 2),
                    devices_visible=torch.cuda.device_count(),
                    tf32_matmul=tf32_enabled(),
                    tf32_override_env=os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"))
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads)",
                    capability=None, device_memory_gib=None, devices_visible=0)
    return info


def merge_ranks(per_rank: list[dict]) -> dict:
    """One item from every rank's: failed if any rank failed, the worst peak memory."""
    merged = dict(per_rank[0])
    failed = [i for i, r in enumerate(per_rank) if r["status"] == "fail"]
    merged["failed_ranks"] = failed
    if failed and merged["status"] != "fail":
        merged["status"] = "fail"
        merged["reason"] = f"rank {failed[0]}: {per_rank[failed[0]]['reason']}"
    for key in ("peak_memory_gib", "peak_reserved_gib"):
        peaks = [r[key] for r in per_rank if r[key] is not None]
        merged[key] = max(peaks) if peaks else None
    return merged


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def exit_code(report: dict) -> int:
    return 1 if any(item["status"] == "fail" for item in report["items"]) else 0


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"gpu-check on {env['device']}"
             + (f" (sm{''.join(map(str, env['capability']))})" if env.get("capability") else "")
             + f", {report['world_size']} rank(s); torch {env['torch']}, Transformer Engine "
             f"{env['transformer_engine'] or 'not installed'}, megatron-core "
             f"{env['megatron_core']}",
             f"{'item':<26} {'status':<6} {'seconds':>8} {'peak GiB':>9}  figures / reason"]
    for item in report["items"]:
        peak = f"{item['peak_memory_gib']:.2f}" if item["peak_memory_gib"] is not None else "-"
        note = item["headline"] if item["status"] == "pass" else (item["reason"] or "")
        if item["status"] == "fail" and item["failed_ranks"]:
            note = f"[ranks {item['failed_ranks']}] {note}"
        lines.append(f"{item['name']:<26} {item['status']:<6} {item['seconds']:>8.1f} "
                     f"{peak:>9}  {note}")
    s = report["summary"]
    lines.append(f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped in "
                 f"{report['seconds']:.0f} s; report: {report['report_path']}")
    return "\n".join(lines)

def build_report(env: CheckEnv, items: list, code: int, started: float) -> dict:
    """The JSON report of rank 0: the environment, the layout and presets, the tolerances, the
    (merged) items and their summary; `started` is the run's time.perf_counter() at its start."""
    args, preset, check_preset = env.args, env.preset, env.check_preset
    report = {
        "tool": "gpu_check", "format": 1,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(env),
        "world_size": env.world, "data_parallel_size": env.ctx.dp_size,
        "tensor_model_parallel_size": env.ctx.tp_size,
        "model_preset": preset.name,
        "check_preset": {"name": check_preset.name, "num_layers": check_preset.num_layers},
        "tolerances": {**TOL, "scale": args.tolerance_scale,
                       "per_param_factor": PER_PARAM_FACTOR, "flex_ratio": FLEX_RATIO,
                       "flex_floor": FLEX_FLOOR},
        "items": items,
        "summary": {s: sum(i["status"] == k for i in items)
                    for s, k in (("passed", "pass"), ("failed", "fail"),
                                 ("skipped", "skip"))},
        "ok": code == 0,
        "seconds": round(time.perf_counter() - started, 1),
        "report_path": str(args.report),
    }
    return jsonable(report)


def write_report(report: dict, path: Path) -> None:
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
