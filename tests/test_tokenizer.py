"""engine.tokenizer: loading a folder, encode/decode, the chat template, and streaming detokenization."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from engine.errors import ModelLoadError
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tiny_tokenizer import CHAT_TEMPLATE, write_tiny_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "def f(x):\n    return x * 2\n",
    "Café naïve Zürich",
    "東京は日本の首都です。",
    "Emoji 🙂🚀 and a family 👨‍👩‍👧 in one line",
    "Mixed: αβγ → ∑ 서울 🎉 end",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def copy_tiny(tiny_dir: Path, dest: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dest / name).write_bytes((tiny_dir / name).read_bytes())
    return dest


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


# --- the tiny tokenizer folder ---


def test_tiny_tokenizer_is_deterministic(tiny_dir, tmp_path):
    write_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_tiny_tokenizer_never_exceeds_requested_vocab_size(tmp_path):
    write_tiny_tokenizer(tmp_path, vocab_size=300)
    assert Tokenizer.from_dir(tmp_path).vocab_size == 300


# --- loading and encode/decode ---


def test_encode_decode_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_vocab_size_includes_special_tokens(tok):
    assert tok.vocab_size == 384
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_special_tokens_are_skipped_on_decode_unless_asked(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_eos_ids_are_the_union_of_both_config_files(tiny_dir, tmp_path):
    assert Tokenizer.from_dir(tiny_dir).eos_token_ids == frozenset({0, 2})

    folder = copy_tiny(tiny_dir, tmp_path)
    edit_json(folder / "generation_config.json", eos_token_id=2)
    edit_json(folder / "tokenizer_config.json", eos_token={"content": "<|endoftext|>", "special": True})
    assert Tokenizer.from_dir(folder).eos_token_ids == frozenset({0, 2})

    (folder / "generation_config.json").unlink()
    assert Tokenizer.from_dir(folder).eos_token_ids == frozenset({0})


def test_bos_is_prepended_when_add_bos_token_is_set(tiny_dir, tmp_path):
    folder = copy_tiny(tiny_dir, tmp_path)
    edit_json(folder / "tokenizer_config.json", bos_token={"content": "<|im_start|>"}, add_bos_token=True)
    tok = Tokenizer.from_dir(folder)
    assert tok.bos_token_id == 1
    assert tok.encode("hi")[0] == 1
    assert tok.encode("<|im_start|>hi").count(1) == 1
    assert 1 not in tok.encode("hi", add_special_tokens=False)


def test_missing_tokenizer_json_names_the_folder(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "\n" not in message


def test_eos_token_missing_from_vocab_is_a_load_error(tiny_dir, tmp_path):
    folder = copy_tiny(tiny_dir, tmp_path)
    edit_json(folder / "tokenizer_config.json", eos_token="</s>")
    with pytest.raises(ModelLoadError, match="</s>"):
        Tokenizer.from_dir(folder)


def test_broken_chat_template_is_a_load_error(tiny_dir, tmp_path):
    folder = copy_tiny(tiny_dir, tmp_path)
    edit_json(folder / "tokenizer_config.json", chat_template="{% for m in messages %}no end")
    with pytest.raises(ModelLoadError, match="chat template"):
        Tokenizer.from_dir(folder)


# --- chat template ---


def test_chat_template_renders_conversation_with_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi 🙂<|im_end|>\n")


def test_list_of_text_parts_renders_like_joined_string(tok):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = tok.apply_chat_template([{"role": "user", "content": parts}])
    assert as_parts == tok.apply_chat_template([{"role": "user", "content": "first\nsecond"}])


def test_non_text_part_is_a_value_error(tok):
    parts = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": parts}])


def test_no_chat_template_is_a_value_error(tiny_dir, tmp_path):
    folder = copy_tiny(tiny_dir, tmp_path)
    edit_json(folder / "tokenizer_config.json", chat_template=None)
    tok = Tokenizer.from_dir(folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_is_used(tiny_dir, tmp_path):
    folder = copy_tiny(tiny_dir, tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"


def test_template_helpers_and_extra_variables(tiny_dir, tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ bos_token }}[{{ tools | tojson }}]{{ eos_token }}"
    )
    folder = copy_tiny(tiny_dir, tmp_path)
    edit_json(folder / "tokenizer_config.json", chat_template=template)
    tok = Tokenizer.from_dir(folder)
    tools = [{"name": "<lookup>", "description": "café & co"}]
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=tools)
    assert rendered == '[[{"name": "<lookup>", "description": "café & co"}]]<|endoftext|>'
    with pytest.raises(ValueError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_matches_transformers(tiny_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    template = (
        "{%- for message in messages %}\n"
        "  {%- if message.role == 'system' %}<<SYS>>{{ message.content | trim }}<</SYS>>\n"
        "  {%- else %}{{ '[' + message.role + '] ' + message.content + eos_token }}\n"
        "  {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if tools %}{{ tools | tojson }}{% endif %}\n"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    messages = [
        {"role": "system", "content": "  Be kind.  "},
        {"role": "user", "content": "Wie geht's? 東京 🙂"},
        {"role": "assistant", "content": "Gut!"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "<int>"}}}]
    for chat_template in (CHAT_TEMPLATE, template):
        folder = copy_tiny(tiny_dir, tmp_path)
        edit_json(folder / "tokenizer_config.json", chat_template=chat_template)
        ours = Tokenizer.from_dir(folder)
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        for add in (True, False):
            expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add)
            assert ours.apply_chat_template(messages, add_generation_prompt=add, tools=tools) == expected
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ours.encode(text), skip) == theirs.decode(theirs.encode(text), skip_special_tokens=skip)


# --- incremental detokenizer ---


def test_streamed_text_equals_full_decode_on_emoji_and_cjk(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)


def test_streamed_text_equals_full_decode_on_random_token_sequences(tok):
    rng = random.Random(0)
    for trial in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        skip = trial % 2 == 0
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip), ids


def test_streamed_text_equals_full_decode_on_long_runs_of_raw_bytes(tok):
    # Mostly pieces of characters, with runs of special tokens: incomplete, invalid and completed characters
    # in every mix, with runs long enough that held-back bytes are released in pieces.
    rng = random.Random(3)
    broken = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]  # parts of characters
    assert len(broken) > 100
    letter = tok.encode("a")[0]
    for trial in range(100):
        ids = []
        while len(ids) < 200:
            roll = rng.random()
            if roll < 0.1:
                ids.append(letter)
            elif roll < 0.25:
                ids += [2] * rng.randint(1, 12)
            else:
                ids.append(rng.choice(broken))
        skip = trial % 2 == 0
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip), ids


def test_streamed_valid_text_never_shows_a_replacement_character(tok):
    rng = random.Random(1)
    alphabet = list("ab Z.\n\t") + list("éß東京中文서울") + ["🙂", "🚀", "👍🏽", "👨‍👩‍👧"] + ["<|im_end|>", "<|im_start|>"]
    for trial in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text)
        skip = trial % 2 == 0
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip)
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)


def test_special_token_between_bytes_of_a_character_is_skipped(tok):
    char_ids = tok.encode("中", add_special_tokens=False)
    assert len(char_ids) >= 2  # byte-level: the character is split across tokens
    ids = char_ids[:1] + [2] + char_ids[1:]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "中"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


def test_character_is_emitted_once_complete_and_not_before(tok):
    ids = tok.encode("a中", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert pieces[-1].endswith("中") and "".join(pieces) == "a中"
    assert detok.flush() == ""


def test_unfinished_character_comes_out_on_flush(tok):
    first_byte = tok.encode("中", add_special_tokens=False)[0]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.encode("x")[0]) == "x"
    assert detok.add(first_byte) == ""
    assert detok.flush() == tok.decode([first_byte]) == "\ufffd"


class CountingTokenizer:
    """Wraps a Tokenizer and records the longest id list decode() was asked for."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens)

    def is_silent(self, token_id, skip_special_tokens=True):
        return self.tok.is_silent(token_id, skip_special_tokens)


