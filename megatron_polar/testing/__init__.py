"""Helpers for tests and tools alike (the top layer: no library package imports it).

- `tokenizers`: a small sentencepiece tokenizer trained on the spot (no downloads) with POLAR's
  special pieces (`make_sentencepiece`), sample text (`WORDS`, `sample_text`), and
  sentencepiece's `ModelProto` module for tests that edit tokenizer files;
- `synthetic_task`: `SyntheticTask`, POLAR pre-training in miniature: "policies" are token
  distributions, pairs come from policies seen in training or never seen;
- `synthetic_run`: `run_synthetic`, the trainer fed from memory on that task (`SyntheticData`,
  `FreshPairs`), behind `make demo-synthetic` and the learning test;
- `hf_checkpoints`: random-weight HF InternLM2 checkpoints for tests and conversion
  benchmarks;
- `data_benchmark`, `step_benchmark`: what `tools/benchmark_data.py` and
  `tools/benchmark_step.py` measure.
"""
