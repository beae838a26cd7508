"""The zoo's character-level tokenizer: one token per character, built with `tokenizers`.

Every zoo language model shares this tokenizer, so merges of zoo models never need a
tokenizer decision. It does not add BOS/EOS on encode (lm-eval's HFLM encodes without
special tokens by default, and the zoo models are trained the same way); `</s>` ends each
training document after its newline terminator, so generation can stop on either.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
# Order fixes the ids: specials 0-3, then these characters from id 4 on. Changing it
# changes every model, so it is part of the zoo's code version.
ALPHABET = "\n 0123456789abcdefghijklmnopqrstuvwxyz+-=|<>:^#"


def vocab() -> dict[str, int]:
    """Token -> id for the special tokens and the alphabet."""
    tokens = list(SPECIAL_TOKENS) + list(ALPHABET)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` that maps each character to one id (unknown -> `<unk>`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    # Every character is its own pre-token; `[\s\S]` also matches the newline.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


def encode(text: str) -> list[int]:
    """Ids of `text` without going through `transformers` (fast path for training data)."""
    table = _TABLE
    unk = table[UNK]
    return [table.get(ch, unk) for ch in text]


_TABLE = vocab()
