import os
import warnings

import pytest

from megatron_polar.runtime.parallel import free_port

# megatron-core warns at import that apex/TE are absent; that is the expected CPU setup.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex|TE).*")


@pytest.fixture(scope="session")
def ctx1():
    """A one-process gloo group with megatron's parallel state at TP=PP=DP=1."""
    import torch

    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.runtime.parallel import initialize_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1")
    torch.set_num_threads(2)
    return initialize_parallel(ModelRunConfig())


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A built dataset, and initial weights every layout starts from (as HF import gives);
    shared by the trainer tests (tests/test_trainer*.py, test_shipped_configs.py), whose runs
    each write under their own name."""
    from megatron_polar.data.build import BuildConfig, build_triplets
    from tests.test_build_triplets import good_records, write_jsonl
    from tests.test_trainer import train
    from megatron_polar.testing.tokenizers import make_sentencepiece

    root = tmp_path_factory.mktemp("train")
    tok = str(make_sentencepiece(root))
    src = write_jsonl(root / "pairs.jsonl", good_records(300, 5))
    build_triplets(BuildConfig([src], str(root / "pairs"), tok), progress=False)
    init = root / "init"
    train(root, "init", "--train-iters", "0", "--save", str(init), data=(root, tok))
    return root, tok, init
