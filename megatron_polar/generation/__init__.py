"""Sampling trajectories from a pool of LLM policies (POLAR paper, appendix A.1).

    prompts.py     corpus prefixes and instruction prompts; OUTPUT/prompts.jsonl
    pool.py        the policy pool file
    truncation.py  repetition-loop and incomplete-tail cuts
    backends.py    transformers and vLLM generation
    sampler.py     SamplingConfig, run_sampling: sharded, resumable per-policy JSONL

CLI: tools/sample_trajectories.py; docs/sampling.md.
"""
