"""Helpers for tests and tools alike (the top layer: no library package imports it).

- `tokenizers`: a small sentencepiece tokenizer trained on the spot (no downloads) with POLAR's
  special pieces (`make_sentencepiece`), sample text (`WORDS`, `sample_text`), and
  sentencepiece's `ModelProto` module for tests that edit tokenizer files.
"""
