"""Token usage of a response, streamed or not.

Engines that support ``stream_options.include_usage`` send a last chunk with ``usage``; others
(llama-cpp-python's server ignores the option) send none, and the tokens are counted from the
stream itself: one token per content chunk (llama.cpp and vLLM stream one token per chunk) and
the prompt's tokens from the engine's tokenizer when the adapter can ask it. The relay passes
every event through :class:`StreamUsage`, which forwards events as they come, holds back only
``data: [DONE]``, and adds the usage chunk before it when the client asked for one that the
engine did not send.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class TokenCount:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: True when the engine reported the numbers; False when they were counted here
    reported: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


def usage_of_body(body: bytes) -> TokenCount | None:
    """The ``usage`` of a whole (non-streamed) JSON response, if it has one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return _usage_of(doc)


def _usage_of(doc: Any) -> TokenCount | None:
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return TokenCount(prompt, completion, reported=True)


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))
    return bool(choice.get("text"))


class StreamUsage:
    """Watches an SSE stream's events; see the module docstring."""

    def __init__(self, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.counted_completion = 0
        self.reported: TokenCount | None = None
        self.done = False
        self._buffer = b""
        self._last_chunk: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> bytes:
        """Returns what to forward now: every complete event, except ``[DONE]`` and (when the
        client did not ask for it) the engine's usage-only chunk."""
        self._buffer += chunk
        out: list[bytes] = []
        while True:
            end, sep = self._event_end(self._buffer)
            if end < 0:
                break
            event, self._buffer = self._buffer[:end + sep], self._buffer[end + sep:]
            if self._inspect(event):
                out.append(event)
        return b"".join(out)

    @staticmethod
    def _event_end(buffer: bytes) -> tuple[int, int]:
        positions = [(buffer.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n")]
        found = [(p, n) for p, n in positions if p >= 0]
        return min(found) if found else (-1, 0)

    def _inspect(self, event: bytes) -> bool:
        data = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        if not data:
            return True  # comments, keep-alives: forward
        if data == b"[DONE]":
            self.done = True
            return False
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return True
        if not isinstance(doc, dict):
            return True
        usage = _usage_of(doc)
        if usage is not None:
            self.reported = usage
        choices = doc.get("choices")
        if isinstance(choices, list):
            self.counted_completion += sum(1 for c in choices if _has_content(c))
            if choices:
                self._last_chunk = doc
            elif usage is not None and not self.client_wants_usage:
                return False  # a usage-only chunk the client did not ask for
        return True

    def count(self, prompt_tokens: int) -> TokenCount:
        """The response's tokens: the engine's report, or the counted completion plus ``prompt_tokens``."""
        if self.reported is not None:
            return self.reported
        return TokenCount(prompt_tokens, self.counted_completion, reported=False)

    def tail(self, count: TokenCount) -> bytes:
        """What ends the stream: anything left over, the usage chunk if owed, then ``[DONE]``."""
        out = self._buffer
        self._buffer = b""
        if self.client_wants_usage and self.reported is None:
            last = self._last_chunk
            chunk = {
                "id": last.get("id", "swapserve-usage"),
                "object": last.get("object", "chat.completion.chunk"),
                "created": last.get("created", int(time.time())),
                "model": last.get("model", ""),
                "choices": [],
                "usage": count.as_usage(),
            }
            out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
        if self.done:
            out += b"data: [DONE]\n\n"
        return out


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request asks the engine to read, for counting its tokens."""
    if "messages" in body and isinstance(body["messages"], list):
        parts: list[str] = []
        for m in body["messages"]:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return ""


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters per token in English), used only when
    the engine cannot count for us."""
    return max(1, (len(text) + 3) // 4) if text else 0
