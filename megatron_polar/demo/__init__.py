"""`make demo`: the whole POLAR pipeline on tiny models, on a CPU, with no downloads (docs/demo.md)."""
