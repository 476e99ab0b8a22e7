"""The demo tokenizer: byte-level BPE trained on the corpus with HF `tokenizers`.

One tokenizer serves the policies (as a `PreTrainedTokenizerFast` directory) and the reward
model (`PolarTokenizer` reads the same directory's `tokenizer.json`). POLAR's two special
pieces are special tokens: `<|reward|>` (the separator) and `[UNUSED_TOKEN_130]` (the reward
token), with the InternLM2 ids of BOS (1) and EOS/pad (2).
"""

from __future__ import annotations

from pathlib import Path

from megatron_polar.data.tokenizer import REWARD_SEPARATOR, REWARD_TOKEN

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", REWARD_SEPARATOR, REWARD_TOKEN]  # ids 0..4


def train_tokenizer(texts: list[str], directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte level: every text encodes, and decode(encode(x)) == x (no unknown pieces).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="</s>")
    hf.save_pretrained(str(directory))
