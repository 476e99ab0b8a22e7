"""`python -m megatron_polar.training.gpu_check`: the same as tools/gpu_check.py."""

import sys

from megatron_polar.training.gpu_check.runner import main

if __name__ == "__main__":
    sys.exit(main())
