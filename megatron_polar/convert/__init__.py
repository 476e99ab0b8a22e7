"""Hugging Face <-> megatron-core conversion for InternLM2-style POLAR reward models."""
