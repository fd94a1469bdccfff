"""Tokenizers of the reference engine: bytes for random models, Hugging Face's for real ones."""

from __future__ import annotations

from typing import Any


class ByteTokenizer:
    """UTF-8 bytes in; out, each id maps to a printable ASCII character (random models emit noise,
    and noise should still be printable text)."""

    eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) or [0]

    def decode_one(self, token: int) -> str:
        return chr(32 + token % 95)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"{m.get('role', 'user')}: {content_text(m.get('content'))}\n" for m in messages) + "assistant:"


class HfTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        eos = self.tok.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text)) or [0]

    def decode_one(self, token: int) -> str:
        return self.tok.decode([token])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        msgs = [{"role": m.get("role", "user"), "content": content_text(m.get("content"))} for m in messages]
        if getattr(self.tok, "chat_template", None):
            return str(self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return ByteTokenizer.chat_prompt(ByteTokenizer(), msgs)


def content_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


