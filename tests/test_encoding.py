"""POLAR's sequence format and truncation, pinned on hand-made cases; the fast path against
the exact one on fuzzed records."""

import random
from pathlib import Path

import pytest

from megatron_polar.data.encoding import EncodingConfig, RecordError, TripletEncoder
from megatron_polar.data.tokenizer import PolarTokenizer
from megatron_polar.testing.tokenizers import make_sentencepiece, sentencepiece_model_pb2


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

    from megatron_polar.testing.tokenizers import WORDS

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


# ---- the fast path: identical ids from 3 encodes when nothing can be cut -----------------

FUZZ_BITS = ["the", "cat", "sat", "policy", "model", "reward", "apple", "river", " ", "  ",
             "   ", "\t", "\n", "\r\n", "\n\n", "中文", "字符", "😀", "👍🏽", "e\u0301",
             "\u0915\u094d\u0937", "\u00a0", "\u3000", "ＡＢ", "ﬁ", "\u200b", "\ufeff", "\x00",
             "<0x41>", "1+1=2", "Ω", "ß", "İ", ".", "?", "<", ">", "s>", "<|"]
# Special-token text: rarer, so that many records still take the fast path.
SPECIAL_BITS = ["<|reward|>", "[UNUSED_TOKEN_130]", "<s>", "</s>", "<unk>"]


