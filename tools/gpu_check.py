#!/usr/bin/env python3
"""What to run first on a new GPU node (`make gpu-check`): correctness of the GPU code paths,
peak memory and training throughput / MFU, as one JSON report and a table.

    python tools/gpu_check.py                                  # one GPU
    torchrun --nproc-per-node 8 tools/gpu_check.py             # a node of eight (DP=8)
    python tools/gpu_check.py --allow-cpu --model-preset tiny  # the CPU subset (tests)

Exit status: 0 every item passed or was skipped, 1 an item failed, 2 no CUDA GPU (without
--allow-cpu). The checks live in megatron_polar/training/gpu_check/.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from megatron_polar.training.gpu_check import main as gpu_check

    return gpu_check(argv)


if __name__ == "__main__":
    sys.exit(main())
