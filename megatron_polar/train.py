"""`python -m megatron_polar.train` (under torchrun): POLAR pre-training and ranked SFT.

    torchrun --nproc-per-node 8 -m megatron_polar.train --config examples/pretrain_7b.yaml \
        --data-path /data/polar/bin/polar --save ckpt/ --load ckpt/ \
        --pretrained-checkpoint ckpt/internlm2_5-7b-imported

See docs/training.md; `--help` lists every flag.
"""

import sys

from megatron_polar.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
