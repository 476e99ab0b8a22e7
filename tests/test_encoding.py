"""POLAR's sequence format and truncation, pinned on hand-made cases."""

import pytest

from megatron_polar.data.encoding import EncodingConfig, RecordError, TripletEncoder
from megatron_polar.data.tokenizer import PolarTokenizer
from tests.tokenizer_fixture import make_sentencepiece


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return PolarTokenizer(make_sentencepiece(tmp_path_factory.mktemp("tok")))


def test_special_ids_come_from_the_tokenizer(tok):
    assert tok.bos_id == 1
    assert tok.separator_id == tok._sp.piece_to_id("<|reward|>")
    assert tok.reward_token_id == tok._sp.piece_to_id("[UNUSED_TOKEN_130]")
    other = PolarTokenizer(tok.path, reward_token_id=7, separator_id=8)
    assert (other.reward_token_id, other.separator_id) == (7, 8)
    with pytest.raises(ValueError, match="reward_token_id 999 outside the vocabulary"):
        PolarTokenizer(tok.path, reward_token_id=999)


def test_sft_layout(tok):
    enc = TripletEncoder(tok)
    pos, neg = enc.encode("what is one", "one two", "two three", "four five")
    sep, rew, bos = tok.separator_id, tok.reward_token_id, tok.bos_id
    assert pos == [bos] + tok.encode("what is one\none two") + [sep] + \
        tok.encode("what is one\ntwo three") + [rew]
    assert neg == [bos] + tok.encode("what is one\none two") + [sep] + \
        tok.encode("what is one\nfour five") + [rew]
    assert pos[-1] == rew and pos.count(sep) == 1


def test_pretrain_wrapper_has_no_newline(tok):
    pos, _ = TripletEncoder(tok).encode("the cat", " sat on", " a mat", " the river",
                                        wrapper="pretrain")
    assert pos == [tok.bos_id] + tok.encode("the cat sat on") + [tok.separator_id] + \
        tok.encode("the cat a mat") + [tok.reward_token_id]


def test_empty_reference_drops_its_newline_only(tok):
    pos, _ = TripletEncoder(tok).encode("why", "", "the cat", "a mat")
    assert pos == [tok.bos_id] + tok.encode("why") + [tok.separator_id] + \
        tok.encode("why\nthe cat") + [tok.reward_token_id]


def test_message_lists_keep_contents_joined_by_newline(tok):
    enc = TripletEncoder(tok)
    as_messages = enc.encode([{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "what is two"}],
                             [{"role": "assistant", "content": "two"}], "one", "three")
    as_text = enc.encode("be brief\nwhat is two", "two", "one", "three")
    assert as_messages == as_text


def test_responses_keep_their_first_tokens_and_prompt_its_last(tok):
    enc = TripletEncoder(tok, EncodingConfig(max_length=40, max_response_length=6))
    long_ref = " ".join(["one"] * 20)
    prompt = " ".join(["apple", "river", "mountain", "token", "model", "train", "data"] * 3)
    pos, neg = enc.encode(prompt, long_ref, "two three", "four five six seven eight nine ten")
    ref_kept = tok.decode(tok.encode(long_ref)[:5])  # 6 counting the field's BOS
    neg_kept = tok.decode(tok.encode("four five six seven eight nine ten")[:5])
    # Budgets counted with each field's BOS: (40 - 4 - 6 - |cand|) // 2, the smaller one wins.
    budget = min((36 - 6 - (len(tok.encode("two three")) + 1)) // 2,
                 (36 - 6 - (len(tok.encode(neg_kept)) + 1)) // 2)
    p_kept = tok.decode(tok.encode(prompt)[-budget:])
    assert pos == [tok.bos_id] + tok.encode(p_kept + "\n" + ref_kept) + [tok.separator_id] + \
        tok.encode(p_kept + "\ntwo three") + [tok.reward_token_id]
    assert neg[:pos.index(tok.separator_id) + 1] == pos[:pos.index(tok.separator_id) + 1]
    assert p_kept.endswith("data")
    # Like the released trainer, lengths are budgeted per field and the joined text is encoded
    # again, so max_length bounds the budget, not the final count (within a few tokens).
    assert len(pos) <= 40 + 4


@pytest.mark.parametrize("args,reason", [
    (("p", "r", "", "n"), "empty response"),
    (("p", "r", "c", "   "), "empty response"),
    (("p", "same", "c", "same"), "identical to the rejected"),
    (("p", 5, "c", "n"), "field 'reference' must be a string or a list"),
    (("p", [{"role": "user"}], "c", "n"), "field 'reference': message 0 has no string 'content'"),
])
def test_bad_records_say_why(tok, args, reason):
    with pytest.raises(RecordError, match=reason):
        TripletEncoder(tok).encode(*args)


def test_unknown_wrapper_and_no_room(tok):
    with pytest.raises(RecordError, match="field 'wrapper'"):
        TripletEncoder(tok).encode("p", "r", "c", "n", wrapper="chat")
    enc = TripletEncoder(tok, EncodingConfig(max_length=12, max_response_length=6))
    with pytest.raises(RecordError, match="over-long record"):
        enc.encode("why", "one two three four five", "six seven eight nine", "ten apple river")


def test_hf_tokenizer_directory(tmp_path):
    """A Hugging Face `tokenizer.json` directory with POLAR's added tokens and config ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.tokenizer_fixture import WORDS

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>",
                                                                  "<|reward|>"])
    hf.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"reward_token_id": 2, "bos_token_id": 1}))
    tok = PolarTokenizer(tmp_path)
    assert (tok.bos_id, tok.separator_id, tok.reward_token_id) == (1, 3, 2)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    pos, _ = TripletEncoder(tok).encode("why", "the cat", "a mat", "sat on")
    assert pos[0] == 1 and pos[-1] == 2 and pos.count(3) == 1
    assert len(tok.identity().sha256) == 64