def fuzz_text(rng, max_bits, min_bits=0):
    text = "".join(rng.choice(SPECIAL_BITS if rng.random() < 0.01 else FUZZ_BITS)
                   + rng.choice(["", " "]) for _ in range(rng.randint(min_bits, max_bits)))
    if rng.random() < 0.2:
        text = rng.choice([" ", "  ", "\t", "\n"]) + text
    if rng.random() < 0.2:
        text += rng.choice([" ", "  ", "\t", "\n", "\r\n"])
    if rng.random() < 0.03:
        text = text[: len(text) // 2] + "\u2581" + text[len(text) // 2:]  # "▁": exact path
    return text


def fuzz_field(rng, max_bits, min_bits=0):
    if rng.random() < 0.15:
        return [{"role": rng.choice(["user", "assistant"]),
                 "content": fuzz_text(rng, max_bits, min_bits)}
                for _ in range(rng.randint(1, 2))]
    return fuzz_text(rng, max_bits, min_bits)


def fuzz_record(rng, max_bits):
    """[prompt, reference, chosen, rejected, wrapper]; a few are rejected records."""
    rec = [fuzz_field(rng, max_bits, min_bits=int(i >= 2 and rng.random() < 0.95))
           for i in range(4)]
    if rng.random() < 0.1:
        rec[1] = ""
    if rng.random() < 0.03:
        rec[1] = rec[3]
    return rec + [rng.choice(["sft", "pretrain"])]


def outcome(fn, *args):
    try:
        return fn(*args)
    except RecordError as e:
        return ("RecordError", str(e))


def train_sp(directory, **options):
    import io

    import sentencepiece as spm

    from megatron_polar.testing.tokenizers import sample_text

    rng = random.Random(0)
    lines = [sample_text(rng, rng.randint(3, 20)) + rng.choice([".", "?", "!", "\n1+1=2"])
             for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
        user_defined_symbols=["<|reward|>", "[UNUSED_TOKEN_130]", "\n"], minloglevel=2,
        **options)
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def tok_no_dummy(tmp_path_factory):
    return PolarTokenizer(train_sp(tmp_path_factory.mktemp("nodummy"), byte_fallback=True,
                                   normalization_rule_name="identity", add_dummy_prefix=False,
                                   remove_extra_whitespaces=False))


@pytest.fixture(scope="module")
def tok_nfkc(tmp_path_factory):
    return PolarTokenizer(train_sp(tmp_path_factory.mktemp("nfkc"), byte_fallback=True))


def test_fixture_tokenizer_round_trips(tok, tok_no_dummy):
    assert tok.round_trips and tok_no_dummy.round_trips
    assert tok.token_bound("a \u2581 b") is None and tok.token_bound("a\ud800") is None
    assert tok.token_bound("") == 0


@pytest.mark.parametrize("which", ["tok", "tok_no_dummy"])
def test_token_bound_and_round_trip_on_fuzzed_text(which, request):
    t = request.getfixturevalue(which)
    rng = random.Random(1)
    for _ in range(3000):
        text = fuzz_text(rng, 12)
        bound = t.token_bound(text)
        if bound is None:
            assert "\u2581" in text or t.special_text(text), text
            continue
        ids = t.encode(text)
        assert len(ids) <= bound, text
        assert t.decode(ids) == text, text


@pytest.mark.parametrize("which", ["tok", "tok_no_dummy"])
@pytest.mark.parametrize("cfg,max_bits", [
    (EncodingConfig(), 40),
    (EncodingConfig(max_length=120, max_response_length=24), 5),
    (EncodingConfig(max_length=80, max_response_length=16), 3),
    (EncodingConfig(max_length=40, max_response_length=10), 2),
])
def test_fast_path_equals_exact_path(which, cfg, max_bits, request):
    t = request.getfixturevalue(which)
    enc = TripletEncoder(t, cfg)
    rng = random.Random(cfg.max_length)
    fast = slow = errors = 0
    for _ in range(2000):
        rec = fuzz_record(rng, max_bits)
        got = outcome(enc.encode, *rec)
        assert got == outcome(enc._encode_exact, *rec), rec
        try:
            took_fast = enc._encode_untruncated(*rec) is not None
        except RecordError:
            took_fast = True  # raised by the fast path's own checks
        fast += took_fast
        slow += not took_fast
        errors += got[0] == "RecordError"
    assert fast > 400 and errors > 20
    if cfg.max_length < 1000:
        assert slow > 400  # records near the limits take the exact path


def test_fast_path_at_its_limits(tok):
    """The byte bound + 1 at the limits: ASCII words of 4 bytes bound at 5 tokens."""
    enc = TripletEncoder(tok, EncodingConfig(max_length=30, max_response_length=6))
    # Responses bound 5 (6 with BOS); the budget from the bounds: (30 - 4 - 6 - 6) // 2 = 7.
    assert enc._encode_untruncated("abcde", "what", "cats", "mats", "sft") is not None
    for rec in (("abcdef", "what", "cats", "mats"),    # prompt bound 7 + BOS > 7
                ("abcde", "whats", "cats", "mats"),    # reference bound 6 > 5
                ("abcde", "what", "cats", "mat s")):   # rejected bound 6 > 5
        assert enc._encode_untruncated(*rec, "sft") is None
        assert enc.encode(*rec) == enc._encode_exact(*rec, "sft")


def test_fast_path_uses_three_encodes_and_no_decode(tok):
    enc = TripletEncoder(tok)
    calls = {"encode": 0, "decode": 0}

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text):
            calls["encode"] += 1
            return tok.encode(text)

        def decode(self, ids):
            calls["decode"] += 1
            return tok.decode(ids)

    enc.tok = Counting()
    assert enc.encode("why", "the cat", "a mat", "sat on") == \
        TripletEncoder(tok)._encode_exact("why", "the cat", "a mat", "sat on", "sft")
    assert calls == {"encode": 3, "decode": 0}
    enc.encode("why \u2581", "the cat", "a mat", "sat on")  # "▁" in the prompt: exact path
    assert calls == {"encode": 3 + 7, "decode": 4}


def test_nfkc_tokenizer_keeps_the_exact_path(tok_nfkc):
    assert not tok_nfkc.round_trips and tok_nfkc.token_bound("the cat") is None
    enc = TripletEncoder(tok_nfkc)
    pos, _ = enc.encode("why  ＡＢ", "the\u00a0cat", "ﬁ mat", "sat on")
    # The old result: each field goes through decode, which applies NFKC.
    t = tok_nfkc
    p, ref, cand = (t.decode(t.encode(x)) for x in ("why  ＡＢ", "the\u00a0cat", "ﬁ mat"))
    assert (p, ref, cand) == ("why AB", "the cat", "fi mat")
    assert pos == [t.bos_id] + t.encode(p + "\n" + ref) + [t.separator_id] + \
        t.encode(p + "\n" + cand) + [t.reward_token_id]
    rng = random.Random(3)
    for _ in range(300):
        rec = fuzz_record(rng, 20)
        assert outcome(enc.encode, *rec) == outcome(enc._encode_exact, *rec)


