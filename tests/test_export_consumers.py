"""Exports load where their consumers load them, and score what we score (issue 15).

- `internlm2` layout: the released POLAR remote code (shipped in the export from xtuner or the
  imported model) runs the export under transformers 4.48 with `trust_remote_code=True`;
- `llama-seqcls` layout: transformers' own `LlamaForSequenceClassification` runs it, no remote
  code: the venv's transformers 5 batched with left and with right padding, transformers 4.48
  with right padding (it reads the token before the first pad);
- the Llama layout imports back, weights and rewards unchanged.

One tiny random reward model, imported in process (one gloo process group, `ctx1`), is scored
once by our scorer (megatron-core); every consumer is compared with those rewards in fp32.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_polar.convert import remote_code
from megatron_polar.convert.hf_config import ConversionError
from megatron_polar.convert.hf_files import HFWeightReader
from megatron_polar.testing.hf_checkpoints import write_random_internlm2
from megatron_polar.data.tokenizer import PolarTokenizer
from megatron_polar.model.presets import get_preset
from tests.released_polar import run_released, xtuner_dir
from tests.test_convert_hf import RECORDS, convert_cli
from megatron_polar.testing.tokenizers import make_sentencepiece


def all_tensors(directory) -> dict:
    reader = HFWeightReader(directory)
    return {n: reader.get(n) for n in reader.names()}


@pytest.fixture(scope="module")
def model(ctx1, tmp_path_factory):
    """A tiny random InternLM2ForRewardModel (fp32) imported into a checkpoint; its rewards for
    POLAR sequences of mixed lengths, from our scorer."""
    from megatron_polar.convert.importer import import_hf
    from megatron_polar.eval.scorer import RewardScorer, ScoreRecord

    root = tmp_path_factory.mktemp("consumers")
    tok = make_sentencepiece(root)
    preset = get_preset("tiny").replace(reward_token_id=PolarTokenizer(tok).reward_token_id)
    hf = write_random_internlm2(root / "rm", preset, reward=True)
    shutil.copy(tok, hf / "tokenizer.model")
    import_hf(hf, root / "ckpt")
    scorer = RewardScorer.from_checkpoint(str(root / "ckpt"))
    sequences = [scorer.encode(ScoreRecord(r["prompt"], r["reference"], r["candidate"],
                                           r.get("wrapper", "sft"))) for r in RECORDS]
    rewards = scorer.score_ids(sequences)
    assert len({len(s) for s in sequences}) == len(sequences)  # mixed lengths: padding matters
    assert len({round(r, 5) for r in rewards}) == len(rewards)  # the checks can tell them apart
    return SimpleNamespace(root=root, hf=hf, ckpt=root / "ckpt", preset=preset,
                           sequences=sequences, rewards=rewards)


RELEASED = r"""
import json, os, sys
os.environ["HF_MODULES_CACHE"] = sys.argv[2]  # where transformers copies the remote code
import torch
import transformers
from transformers import AutoModel

model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, torch_dtype=torch.float32)
model.eval()
sequences, pad = json.loads(sys.argv[3]), model.config.pad_token_id
n = max(map(len, sequences))
with torch.no_grad():
    single = []
    for ids in sequences:
        x = torch.tensor([ids])
        single.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, 0].item())
    # Right padding: the released forward reads the reward at the last position of the mask.
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in sequences])
    batched = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
print(json.dumps({"transformers": transformers.__version__, "class": type(model).__name__,
                  "module_file": sys.modules[type(model).__module__].__file__,
                  "single": single, "batched": batched}))
