"""A tiny byte-level BPE tokenizer folder for tests: tokenizer.json, tokenizer_config.json, generation_config.json.

Trained in-process on the corpus below, so no download is needed and the result is the same on every call.
Byte-level means every string can be encoded, and multi-byte characters (emoji, CJK) are split across
tokens, which is what the incremental detokenizer has to cope with.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Ids 0, 1, 2: the trainer puts special tokens first, in this order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A state that does not grow with the sequence is "
    "the whole point: every request keeps one fixed-size matrix per head, and the server can hold "
    "thousands of them in memory at once.",
    "In the morning the engineers read the logs, drank their coffee and argued about batch sizes. "
    "Nobody wanted to be the one who broke the build, so they wrote the tests first and the code second.",
    "def decode_step(state, token):\n"
    "    # one token in, one token out\n"
    "    logits = model(token, state)\n"
    "    return logits.argmax(dim=-1)\n",
    "for (int i = 0; i < n; ++i) {\n    total += values[i] * weights[i];\n}\n",
    '{"model": "tiny", "messages": [{"role": "user", "content": "Hello there!"}], "stream": true}',
    "Café, naïve, résumé, Zürich, São Paulo, Kraków: accents are bytes too.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "Emoji take four bytes each: 🙂 😀 🚀 🎉 👍🏽 and the family 👨‍👩‍👧 is seven code points.",
    "Greek αβγδε, Cyrillic привет мир, math ∑ ∫ √ ≤ ≥ ≠, arrows → ← ↑ ↓.",
    "Numbers like 3.14159, 2718, 1e-6 and 0x7fff show up in code and in prose alike.",
]


def write_tiny_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """Train a byte-level BPE of at most `vocab_size` tokens (specials included) and save it in `folder`.

    Ids: "<|endoftext|>" 0 (eos_token), "<|im_start|>" 1, "<|im_end|>" 2; generation_config lists 0 and 2 as EOS.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (all bytes + specials)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))

    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[token]): {"content": token, "special": True} for token in SPECIAL_TOKENS
        },
    }
    generation_config = {"eos_token_id": [ids["<|endoftext|>"], ids["<|im_end|>"]]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
