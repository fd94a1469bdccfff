"""Token counting of responses: the engine's usage where it reports one, counted otherwise; the
usage chunk added to a stream whose engine ignored stream_options.include_usage."""

from __future__ import annotations

import json

from jupyter_swapserve.service.usage import StreamUsage, prompt_text, usage_of_body


def sse(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def chunk(text: str) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def events(data: bytes) -> list[object]:
    out = []
    for block in data.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def test_counts_a_stream_without_usage_and_adds_the_chunk_the_client_asked_for() -> None:
    stream = (sse({**chunk(""), "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
              + sse(chunk("Hel")) + sse(chunk("lo")) + sse(chunk("!")) + b"data: [DONE]\n\n")
    watcher = StreamUsage(client_wants_usage=True)
    # arbitrary chunk boundaries, as TCP delivers them
    forwarded = b"".join(watcher.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert b"[DONE]" not in forwarded and len(events(forwarded)) == 4
    count = watcher.count(prompt_tokens=12)
    assert (count.prompt_tokens, count.completion_tokens, count.reported) == (12, 3, False)
    tail = events(watcher.tail(count))
    assert tail[0]["choices"] == [] and tail[0]["usage"] == {"prompt_tokens": 12, "completion_tokens": 3,
                                                             "total_tokens": 15}
    assert tail[0]["id"] == "c1" and tail[-1] == "[DONE]"


def test_engine_usage_is_used_and_hidden_from_clients_that_did_not_ask() -> None:
    usage_chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}
    stream = sse(chunk("a")) + sse(chunk("b")) + sse(usage_chunk) + b"data: [DONE]\n\n"
    watcher = StreamUsage(client_wants_usage=False)
    forwarded = watcher.feed(stream)
    assert len(events(forwarded)) == 2  # the usage-only chunk is not forwarded
    count = watcher.count(prompt_tokens=0)
    assert (count.prompt_tokens, count.completion_tokens, count.reported) == (9, 2, True)
    assert events(watcher.tail(count)) == ["[DONE]"]
    asked = StreamUsage(client_wants_usage=True)
    assert len(events(asked.feed(stream))) == 3  # forwarded as the engine sent it, not added twice
    assert events(asked.tail(asked.count(0))) == ["[DONE]"]


def test_completions_stream_and_non_stream_bodies() -> None:
    watcher = StreamUsage(client_wants_usage=False)
    watcher.feed(sse({"choices": [{"text": "Paris"}]}) + sse({"choices": [{"text": ""}]}) + b": keep-alive\n\n")
    assert watcher.count(4).completion_tokens == 1
    body = json.dumps({"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}).encode()
    counted = usage_of_body(body)
    assert counted is not None and counted.total_tokens == 12
    assert usage_of_body(b"not json") is None and usage_of_body(b'{"usage": {"prompt_tokens": "x"}}') is None


def test_prompt_text_of_chat_and_completion_requests() -> None:
    assert prompt_text({"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}) \
        == "Be brief.\nHi"
    assert prompt_text({"prompt": ["a", "b"]}) == "a\nb" and prompt_text({"prompt": "x"}) == "x"
