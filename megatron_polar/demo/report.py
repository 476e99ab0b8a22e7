"""The demo's report: a short text summary and the training curves as a PNG."""

from __future__ import annotations

from pathlib import Path


def _acc(result: dict, kind: str) -> float:
    return result[kind]["overall"]["accuracy"]


def summary_text(report: dict, held_out: tuple[str, ...]) -> str:
    d, s, ev = report["datasets"], report["sampling"], report["evaluate"]
    pool = report["pool"]
    lines = [
        "POLAR demo report",
        "  corpus: " + ", ".join(f"{n:,} chars of {kind}" for kind, n in
                                 report["corpus"]["characters"].items())
        + f" (torch and megatron-core sources, digest {report['corpus'].get('sha256', '?')})",
        f"  pool: {len(pool['policies'])} policies ({', '.join(pool['policies'])}); "
        f"held out: {', '.join(held_out)}",
        f"  sampling: {s['trajectories']:,} trajectories, {s['tokens_generated']:,} new tokens, "
        f"truncated {s['truncated']}",
        f"  pre-training: {d['pretrain_triplets']:,} triplets ({d['pretrain_tokens']:,} tokens) "
        f"from training policies; held-out validation: {d['heldout_triplets']:,} triplets",
        f"  SFT: {d['sft_triplets']:,} ranked triplets; preference eval: "
        f"{d['eval_rankings']:,} rankings",
        "",
        f"  held-out policy discrimination ({ev['heldout_triplets']} triplets, "
        "reference's policy vs another held-out policy):",
    ]
    for name, label in (("initial", "before pre-training"), ("pretrained", "after pre-training"),
                        ("sft", "after SFT")):
        lines.append(f"    {label:<20} {_acc(ev[name], 'discrimination'):.3f}   "
                     f"preference (paper protocol) {_acc(ev[name], 'preference'):.3f}")
        if name != "initial":
            per = ev[name]["discrimination"].get("policies", {})
            lines.append("      per reference policy: " + ", ".join(
                f"{p} {a['accuracy']:.3f}" for p, a in per.items()))
            pairs = ev[name]["discrimination"].get("pairs", {})
            lines.append("      per pair (reference vs rejected): " + ", ".join(
                f"{p} {a['accuracy']:.3f}" for p, a in pairs.items()))
    lines.append("")
    table = report["export"]["reward_table"]
    policies = list(table)
    first = next(iter(table.values()))
    lines.append(f"  scored with the exported HF model on {first['prompts']} held-out prompts "
                 "(mean reward; rows: the reference's policy):")
    lines.append("    " + " " * 14 + "".join(f"{p:>12}" for p in policies)
                 + "   own policy ranked first")
    for ref in policies:
        lines.append(f"    {ref:<14}" + "".join(f"{table[ref][p]:>+12.3f}" for p in policies)
                     + f"   {table[ref]['same first']:.0%}")
    lines.append(f"  HF export: {report['export']['hf_dir']}")
    seconds = [(k, report[k].get("seconds")) for k in ("corpus", "tokenizer", "pool", "sampling",
                                                        "datasets", "pretrain", "sft",
                                                        "evaluate", "export")]
    lines.append("  stage seconds (pool and base LM side by side): " + ", ".join(
        f"{k} {v:.0f}" for k, v in seconds if v is not None))
    return "\n".join(lines)


def plot_curves(report: dict, path: Path) -> None:
    """Loss and accuracy of pre-training (train and held-out validation) and SFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage, style in (("pretrain", "-"), ("sft", "--")):
        log = report[stage]["log"]
        offset = 0 if stage == "pretrain" else max(
            r["iteration"] for r in report["pretrain"]["log"])
        for kind, colour in (("train", "tab:blue"), ("valid", "tab:orange")):
            rows = [r for r in log if r["kind"] == kind]
            if not rows:
                continue
            x = [r["iteration"] + offset for r in rows]
            label = f"{stage} {'train' if kind == 'train' else 'held-out policies'}"
            axes[0].plot(x, [r["loss"] for r in rows], style, color=colour, label=label)
            axes[1].plot(x, [r["accuracy"] for r in rows], style, color=colour, label=label)
    axes[0].set(title="loss", xlabel="iteration")
    axes[1].set(title="accuracy (reward of positive > negative)", xlabel="iteration")
    axes[1].axhline(0.5, color="grey", lw=0.5)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