def test_window_stays_short_on_a_long_run_of_invalid_bytes(tok):
    lead_byte = tok.encode("中", add_special_tokens=False)[0]  # a lone UTF-8 lead byte, never completed
    ids = [tok.encode("x")[0]] + [lead_byte] * 500 + tok.encode("中 ok", add_special_tokens=False)
    counting = CountingTokenizer(tok)
    pieces = stream(counting, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert counting.longest <= 16


def test_window_stays_short_on_a_long_run_of_tokens_that_decode_to_nothing(tok):
    # what ignore_eos streams look like: EOS (skipped) over and over, or ids past the tokenizer's vocabulary
    # (a model whose embedding rows outnumber its tokens), between pieces of text
    text = tok.encode("ok 中", add_special_tokens=False)
    for filler in (0, tok.vocab_size + 7):
        ids = text + [filler] * 500 + text[:1] + [filler] * 30 + text[1:]
        for skip in (True, False):
            counting = CountingTokenizer(tok)
            assert "".join(stream(counting, ids, skip)) == tok.decode(ids, skip)
            assert counting.longest <= 16


def test_long_run_of_skipped_special_tokens_does_not_split_a_character(tok):
    lead, *rest = tok.encode("東", add_special_tokens=False)
    ids = tok.encode("x") + [lead] * 6 + [2] * 12 + rest
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "x" + "\ufffd" * 5 + "東"


def test_window_stays_short_on_long_normal_text(tok):
    ids = tok.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(tok)
    assert "".join(stream(counting, ids)) == tok.decode(ids)
    assert counting.longest <= 16


def test_leading_space_is_kept_by_a_decoder_that_strips_it_at_the_start(tmp_path):
    # SentencePiece-style: "▁" marks a word start and the decoder drops it on the first token only.
    vocab = {"[UNK]": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4, "<|endoftext|>": 5}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(len(vocab)) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip), ids
    assert stream(tok, [1, 2, 3]) == ["Hello", " world", "!", ""]
    # a long run of skipped tokens (dropped from the window) between a lone "▁" and a word, and mid-text
    for ids in ([4] + [5] * 20 + [1, 2], [1] + [5] * 20 + [4] + [5] * 20 + [2, 3]):
        for skip in (True, False):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip), ids


def test_encode_takes_the_backend_call_that_lets_go_of_the_gil(tiny_dir):
    # The server tokenizes in worker threads (server/app.py); that keeps its event loop and the engine's step
    # thread going only if the tokenizer lets go of the GIL, which the tokenizers library's encode_batch does
    # and its encode does not (measured once: a thread spinning beside a 4.5 MB encode turned 69 thousand
    # times in 2.9 s, beside encode_batch 36 million times).
    class NoSingleEncode:
        def __init__(self, backend):
            self._backend = backend

        def encode(self, *args, **kwargs):
            raise AssertionError("encode holds the GIL for the whole call")

        def __getattr__(self, name):
            return getattr(self._backend, name)

    tok = Tokenizer.from_dir(tiny_dir)
    text = "the quick brown fox jumps over the lazy dog. " * 50
    expected = tok.encode(text)
    assert expected == tok._backend.encode(text).ids
    tok._backend = NoSingleEncode(tok._backend)
    assert tok.encode(text) == expected
