import os
import warnings

import pytest

from megatron_polar.training.parallel import free_port

# megatron-core warns at import that apex/TE are absent; that is the expected CPU setup.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex|TE).*")


@pytest.fixture(scope="session")
def ctx1():
    """A one-process gloo group with megatron's parallel state at TP=PP=DP=1."""
    import torch

    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.training.parallel import initialize_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1")
    torch.set_num_threads(2)
    return initialize_parallel(ModelRunConfig())
