"""The default model's tokenizer: byte-level BPE trained with `tokenizers` on the train split.

Vocabulary: 4096 entries = 3 special tokens + 256 bytes + 3837 merges. Why 4096 and not 8192: at
this model's size (hidden 384, tied embeddings) the embedding matrix costs vocab x 384 parameters,
1.6M at 4K against 3.1M at 8K, a quarter of a 12M budget; on the stdlib train split 8K merges
shorten the token stream by only ~8% (3.6 vs 3.9 bytes per token), so the parameters buy more
as layers. Bits per byte, the comparison metric, does not depend on the vocabulary.

Byte-level with no normaliser and no prefix space, so decode(encode(text)) == text for any text.
Special tokens: <|endoftext|> (id 0; ends every document in training) and the chat markers
<|im_start|> / <|im_end|> (ids 1, 2) used by the ChatML-like template.

Deterministic: the same texts in the same order give byte-identical tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.demo import CHAT_TEMPLATE, EOS

VOCAB_SIZE = 4096
SPECIAL_TOKENS = (EOS, "<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json (EOS, chat template), generation_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    generation = {"eos_token_id": [tok.token_to_id(EOS), tok.token_to_id("<|im_end|>")],
                  "bos_token_id": tok.token_to_id(EOS), "pad_token_id": tok.token_to_id(EOS)}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")


def encode_documents(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids, without special tokens (documents are joined by the caller)."""
    return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each id stands for (0 for special tokens): sums to a text's byte count."""
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    byte_of = {ch: 1 for ch in pre_tokenizers.ByteLevel.alphabet()}
    vocab = tok.get_vocab()
    lengths = [0] * tok.get_vocab_size()
    for piece, idx in vocab.items():
        lengths[idx] = 0 if idx in special else sum(byte_of[ch] for ch in piece)
    return lengths
