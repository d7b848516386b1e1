"""Answering a :class:`~.batcher.Job`: all at once (one JSON body) or as Server-Sent Events, as OpenAI does.

A body waits for the job's future; a stream reads the job's events as the worker sends them. It sends one chunk per piece of new text
(``chat.completion.chunk`` with a ``delta``, or ``text_completion`` with ``text``), then a chunk
with each choice's ``finish_reason``, with ``stream_options.include_usage`` a last chunk with empty
``choices`` and the ``usage``, and ``data: [DONE]``. Every body and chunk carries the request's ``forget`` and, when a scope set a
strength, ``scope`` (per prompt, {adapter: {"score", "strength"}}). A row that fails mid-stream sends
``data: {"error": {...}}`` (OpenAI's client raises it as ``APIError``) and ends the stream. When
the client goes away the job is cancelled, so its rows stop at their next token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from .batcher import Job
from .schemas import usage


def listen(job: Job) -> asyncio.Queue:
    """Route ``job``'s events to an asyncio queue of the running event loop (the worker calls the listener)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def listener(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            job.cancelled.set()

    job.listener = listener
    return events


def _head(kind: str, model: str) -> dict[str, Any]:
    prefix, obj = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model}


async def complete(job: Job, kind: str, model: str, forget: dict[str, float]) -> dict[str, Any]:
    """The whole answer as one response body."""
    try:
        result = await asyncio.wrap_future(job.future)
    finally:
        job.cancelled.set()  # a no-op when every row has ended; stops the rows when the handler is cancelled
    texts = [t for t, _ in result["outputs"]]
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, result["reasons"]))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, result["reasons"]))]
    tokens = sum(n for _, n in result["outputs"])
    return {**_head(kind, model), "choices": choices, "usage": usage(result["prompt_tokens"], tokens), "forget": forget,
            **_scope(job)}


def _scope(job: Job) -> dict[str, Any]:
    """``{"scope": [per prompt {adapter: {"score", "strength"}}]}`` when a scope set a strength, else nothing."""
    return {"scope": job.scope} if job.scope else {}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def first_event(job: Job, events: asyncio.Queue) -> tuple:
    """The job's first event; a job that fails before any text raises (an HTTP error, not a broken stream)."""
    try:
        event = await events.get()
    except BaseException:
        job.cancelled.set()
        raise
    if event[0] == "fail":
        raise event[1]
    return event


async def stream(job: Job, events: asyncio.Queue, first: tuple, kind: str, model: str, forget: dict[str, float],
                 include_usage: bool) -> AsyncIterator[str]:
    """The answer as Server-Sent Events, one chunk per piece of text as the worker generates it."""
    head = {**_head(kind, model), "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: int, text: str | None, reason: str | None) -> str:
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            body = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            body = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [body], **extra, "forget": forget, **_scope(job)})

    try:
        if kind == "chat":
            for i in range(job.rows):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra,
                            "forget": forget, **_scope(job)})
        left, tokens, event = job.rows, 0, first
        while True:
            if event[0] == "fail":
                yield _sse(event[1].body())
                return
            if event[0] == "delta":
                yield chunk(event[1], event[2], None)
            elif event[0] == "finish":
                yield chunk(event[1], None, event[2])
                left, tokens = left - 1, tokens + event[3]
                if not left:
                    break
            event = await events.get()
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage(sum(job.prompt_tokens), tokens), "forget": forget})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client closed early (or the stream ended): the job's rows stop
