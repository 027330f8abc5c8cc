"""Small trained BPE tokenizers for text tests: byte-level (GPT-2 style) and SentencePiece-style (Metaspace)."""

from __future__ import annotations

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SENTENCES = [
    "the sea is blue and the sky is grey.",
    "a ship sailed far away, its crew sang loud songs!",
    "naïve café owners über-sing in Zürich; ½ of them said 日本語 is fun 🙂.",
    "bread and soup are warm — really warm… ok?",
    "  spaces,\ttabs and\nnew lines matter too  ",
]
SPECIALS = ["<s>", "</s>", "<pad>"]


def _wrap(tok: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )


def byte_level_bpe(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """GPT-2 style: bytes mapped to printable symbols; multi-byte characters often span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        SENTENCES, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=SPECIALS)
    )
    return _wrap(tok)


def metaspace_bpe(vocab_size: int = 200) -> transformers.PreTrainedTokenizerFast:
    """SentencePiece style: spaces become a leading `▁` on the next piece; bytes fall back to `<0xNN>` tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=[*SPECIALS, "<unk>", *byte_tokens])
    tok.train_from_iterator(SENTENCES, trainer)
    return _wrap(tok)
