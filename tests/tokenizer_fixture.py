"""A small sentencepiece tokenizer trained on the spot (no downloads), with POLAR's special pieces."""

import io
import random
from pathlib import Path

WORDS = ("the cat sat on a mat while policy models write answers about math code and "
         "stories reward reference candidate prompt is what why how one two three four five "
         "six seven eight nine ten apple river mountain token model train data").split()


def sample_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_sentencepiece(directory: Path, vocab_size: int = 320) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [sample_text(rng, rng.randint(3, 20)) + rng.choice([".", "?", "!", "\n1+1=2"])
             for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        user_defined_symbols=["<|reward|>", "[UNUSED_TOKEN_130]", "\n"],
        byte_fallback=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
