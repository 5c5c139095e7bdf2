"""Tokenizer: a `tokenizers.Tokenizer` (tokenizer.json), the chat template, and streaming detokenization.

The chat template is rendered the way transformers renders it (a jinja2 ImmutableSandboxedEnvironment
with trim_blocks and lstrip_blocks, the `raise_exception` and `strftime_now` globals, a non-escaping
`tojson` filter, the special tokens as variables), without importing transformers.

`IncrementalDetokenizer` turns a stream of token ids into text pieces with two offsets into the
token list (prefix / read, as vLLM does): each step decodes only a short window, so multi-byte
characters split across tokens and Metaspace / ByteLevel spaces come out exactly as a full decode
would, and a trailing partial character (U+FFFD) is held back until it completes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from twophase.compiler.errors import ArtifactError, TwophaseError
from twophase.compiler.manifest import Manifest

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"

Message = Mapping[str, Any]


class ChatTemplateError(TwophaseError):
    """A chat template that fails to compile or render (or calls raise_exception)."""


class Tokenizer:
    """Encode / decode text and render chat prompts for one artifact's tokenizer."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: _token_text(v) for k, v in (special_tokens or {}).items() if _token_text(v) is not None}
        self._compiled: Any = None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        chat_template_path: str | Path | None = None,
        special_tokens: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise ArtifactError(f"{str(path)!r}: not a valid tokenizer.json ({e}); recompile the artifact") from e
        template = Path(chat_template_path).read_text(encoding="utf-8") if chat_template_path else None
        return cls(tok, template, special_tokens)

    @classmethod
    def from_artifact(cls, root: str | Path, manifest: Manifest) -> Tokenizer | None:
        """The artifact's tokenizer, or None when the manifest's `tokenizer` is null."""
        from twophase.runtime.artifact import tokenizer_paths

        paths = tokenizer_paths(root, manifest)
        if paths is None:
            return None
        special = (manifest.tokenizer or {}).get("special_tokens") or {}
        return cls.from_file(paths[0], paths[1], special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation [{role, content}, ...] to the prompt text the model was trained on."""
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template; pass chat=False and a plain prompt")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        # As transformers does: keys whose value is None are dropped (templates test for presence).
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        import jinja2

        try:
            return self._compiled.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a rendered conversation (the template already holds the special tokens)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


def _token_text(v: Any) -> str | None:
    """A special token given as a string or as a serialized AddedToken {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


class IncrementalDetokenizer:
    """Token ids in, text pieces out; the pieces concatenate to `tokenizer.decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._decode = tokenizer.backend.decode
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window re-decoded with each new token
        self.read_offset = 0  # tokens before this have been emitted as text

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes ("" while a character is still partial)."""
        self.ids.append(int(token_id))
        prefix_text, new_text = self._window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back at the end of the stream (a genuinely invalid byte sequence included)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text, new_text = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def _window(self) -> tuple[str, str]:
        ids, skip = self.ids, self.skip_special_tokens
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        new_text = self._decode(ids[self.prefix_offset :], skip_special_tokens=skip)
        return prefix_text, new_text
