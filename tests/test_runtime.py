"""The runtime layer's rules: the checkpoint manifest (one reader for the trainer, the exporter
and the scorer), the device chosen once, and joining an existing parallel state."""

import json

import pytest
import torch

from megatron_polar.model.config import ModelRunConfig
from megatron_polar.model.presets import MODEL_FILE, get_preset
from megatron_polar.runtime import device
from megatron_polar.runtime.checkpoints import (LATEST, TOKENIZER_DIR, CheckpointError,
                                                read_manifest, write_manifest)
from megatron_polar.runtime.parallel import ParallelLayoutError, parallel_context


def fake_checkpoint(directory, preset=None, tokenizer=False):
    """A directory that `resolve_checkpoint_dir` accepts, with the given manifest parts."""
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    if preset is not None:
        (directory / MODEL_FILE).write_text(json.dumps(get_preset(preset).as_dict()))
    if tokenizer:
        (directory / TOKENIZER_DIR).mkdir()
    return directory


def test_a_run_directory_reads_its_latest_iteration_then_itself(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run / "iter_0000004", preset="tiny")
    fake_checkpoint(run / "iter_0000008", preset="small")
    (run / LATEST).write_text("4")
    (run / TOKENIZER_DIR).mkdir()  # only the run directory carries the tokenizer
    manifest = read_manifest(run)
    assert manifest.directory == run / "iter_0000004"
    assert manifest.preset.name == "tiny"
    assert manifest.tokenizer == run / TOKENIZER_DIR
    (run / "iter_0000004" / TOKENIZER_DIR).mkdir()  # the checkpoint's own comes first
    assert read_manifest(run).tokenizer == run / "iter_0000004" / TOKENIZER_DIR


def test_one_rule_for_a_named_preset(tmp_path):
    manifest = read_manifest(fake_checkpoint(tmp_path / "ckpt", preset="tiny"))
    assert manifest.preset_for(None).name == "tiny"
    assert manifest.preset_for("tiny").name == "tiny"
    with pytest.raises(CheckpointError, match=r"--model-preset small does not match the preset "
                                              r"recorded in .*ckpt \(tiny\)"):
        manifest.preset_for("small")
    with pytest.raises(CheckpointError, match="unknown model preset 'nope'"):
        manifest.preset_for("nope")


def test_a_checkpoint_without_preset_needs_one_or_a_default(tmp_path):
    manifest = read_manifest(fake_checkpoint(tmp_path / "bare"))
    with pytest.raises(CheckpointError, match=r"bare records no model preset .*--model-preset"):
        manifest.preset_for(None)
    assert manifest.preset_for(None, default="tiny").name == "tiny"
    assert manifest.preset_for("small").name == "small"


def test_tokenizer_given_recorded_or_refused(tmp_path):
    manifest = read_manifest(fake_checkpoint(tmp_path / "ckpt", preset="tiny"))
    with pytest.raises(CheckpointError, match="carries no tokenizer; pass --tokenizer"):
        manifest.tokenizer_for(None)
    with pytest.raises(CheckpointError, match="--tokenizer .*missing: no such file"):
        manifest.tokenizer_for(tmp_path / "missing")
    given = tmp_path / "tok.model"
    given.write_text("x")
    assert manifest.tokenizer_for(given) == given


def test_a_first_load_reads_as_an_empty_manifest_only_when_asked(tmp_path):
    empty = tmp_path / "new_run"
    with pytest.raises(CheckpointError, match="not a megatron distributed checkpoint"):
        read_manifest(empty)
    manifest = read_manifest(empty, must_exist=False)
    assert (manifest.directory, manifest.preset, manifest.tokenizer) == (empty, None, None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / LATEST).write_text("four")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        read_manifest(tmp_path / "bad", must_exist=False)


def test_write_manifest_is_what_read_manifest_reads(tmp_path):
    from megatron_polar.testing.tokenizers import make_sentencepiece

    tok = make_sentencepiece(tmp_path)
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    write_manifest(ckpt, get_preset("small"), tok)
    manifest = read_manifest(ckpt)
    assert manifest.preset == get_preset("small")
    assert (manifest.tokenizer / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_the_device_is_the_cpu_here_and_asked_for_not_probed(monkeypatch):
    assert device.compute_device() == torch.device("cpu") and not device.on_gpu()
    monkeypatch.setattr(device, "_DEVICE", torch.device("cuda", 3))  # as if chosen at start
    assert device.compute_device() == torch.device("cuda", 3) and device.on_gpu()


def test_parallel_context_joins_the_same_layout_and_refuses_another(ctx1):
    joined = parallel_context(ModelRunConfig())
    assert (joined.tp_size, joined.pp_size, joined.dp_size) == (1, 1, 1)
    with pytest.raises(ParallelLayoutError, match="already initialised at TP=1 PP=1 .* asks for "
                                                  "TP=2"):
        parallel_context(ModelRunConfig(tensor_model_parallel_size=2))
