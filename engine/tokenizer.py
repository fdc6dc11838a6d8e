"""Text <-> token ids for a model folder: a `tokenizers` wrapper, the chat template, and streaming detokenization."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from engine.errors import ModelLoadError

_REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode puts where bytes are incomplete or invalid


class Tokenizer:
    """The tokenizer of one model folder: encode, decode, special token ids and the chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        eos_token_ids: frozenset[int],
        bos_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids: frozenset[int] = eos_token_ids
        self.bos_token_id: int | None = bos_token_id
        self.chat_template: str | None = chat_template
        self._add_bos_token = add_bos_token and bos_token_id is not None
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._template = _compile_template(chat_template) if chat_template is not None else None
        self._special_ids = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)

    def is_silent(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        """Does the token decode to nothing wherever it stands? A special token when those are skipped, and an
        id the vocabulary does not name (a model's embedding may have more rows than its tokenizer has
        tokens): decode() leaves both out before its decoder runs."""
        if skip_special_tokens and token_id in self._special_ids:
            return True
        return self._backend.id_to_token(token_id) is None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, plus tokenizer_config.json, generation_config.json, chat_template.jinja if present."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"no tokenizer.json in model folder {folder}")
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust side raises a plain Exception with a parser message
            raise ModelLoadError(f"cannot read {tokenizer_file}: {_one_line(err)}") from None

        config = _read_json(folder / "tokenizer_config.json")
        generation_config = _read_json(folder / "generation_config.json")

        def token_id(field: str) -> tuple[str | None, int | None]:
            content = _token_content(config.get(field))
            if content is None:
                return None, None
            found = backend.token_to_id(content)
            if found is None:
                raise ModelLoadError(
                    f"{folder / 'tokenizer_config.json'}: {field} {content!r} is not in tokenizer.json"
                )
            return content, found

        eos_token, eos_id = token_id("eos_token")
        bos_token, bos_id = token_id("bos_token")
        eos_ids = set(_int_list(generation_config.get("eos_token_id"), folder / "generation_config.json"))
        if eos_id is not None:
            eos_ids.add(eos_id)

        template, template_source = _find_chat_template(folder, config)
        try:
            return cls(
                backend,
                eos_token_ids=frozenset(eos_ids),
                bos_token_id=bos_id,
                add_bos_token=bool(config.get("add_bos_token", False)),
                chat_template=template,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except jinja2.TemplateSyntaxError as err:
            raise ModelLoadError(f"chat template in {template_source} does not parse: {_one_line(err)}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, unlike encode, lets go of the GIL while it works: a long prompt tokenized in one of
        # the server's threads stalls neither its event loop nor the engine's step thread.
        ids = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        # tokenizer.json's post-processor usually adds BOS itself; add_bos_token covers folders where it does not.
        if add_special_tokens and self._add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render a conversation to prompt text. Extra keyword arguments (tools, ...) are passed to the template.

        A message's content may be a string or a list of {"type": "text", "text": ...} parts, which are joined
        with newlines. Bad messages, and templates that call raise_exception, give a ValueError.
        """
        if self._template is None:
            raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json or "
                             "chat_template.jinja); use a completion request with a plain prompt")
        context = {
            "bos_token": self._bos_token or "",
            "eos_token": self._eos_token or "",
            **extra,
            "messages": [_flatten_content(i, message) for i, message in enumerate(messages)],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**context)
        except (jinja2.TemplateError, TypeError) as err:
            raise ValueError(f"chat template failed on these messages: {_one_line(err)}") from None


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation equals `tokenizer.decode(all ids)`.

    Each add() decodes a short window: the tokens that produced the previous piece (the prefix, which gives the
    decoder its context, e.g. whether a leading space is kept) followed by the tokens not yet emitted. Text that
    ends in U+FFFD is an incomplete multi-byte character (a byte-level token may hold part of one); it is held
    back until a later token completes it, or until flush().

    One known gap, in `tokenizers` itself: a byte-fallback decoder (<0xNN> tokens, Llama-style) turns a whole run
    of byte tokens into U+FFFD once the run holds an invalid byte, so text streamed earlier in that run can differ
    from a later full decode. Valid UTF-8 always streams exactly.
    """

    # An incomplete character is at most 3 bytes, so at most 3 tokens; a longer run of text ending in U+FFFD
    # holds invalid bytes, and is released in pieces so that the window stays short.
    _MAX_HELD = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window; ids[:read] is the prefix, already emitted
        self._read = 0
        self._prefix_text = ""  # decode(ids[:read])

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (often "", never a broken character)."""
        if self._tokenizer.is_silent(token_id, self._skip_special_tokens):
            # Left out of the window, as decode() leaves it out: kept, a long run of them (EOS after EOS
            # with ignore_eos) would grow the window, which is decoded whole at every token.
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT_CHAR):
            return self._emit_through(len(self._ids), text)
        if len(self._ids) - self._read > self._MAX_HELD:
            return self._release_invalid(text)
        return ""

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character comes out as U+FFFD, as in a full decode)."""
        if self._read == len(self._ids):
            return ""
        return self._emit_through(len(self._ids), self._decode(self._ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit_through(self, end: int, text: str) -> str:
        """Emit decode(ids[:end]) == `text` past the prefix; ids[read:end] becomes the next prefix."""
        piece = text[len(self._prefix_text):]
        self._ids = self._ids[self._read:]
        self._read = end - self._read
        self._prefix_text = self._decode(self._ids[:self._read])
        return piece

    def _release_invalid(self, text: str) -> str:
        # Emit all but the last 4 held tokens, if that is safe: both halves decode to exactly the whole, so no
        # character (valid or not) straddles the split, and the tail decodes to at least 3 characters, hence at
        # least 3 bytes, so no later byte can join a sequence that starts before the split.
        end = len(self._ids) - 4
        head, tail = self._decode(self._ids[:end]), self._decode(self._ids[end:])
        if head + tail != text or len(tail) < 3 or len(head) <= len(self._prefix_text):
            return ""
        return self._emit_through(end, head)


def _compile_template(source: str) -> jinja2.Template:
    # The same rendering rules as Hugging Face's apply_chat_template, so templates written for it render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters (<, >, &, '), which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _flatten_content(index: int, message: dict) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be an object, not {type(message).__name__}")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{index}].content: only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _find_chat_template(folder: Path, config: dict) -> tuple[str | None, Path]:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: a list of named templates
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return template, folder / "tokenizer_config.json"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_list(value: Any, source: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{source}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return values


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