"""


def test_released_remote_code_loads_the_internlm2_export_and_agrees(model, tmp_path):
    from megatron_polar.convert.exporter import export_hf

    out = tmp_path / "polar"
    report = export_hf(model.ckpt, out, dtype="fp32")
    # The import came from a directory without remote code: the released files come from the
    # installed xtuner, byte for byte.
    released = xtuner_dir() / remote_code.XTUNER_REMOTE_CODE
    assert not report.warnings and "xtuner" in report.remote_code
    for name in remote_code.REMOTE_CODE_FILES:
        assert (out / name).read_bytes() == (released / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_internlm2.InternLM2ForRewardModel"

    got = run_released(RELEASED, str(out), str(tmp_path / "modules"), json.dumps(model.sequences))
    assert got["transformers"].startswith("4.48") and got["class"] == "InternLM2ForRewardModel"
    assert Path(got["module_file"]).read_bytes() == (out / "modeling_internlm2.py").read_bytes()
    assert got["single"] == pytest.approx(model.rewards, abs=1e-4, rel=0)
    assert got["batched"] == pytest.approx(model.rewards, abs=1e-4, rel=0)


def test_remote_code_comes_from_the_import_only_when_it_defines_the_reward_model(
        model, tmp_path, monkeypatch, capsys, caplog):
    from megatron_polar.convert.exporter import export_hf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model.ckpt, ckpt)
    hf = ckpt / "hf"
    (hf / "configuration_internlm2.py").write_text("class InternLM2Config:\n    pass\n")
    (hf / "tokenization_internlm2.py").write_text("# the tokenizer's code\n")
    # An InternLM2.5 base model's modeling file: causal LM only. Not the reward model's code.
    (hf / "modeling_internlm2.py").write_text("class InternLM2ForCausalLM:\n    pass\n")
    report = export_hf(ckpt, tmp_path / "base", dtype="fp32")
    released = xtuner_dir() / remote_code.XTUNER_REMOTE_CODE
    for name in remote_code.REMOTE_CODE_FILES:
        assert (tmp_path / "base" / name).read_bytes() == (released / name).read_bytes(), name
    assert (tmp_path / "base" / "tokenization_internlm2.py").is_file()
    assert "xtuner" in report.remote_code and not report.warnings
    # A POLAR checkpoint's own modeling file (defines the reward class): shipped as it is.
    own = "class InternLM2ForRewardModel(object):\n    pass\n"
    (hf / "modeling_internlm2.py").write_text(own)
    report = export_hf(ckpt, tmp_path / "own", dtype="fp32")
    assert (tmp_path / "own" / "modeling_internlm2.py").read_text() == own
    assert report.remote_code.endswith(f"imported HF directory ({hf})")
    # Neither: the export is written, and says what it lacks and how to get it, logged and
    # returned, and printed once by the CLI.
    (hf / "modeling_internlm2.py").write_text("class InternLM2ForCausalLM:\n    pass\n")
    monkeypatch.setattr(remote_code, "xtuner_remote_code_dir", lambda: None)
    with caplog.at_level("WARNING", logger="megatron_polar.convert.exporter"):
        report = export_hf(ckpt, tmp_path / "none", dtype="fp32")
    (message,) = report.warnings
    assert "auto_map" in message and "pip install --no-deps xtuner==0.2.0" in message
    assert message in caplog.text and report.remote_code is None
    assert not (tmp_path / "none" / "modeling_internlm2.py").exists()
    assert not (tmp_path / "none" / "configuration_internlm2.py").exists()
    assert (tmp_path / "none" / "model.safetensors").is_file()
    capsys.readouterr()
    assert convert_cli(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "xtuner==0.2.0" in err


def test_llama_seqcls_export_runs_in_transformers_llama_with_left_and_right_padding(
        model, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    out = tmp_path / "llama"
    assert convert_cli(["export", "--ckpt", str(model.ckpt), "--out", str(out), "--dtype",
                        "fp32", "--format", "llama-seqcls"]) == 0
    assert "llama-seqcls layout" in capsys.readouterr().out
    preset, config = model.preset, json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["id2label"] == {"0": "LABEL_0"} and config["tie_word_embeddings"] is False
    assert config["pad_token_id"] == preset.pad_token_id == 2
    assert config["rope_theta"] == preset.rotary_base
    assert config["rope_scaling"]["factor"] == preset.rope_scaling.factor
    assert config["rms_norm_eps"] == preset.norm_epsilon
    assert not list(out.glob("*.py"))
    assert (out / "tokenizer.model").read_bytes() == (model.hf / "tokenizer.model").read_bytes()
    weights = all_tensors(out)
    assert weights["score.weight"].shape == (1, preset.hidden_size)
    assert not any("lm_head" in n or "v_head" in n for n in weights)

    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf) is LlamaForSequenceClassification and hf.num_labels == 1
    pad, seqs = hf.config.pad_token_id, model.sequences
    assert all(pad not in s for s in seqs) and all(s[-1] == preset.reward_token_id for s in seqs)
    n = max(map(len, seqs))
    right = ([s + [pad] * (n - len(s)) for s in seqs], [[1] * len(s) + [0] * (n - len(s))
                                                      for s in seqs])
    left = ([[pad] * (n - len(s)) + s for s in seqs], [[0] * (n - len(s)) + [1] * len(s)
                                                     for s in seqs])
    with torch.no_grad():
        single = [hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
        batched = {side: hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
                   .logits[:, 0].tolist() for side, (ids, mask) in (("right", right),
                                                                     ("left", left))}
    for got in (single, batched["right"], batched["left"]):
        assert got == pytest.approx(model.rewards, abs=1e-5, rel=0)
    # Re-saved by transformers 5 (RoPE as `rope_parameters`, `dtype`), it still imports as the
    # same architecture.
    from megatron_polar.convert.importer import import_hf

    hf.save_pretrained(tmp_path / "resaved")
    assert "rope_parameters" in json.loads((tmp_path / "resaved" / "config.json").read_text())
    import_hf(tmp_path / "resaved", tmp_path / "ckpt")
    back = get_preset(str(tmp_path / "ckpt"))
    assert not back.differences(preset, [f for f in preset.as_dict() if f != "name"])


LLAMA_4_48 = r"""
import json, sys
import torch
import transformers
from transformers import AutoModelForSequenceClassification

