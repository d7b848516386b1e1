"""The API's request and response shapes: limits, errors, parsing and validating bodies.

Every bad request becomes an :class:`ApiError`, answered as a 4xx JSON error
``{"error": {"message", "type", "param", "code"}}`` that says what to change. Unknown fields are
refused (a misspelt ``forget`` must not silently serve the unforgotten model); OpenAI fields this
server does not implement are accepted only at the value that means plain greedy decoding.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Limits:
    """What one request may ask for, and how requests are batched."""

    max_tokens: int = 256  # largest max_tokens a request may ask for
    max_prompt_chars: int = 8000  # per prompt (all messages of a chat together)
    max_batch: int = 8  # rows per generate call; also the most prompts one request may send
    batch_window_ms: float = 5.0  # how long the worker waits for more requests after the first
    default_max_tokens: int = 64

    def validate(self) -> None:
        for name in ("max_tokens", "max_prompt_chars", "max_batch", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not math.isfinite(self.batch_window_ms) or self.batch_window_ms < 0:
            raise UserError(f"batch window must be >= 0 ms, got {self.batch_window_ms}")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, and OpenAI's ``param`` / ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- requests ---------------------------------------------------------------------------------

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "forget", "user", "seed",
          "presence_penalty", "frequency_penalty", "logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
# fields accepted only at the value that means "plain greedy decoding"
NEUTRAL = {"n": (1,), "stream": (False,), "echo": (False,), "best_of": (1,), "suffix": (None,), "top_p": (1, 1.0),
           "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (None, False),
           "top_logprobs": (None, 0)}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (strengths and numbers must be finite)")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_common(body: dict[str, Any], allowed: set[str], limits: Limits, loaded: dict[str, dict]) -> tuple[int, dict, list]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}. Supported: {', '.join(sorted(allowed))}", unknown[0],
                       "unknown_field")
    for key, ok in NEUTRAL.items():
        if key in body and body[key] not in ok:
            raise ApiError(400, f"{key}={body[key]!r} is not supported: this server decodes greedily, one choice "
                           f"per prompt, without streaming (leave {key} out)", key, "unsupported")
    temperature = body.get("temperature")
    if temperature is not None and (not is_number(temperature) or temperature != 0):
        raise ApiError(400, f"temperature must be 0 or absent (decoding is greedy), got {temperature!r}",
                       "temperature", "unsupported")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{key} must be a positive integer, got {max_tokens!r}", key)
    elif max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key}={max_tokens} is over this server's limit of {limits.max_tokens}: ask for fewer",
                       key, "max_tokens_too_large")
    forget = body.get("forget") or {}
    if not isinstance(forget, dict):
        raise ApiError(400, f"forget must be an object of adapter name -> strength, got {type(forget).__name__}",
                       "forget")
    for name, strength in forget.items():
        if name not in loaded:
            raise ApiError(400, f"unknown adapter {name!r} in forget. Loaded: {', '.join(loaded) or '(none)'}",
                           "forget", "unknown_adapter")
        if not is_number(strength) or not math.isfinite(strength) or abs(strength) > 3.4028234663852886e38:
            raise ApiError(400, f"forget strength of {name!r} must be a finite number, got {strength!r}", "forget")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return max_tokens, {k: float(v) for k, v in forget.items()}, stops


def parse_prompts(body: dict[str, Any], limits: Limits) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    if len(prompts) > limits.max_batch:
        raise ApiError(400, f"{len(prompts)} prompts in one request: this server takes at most {limits.max_batch}",
                       "prompt")
    for p in prompts:
        if len(p) > limits.max_prompt_chars:
            raise ApiError(400, f"a prompt of {len(p)} characters is over this server's limit of "
                           f"{limits.max_prompt_chars}: shorten it", "prompt", "prompt_too_long")
    return prompts


def parse_messages(body: dict[str, Any], limits: Limits) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    total = sum(len(m["content"]) for m in out)
    if total > limits.max_prompt_chars:
        raise ApiError(400, f"the messages hold {total} characters, over this server's limit of "
                       f"{limits.max_prompt_chars}: shorten them", "messages", "prompt_too_long")
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    return out


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """(prompt, chat flag for runtime.generate): one user turn goes through the runtime's own chat path."""
    if len(messages) == 1:
        return messages[0]["content"], True
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: send a single user message or use /v1/completions",
                       "messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):  # runtime.generate(chat=False) adds special tokens itself
        text = text[len(bos):]
    return text, False


def truncate(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ---- responses --------------------------------------------------------------------------------

def usage(prompt_tokens: int, outs: list[tuple[str, int]]) -> dict[str, int]:
    completion = sum(n for _, n in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def finish(text: str, tokens: int, max_tokens: int, stops: list[str]) -> tuple[str, str]:
    """The text cut at the first stop string, and OpenAI's finish_reason ("stop" or "length")."""
    text, stopped = truncate(text, stops)
    return text, "stop" if stopped or tokens < max_tokens else "length"
