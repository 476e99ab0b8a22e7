"""Our triplet encoding against the released POLAR code: xtuner 0.2.0's own `tokenize_ref`,
run on the same records with an HF slow tokenizer set up like InternLM2's (issue 15).

`tokenize_ref` is taken from the installed `xtuner/dataset/preference_dataset.py` (its
function definition compiled from that file; the module itself imports mmengine and datasets)
and run under transformers 4.48, which xtuner pins. The tokenizer is transformers'
sentencepiece `LlamaTokenizer` on a model trained like InternLM2's (identity normalisation,
byte fallback, dummy prefix; `<|reward|>` and the reward token as pieces and HF special
tokens), `legacy=True` (each piece of text between special tokens is encoded on its own, as
InternLM2's tokenizer does) and `add_prefix_space=False` (decoding is sentencepiece's, as with
InternLM2's fast tokenizer, which `AutoTokenizer` loads: LlamaTokenizer's default would strip
a leading space that InternLM2's decode keeps).
"""

import json
import random

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_polar.data.build import BuildConfig, build_triplets
from megatron_polar.data.indexed import output_paths
from megatron_polar.data.tokenizer import PolarTokenizer
from tests.released_polar import run_released, xtuner_dir
from megatron_polar.testing.tokenizers import make_sentencepiece

SPECIAL = ["<s>", "</s>", "<unk>", "<|reward|>", "[UNUSED_TOKEN_130]"]
BITS = ["the", "cat", "sat on", "policy", "model", "reward", "mat", " ", "  ", "   ", "\t",
        "\n", "\r\n", "\n\n", "中文", "字符", "😀", "👍🏽", "e\u0301", "\u0915\u094d\u0937",
        "\u00a0", "\u3000", "ＡＢ", "ﬁ", "\u200b", "\x00", "<0x41>", "1+1=2", "Ω", "ß", ".",
        "?", "<", ">", "s>", "<|", "reward|>", "<b>", "<s >"]

# Budgets: one where every field is cut (prompts from the left, responses from the right)
# and one where nothing is.
CONFIGS = [(96, 20), (16384, 4096)]

RELEASED = r"""
import ast, json, sys
from pathlib import Path
from transformers import AutoTokenizer, LlamaTokenizer

source_file, model_file, records_file, max_length, max_response = sys.argv[1:6]
tree = ast.parse(Path(source_file).read_text())
(fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tokenize_ref"]
scope = {"print_log": lambda *a, **k: None, "AutoTokenizer": AutoTokenizer}
exec(compile(ast.Module(body=[fn], type_ignores=[]), source_file, "exec"), scope)
tokenize_ref = scope["tokenize_ref"]

tok = LlamaTokenizer(model_file, legacy=True, add_prefix_space=False, add_bos_token=True,
                     add_eos_token=False, clean_up_tokenization_spaces=False,
                     additional_special_tokens=["<|reward|>", "[UNUSED_TOKEN_130]"])
reward_id = tok.convert_tokens_to_ids("[UNUSED_TOKEN_130]")
out = []
for line in Path(records_file).read_text().splitlines():
    r = json.loads(line)
    as_messages = lambda v: v if isinstance(v, list) else [{"role": "user", "content": v}]
    pair = {k: as_messages(r[k]) for k in ("prompt", "reference", "chosen", "rejected")}
    pair["wrapper"] = r["wrapper"]
    got = tokenize_ref(pair, tok, int(max_length), int(max_response), is_reward=True,
                       reward_token_id=reward_id)
    out.append([got["chosen_ids"], got["rejected_ids"]])
print(json.dumps({"ids": out, "special_ids": tok.all_special_ids}))
"""


def text(rng: random.Random, max_bits: int, special: float) -> str:
    parts = [rng.choice(SPECIAL if rng.random() < special else BITS) + rng.choice(["", " "])
             for _ in range(rng.randint(0, max_bits))]
    t = "".join(parts)
    if rng.random() < 0.2:
        t = rng.choice([" ", "  ", "\n", "\t"]) + t
    if rng.random() < 0.2:
        t += rng.choice([" ", "\n", "  "])
    return t


def field(rng, max_bits, special):
    if rng.random() < 0.15:
        return [{"role": "user", "content": text(rng, max_bits, special)}
                for _ in range(rng.randint(1, 3))]
    return text(rng, max_bits, special)


def records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        special = 0.0 if i % 3 == 0 else 0.15  # a third without special-token text
        rec = {"prompt": field(rng, 30, special), "reference": field(rng, 14, special),
               "chosen": field(rng, 14, special), "rejected": field(rng, 14, special),
               "wrapper": rng.choice(["sft", "sft", "pretrain"])}
        if rng.random() < 0.08:
            rec["reference"] = ""
        if rng.random() < 0.05:
            rec["prompt"] = ""
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("internlm2_like")
    make_sentencepiece(d)
    return d


# Reasons we reject a record that the released code encodes (docs/data.md): an empty chosen
# or rejected response, a reference equal to the rejected one, special-token text formed
# where the fields join.
DOCUMENTED = ("empty response", "identical to the rejected", "formed where the fields join")


@pytest.mark.parametrize("max_length,max_response", CONFIGS)
def test_build_triplets_matches_xtuner_tokenize_ref(tmp_path, tokenizer_dir, max_length,
                                                    max_response):
    recs = records(700, seed=max_length)
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    released = run_released(RELEASED, str(xtuner_dir() / "dataset" / "preference_dataset.py"),
                            str(tokenizer_dir / "tokenizer.model"), str(src), str(max_length),
                            str(max_response))

    prefix = str(tmp_path / "ours")
    summary = build_triplets(BuildConfig(inputs=[str(src)], output_prefix=prefix,
                                         tokenizer=str(tokenizer_dir), max_length=max_length,
                                         max_response_length=max_response, skip_bad=True),
                             progress=False)
    rejected = {int(json.loads(line)["where"].rsplit(":", 1)[1]): json.loads(line)["reason"]
                for line in output_paths(prefix)["rejected"].read_text().splitlines()}
    ds = IndexedDataset(prefix)
    tok = PolarTokenizer(tokenizer_dir)
    assert set(released["special_ids"]) <= tok.drop_ids

    written = compared_special = 0
    for line_no, (rec, (pos, neg)) in enumerate(zip(recs, released["ids"]), start=1):
        if line_no in rejected:
            assert any(r in rejected[line_no] for r in DOCUMENTED), (rec, rejected[line_no])
            continue
        ours = [ds[2 * written].tolist(), ds[2 * written + 1].tolist()]
        written += 1
        assert ours == [pos, neg], (line_no, rec)
        # Text never yields a special id: BOS first, the separator once, the reward token last.
        for seq in ours:
            inner = seq[1:-1]
            assert inner.count(tok.separator_id) == 1 and seq[-1] == tok.reward_token_id
            assert not (set(inner) - {tok.separator_id}) & tok.drop_ids, (line_no, rec)
        compared_special += any(tok.special_text(json.dumps(rec[k], ensure_ascii=False))
                                for k in ("prompt", "reference", "chosen", "rejected"))
    assert written == summary.written and len(ds) == 2 * written
    # The comparison covers what it is for: most records, many with special-token text.
    assert written > 0.8 * len(recs) and compared_special > 0.4 * len(recs)
    meta = json.loads(output_paths(prefix)["meta"].read_text())
    assert meta["special_text_lines"] == compared_special