def test_hf_tokenizer_does_not_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["the cat sat"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<s>", "<|reward|>", "[UNUSED_TOKEN_130]"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = PolarTokenizer(tmp_path)
    assert not tok.round_trips and tok.token_bound("the cat") is None


# ---- the ModelProto reader against google.protobuf -----------------------------------------

def _variants(model: bytes):
    """The model as is, and with the fields that matter set explicitly either way."""
    pb = sentencepiece_model_pb2()

    yield "as trained", model
    edits = {
        "no byte fallback": lambda m: setattr(m.trainer_spec, "byte_fallback", False),
        "suffix whitespace": lambda m: setattr(m.trainer_spec, "treat_whitespace_as_suffix", True),
        "nfkc name": lambda m: setattr(m.normalizer_spec, "name", "nmt_nfkc"),
        "charsmap": lambda m: setattr(m.normalizer_spec, "precompiled_charsmap", b"\x01\x02"),
        "no dummy prefix": lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", False),
        "explicit dummy prefix": lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", True),
        "remove whitespace": lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces",
                                               True),
        "no escape": lambda m: setattr(m.normalizer_spec, "escape_whitespaces", False),
        "denormalizer": lambda m: setattr(m.denormalizer_spec, "precompiled_charsmap", b"\x03"),
        "no normalizer": lambda m: m.ClearField("normalizer_spec"),
    }
    for name, edit in edits.items():
        m = pb.ModelProto.FromString(model)
        edit(m)
        yield name, m.SerializeToString()


def test_proto_reader_agrees_with_protobuf(tok, tok_nfkc, tok_no_dummy):
    pb = sentencepiece_model_pb2()

    from megatron_polar.data.tokenizer import sentencepiece_spec, spec_round_trips

    seen = set()
    for t in (tok, tok_nfkc, tok_no_dummy):
        for name, data in _variants(t.path.read_bytes()):
            m = pb.ModelProto.FromString(data)
            expected = {
                "byte_fallback": m.trainer_spec.byte_fallback,
                "treat_whitespace_as_suffix": m.trainer_spec.treat_whitespace_as_suffix,
                "normalizer_name": m.normalizer_spec.name,
                "precompiled_charsmap": m.normalizer_spec.precompiled_charsmap,
                "add_dummy_prefix": m.normalizer_spec.add_dummy_prefix,
                "remove_extra_whitespaces": m.normalizer_spec.remove_extra_whitespaces,
                "escape_whitespaces": m.normalizer_spec.escape_whitespaces,
                "denormalizer_charsmap": m.denormalizer_spec.precompiled_charsmap,
            }
            spec = sentencepiece_spec(data)
            assert spec == expected, (t.path, name)
            seen.add((name, spec_round_trips(spec)))
    assert ("as trained", True) in seen and ("as trained", False) in seen
    assert ("no dummy prefix", True) in seen and ("explicit dummy prefix", True) in seen
    for name in ("no byte fallback", "suffix whitespace", "nfkc name", "charsmap",
                 "remove whitespace", "no escape", "denormalizer", "no normalizer"):
        assert (name, True) not in seen, name


def test_proto_field_numbers_match_sentencepiece():
    pb = sentencepiece_model_pb2()

    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert {k: numbers(pb.ModelProto)[k] for k in
            ("trainer_spec", "normalizer_spec", "denormalizer_spec")} == \
        {"trainer_spec": 2, "normalizer_spec": 3, "denormalizer_spec": 5}
    assert numbers(pb.TrainerSpec)["byte_fallback"] == 35
    assert numbers(pb.TrainerSpec)["treat_whitespace_as_suffix"] == 24
    assert {k: numbers(pb.NormalizerSpec)[k] for k in
            ("name", "precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces",
             "escape_whitespaces")} == {"name": 1, "precompiled_charsmap": 2,
                                        "add_dummy_prefix": 3, "remove_extra_whitespaces": 4,
                                        "escape_whitespaces": 5}


def test_tokenizer_without_space_piece_or_with_bad_proto_does_not_round_trip(tok, tmp_path):
    pb = sentencepiece_model_pb2()

    m = pb.ModelProto.FromString(tok.path.read_bytes())
    for piece in m.pieces:
        if piece.piece == "\u2581":
            piece.type = pb.ModelProto.SentencePiece.UNUSED
    (tmp_path / "unused.model").write_bytes(m.SerializeToString())
    assert not PolarTokenizer(tmp_path / "unused.model").round_trips

    from megatron_polar.data.tokenizer import sentencepiece_spec

    with pytest.raises(ValueError):
        sentencepiece_spec(tok.path.read_bytes()[:-3])  # truncated