model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
model.eval()
sequences, pad = json.loads(sys.argv[2]), model.config.pad_token_id
n = max(map(len, sequences))
with torch.no_grad():
    single = [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in sequences]
    # Right padding: transformers 4.48 reads the token before the first pad id.
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in sequences])
    batched = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
print(json.dumps({"transformers": transformers.__version__, "class": type(model).__name__,
                  "single": single, "batched": batched}))
"""


def test_llama_seqcls_export_runs_in_transformers_4_48(model, tmp_path):
    from megatron_polar.convert.exporter import export_hf

    export_hf(model.ckpt, tmp_path / "llama", dtype="fp32", layout="llama-seqcls")
    got = run_released(LLAMA_4_48, str(tmp_path / "llama"), json.dumps(model.sequences))
    assert got["transformers"].startswith("4.48")
    assert got["class"] == "LlamaForSequenceClassification"
    assert got["single"] == pytest.approx(model.rewards, abs=1e-5, rel=0)
    assert got["batched"] == pytest.approx(model.rewards, abs=1e-5, rel=0)


def test_llama_seqcls_export_imports_back_unchanged(model, tmp_path):
    from megatron_polar.convert.exporter import export_hf
    from megatron_polar.eval.scorer import RewardScorer

    export_hf(model.ckpt, tmp_path / "llama", dtype="fp32", layout="llama-seqcls")
    # CLI import of the Llama layout, then the released layout again: bit-exact round trip.
    assert convert_cli(["import", "--hf", str(tmp_path / "llama"), "--out",
                        str(tmp_path / "ckpt")]) == 0
    back = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert back["reward_token_id"] == model.preset.reward_token_id
    assert back["rope_scaling"] == {"type": "dynamic", "factor": model.preset.rope_scaling.factor}
    export_hf(tmp_path / "ckpt", tmp_path / "internlm2", dtype="fp32")
    before, after = all_tensors(model.hf), all_tensors(tmp_path / "internlm2")
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # Scoring the Llama directory (imported on the fly) gives our rewards.
    scorer = RewardScorer.from_hf(str(tmp_path / "llama"))
    assert scorer.score_ids(model.sequences) == pytest.approx(model.rewards, abs=1e-6, rel=0)


def test_llama_seqcls_refusals_name_the_field_and_a_remote_tokenizer_is_flagged(model, tmp_path):
    from megatron_polar.convert.exporter import export_hf
    from megatron_polar.convert.importer import import_hf

    # The model needs no remote code, but a tokenizer whose config names some still does.
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(model.hf / "tokenizer.model", tok / "tokenizer.model")
    (tok / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer", None]}}))
    report = export_hf(model.ckpt, tmp_path / "remote_tok", layout="llama-seqcls", tokenizer=tok)
    (message,) = report.warnings
    assert "tokenizer_config.json names remote tokenizer code" in message

    # A pad id every POLAR sequence holds (here the reward token) would move the read-out.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model.ckpt, ckpt)
    preset = json.loads((ckpt / "model.json").read_text())
    preset["pad_token_id"] = preset["reward_token_id"]
    (ckpt / "model.json").write_text(json.dumps(preset))
    with pytest.raises(ConversionError, match="pad_token_id .* reward token"):
        export_hf(ckpt, tmp_path / "bad", layout="llama-seqcls")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConversionError, match="--format must be one of"):
        export_hf(model.ckpt, tmp_path / "bad", layout="mistral")
    # Llama configs that are not a one-label, bias-free POLAR RM are refused at import.
    export_hf(model.ckpt, tmp_path / "llama", dtype="fp32", layout="llama-seqcls")
    for change, match in (({"id2label": {"0": "A", "1": "B"}}, "2 labels"),
                          ({"attention_bias": True}, "attention_bias"),
                          ({"architectures": ["LlamaForCausalLM"]}, "unsupported model")):
        bad = tmp_path / f"bad_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "llama", bad)
        config = json.loads((bad / "config.json").read_text())
        config.update(change)
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConversionError, match=match):
            import_hf(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()
