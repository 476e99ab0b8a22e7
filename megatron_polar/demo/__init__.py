"""`make demo`: the whole POLAR pipeline on tiny models, on a CPU, no downloads (docs/demo.md)."""
