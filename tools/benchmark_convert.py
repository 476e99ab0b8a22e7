#!/usr/bin/env python3
"""HF import/export benchmark: time and peak memory of `tools/convert_hf.py` on a random-weight
checkpoint of a real shape (default: InternLM2.5-1.8B in bf16, 2 GB shards).

    python tools/benchmark_convert.py [--model-preset internlm2_5-1_8b] [--shard-size-gb 2]

Each conversion runs as its own process (the command users run), its resident set sampled from
/proc. Goal: peak RSS below 1.5x the largest input shard plus the model's largest tensor.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; wall time and peak memory (GiB), sampled every 20 ms from /proc: the RSS of
    the process itself, and the PSS summed over it and its children (dist_checkpointing forks
    writers that share the parent's pages; PSS splits shared pages among their users, so the
    sum is the memory the job really holds). wait4's ru_maxrss is no use here: Linux carries the
    parent's high-water mark into a forked child across exec."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = time.perf_counter()
    peak_main = peak_tree = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                main_rss = watched.memory_info().rss
                tree = sum(p.memory_full_info().pss
                           for p in [watched] + watched.children(recursive=True))
            except psutil.Error:  # exited between poll() and the reads
                continue
            peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree)
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        last = out.read().strip().splitlines()[-1]
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_main / 2**30, 2),
            "peak_pss_with_children_gib": round(peak_tree / 2**30, 2), "report": last}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-preset", default="internlm2_5-1_8b")
    p.add_argument("--shard-size-gb", type=float, default=2.0)
    p.add_argument("--part-size-mb", type=float, default=1024)
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed")
    args = p.parse_args(argv)

    from megatron_polar.convert.layout import units
    from megatron_polar.model.presets import get_preset

    preset = get_preset(args.model_preset)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="polar_convert_bench_"))
    try:
        hf = work / "hf"
        written = write_random_checkpoint(hf, preset.name, args.shard_size_gb)
        shards = sorted(hf.glob("*.safetensors"))
        largest_shard = max(f.stat().st_size for f in shards)
        largest_tensor = 2 * max(
            [preset.vocab_size * preset.hidden_size]  # the LM head of the base model
            + [n for u in units(preset) for m in u.maps for n in
               [s[0] * (s[1] if len(s) > 1 else 1) for s in m.hf_shapes]])
        total = sum(f.stat().st_size for f in shards)
        goal = 1.5 * largest_shard + largest_tensor
        from megatron_polar.data.tokenizer import PolarTokenizer

        tokenizer = write_tokenizer(work)
        imp = run_measured([sys.executable, "tools/convert_hf.py", "import", "--hf", str(hf),
                            "--out", str(work / "ckpt"), "--part-size-mb", str(args.part_size_mb),
                            "--reward-token-id", str(PolarTokenizer(tokenizer).reward_token_id),
                            "--tokenizer", str(tokenizer)])
        exp = run_measured([sys.executable, "tools/convert_hf.py", "export", "--ckpt",
                            str(work / "ckpt"), "--out", str(work / "out"),
                            "--max-shard-size-mb", str(args.shard_size_gb * 1e9 / 2**20)])
        result = {
            "preset": preset.name, "dtype": "bf16", "input_gib": round(total / 2**30, 2),
            "shards": len(shards), "largest_shard_gib": round(largest_shard / 2**30, 2),
            "largest_tensor_gib": round(largest_tensor / 2**30, 3),
            "goal_peak_rss_gib": round(goal / 2**30, 2), "write_random_s": round(written, 1),
            "import": imp, "export": exp,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for name in ("import", "export"):
        r = result[name]
        print(f"{name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(PSS with its child processes {r['peak_pss_with_children_gib']:.2f} GiB) "
              f"(goal < {result['goal_peak_rss_gib']:.2f} GiB; model {result['input_gib']:.2f} GiB "
              f"in {result['shards']} shards)")
    print(json.dumps(result))
    return 0


def write_random_checkpoint(hf: Path, preset: str, shard_size_gb: float) -> float:
    """A random-weight bf16 base model of `preset` in `hf`; returns the seconds it took. In a
    child process, so that this one stays small while it watches the conversions."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); "
        "from megatron_polar.testing.hf_checkpoints import write_random_internlm2 as w; "
        "from megatron_polar.model.presets import get_preset; "
        "w(sys.argv[2], get_preset(sys.argv[3]), reward=False, dtype=torch.bfloat16, "
        "max_shard_bytes=int(float(sys.argv[4])))"),
        str(ROOT), str(hf), preset, str(shard_size_gb * 1e9)], check=True)
    return time.perf_counter() - start


def write_tokenizer(work: Path) -> Path:
    """A small sentencepiece model (import checks that the tokenizer fits the model)."""
    from megatron_polar.testing.data_benchmark import train_tokenizer

    directory = work / "tok"
    directory.mkdir(exist_ok=True)
    return train_tokenizer(directory)


if __name__ == "__main__":
    sys.exit(main())