# ---- special-token text inside records (docs/data.md; tests/test_released_encoding.py runs
# the released code itself) -------------------------------------------------------------------

def test_special_token_text_is_removed_as_the_released_code_does(tok):
    enc = TripletEncoder(tok)
    # The text between special tokens is encoded on its own (with its dummy prefix), and decode
    # drops the special ids: "a<s>b" comes back as "a b", a literal <|reward|> disappears.
    assert tok.encode("a<s>b") == tok.encode("a") + [tok.bos_id] + tok.encode("b")
    assert tok.decode(tok.encode("a<s>b")) == "a b" == tok.remove_special_text("a<s>b")
    pos, neg = enc.encode("why</s>", "the <|reward|>cat", "a [UNUSED_TOKEN_130]mat", "<unk>x")
    for seq in (pos, neg):
        assert seq.count(tok.separator_id) == 1 and seq.count(tok.reward_token_id) == 1
        assert not set(seq[1:-1]) & (tok.drop_ids - {tok.separator_id})
    clean = [tok.remove_special_text(t) for t in ("why</s>", "the <|reward|>cat",
                                                  "a [UNUSED_TOKEN_130]mat", "<unk>x")]
    assert (pos, neg) == enc.encode(*clean)
    assert enc.special_text_records == 1
    # A field that is nothing but special tokens is empty after removal: no "\n" after the
    # prompt for an empty reference, and an empty chosen response is refused.
    pos, _ = enc.encode("why", "<s></s>", "the cat", "a mat")
    assert pos[:len(tok.encode("why")) + 2] == [tok.bos_id] + tok.encode("why") + [tok.separator_id]
    with pytest.raises(RecordError, match="empty response"):
        enc.encode("why", "the cat", "<|reward|>", "a mat")


def test_special_token_text_formed_where_fields_join_is_refused(tok):
    # Within a field removal cannot form one ("<s" + "<s>" + ">" -> "<s" + " >": the piece
    # after a special token keeps its dummy prefix), but with the pretrain wrapper "x<s" and
    # ">" join into "<s>": refused.
    enc = TripletEncoder(tok)
    with pytest.raises(RecordError, match="formed where the fields join"):
        enc.encode("x<s", ">", "the cat", "a mat", wrapper="pretrain")
    enc.encode("x<s", ">", "the cat", "a mat")  # "\n" between them: nothing forms


def test_polar_string_path_removes_special_text_as_training_does(tok):
    import types

    from megatron_polar.serving.rewards import PolarRewardService, RequestError

    enc = TripletEncoder(tok)
    service = PolarRewardService(types.SimpleNamespace(encoder=enc, score_ids=None))
    text = "why\nthe cat<|reward|>why\na <s>mat<|reward|> end[UNUSED_TOKEN_130]"
    assert service.encode_text(text) == enc.encode_sequence("why", "the cat",
                                                            "a <s>mat<|reward|> end")
    with pytest.raises(RequestError, match="found none"):
        service.encode_text("why\nthe cat")


def test_added_special_tokens_of_tokenizer_config_are_special_text(tok, tmp_path):
    # InternLM2 declares `<|im_start|>` and the like in tokenizer_config.json, on unused pieces.
    import json
    import shutil

    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    unused = tok.vocab_size - 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(unused): {"content": "<|im_start|>", "special": True},
        "7": {"content": "<|not_special|>", "special": False}}}))
    t = PolarTokenizer(tmp_path)
    assert t.special_texts["<|im_start|>"] == unused and "<|not_special|>" not in t.special_texts
    assert t.encode("a<|im_start|>b") == t.encode("a") + [unused] + t.encode("b")
    assert t.decode(t.encode("a<|im_start|>b")) == "a b"
    # The piece under it is special text too (sentencepiece would match its text), so the
    # fast path and the exact path agree and no sequence holds the id.
    piece = t.id_to_piece(unused)
    assert t.special_texts[piece] == unused and t.token_bound(f"x {piece} y") is None
    enc = TripletEncoder(t)
    for rec in (("why", "one", f"two {piece} three", "four"), ("why", "one", "two", "four")):
        pos, neg = enc.encode(*rec)
        assert (pos, neg) == enc._encode_exact(*rec, "sft") and unused not in pos + neg
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": [1]}')
    with pytest.raises(ValueError, match="tokenizer_config.json: unreadable added_tokens_decoder"):
        PolarTokenizer(tmp_path)
