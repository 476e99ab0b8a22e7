"""Serving a POLAR reward model: to NeMo-Aligner PPO over PyTriton (`reward_model`, and the
combined `critic_*` models), and to POLAR's own client over `POST /pooling`.

    python -m megatron_polar.serving --help

references.py  each rollout's prompt and reference, found from token ids alone
rewards.py     requests -> POLAR sequences -> rewards (checks, post-processing)
postprocess.py raw / fixed / running normalisation and clipping
critic.py      the PPO value model: per-token values, clipped value loss, checkpoints
triton_models.py  the PyTriton models NeMo-Aligner calls
pooling.py     the lmdeploy-style HTTP endpoint POLAR's client calls
server.py      putting it together from the CLI flags (`__main__.py`)
collective.py  running the served models on several ranks (TP / PP), driven by rank 0
"""
