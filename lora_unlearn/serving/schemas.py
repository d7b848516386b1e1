"""The API's request and response shapes: limits, errors, parsing and validating bodies.

Every bad request becomes an :class:`ApiError`, answered as a 4xx JSON error
``{"error": {"message", "type", "param", "code"}}`` that says what to change. Unknown fields are
refused (a misspelt ``forget`` must not silently serve the unforgotten model); OpenAI fields this
server does not implement (penalties, log-probabilities, echo) are accepted only at their neutral
value. Forget strengths are bounded by ``Limits.max_strength`` (``--max-strength``); ``"auto"`` is a
strength too, for an adapter loaded with a scope (its scope sets it per prompt).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .decoding import Sampling

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Limits:
    """What one request may ask for, and how requests are batched."""

    max_tokens: int = 256  # largest max_tokens a request may ask for
    max_prompt_chars: int = 8000  # per prompt (all messages of a chat together)
    max_batch: int = 8  # rows per generate call; also the most prompts one request may send
    batch_window_ms: float = 5.0  # how long the worker waits for more requests after the first
    default_max_tokens: int = 64
    max_strength: float = 8.0  # largest |forget strength| a request may set (the recipes select <= 3)

    def validate(self) -> None:
        for name in ("max_tokens", "max_prompt_chars", "max_batch", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.max_strength, bool) or not isinstance(self.max_strength, (int, float)) \
                or not 0 < self.max_strength <= 3.4028234663852886e38:
            raise UserError(f"max-strength must be a positive finite number, got {self.max_strength!r}")
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

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "forget", "user",
          "seed", "presence_penalty", "frequency_penalty", "logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
# fields accepted only at the value that means "no penalty, no log-probabilities, no echo"
NEUTRAL = {"echo": (False,), "best_of": (1, None), "suffix": (None,), "presence_penalty": (0, 0.0, None),
           "frequency_penalty": (0, 0.0, None), "logprobs": (None, False), "top_logprobs": (None, 0)}


@dataclass
class Generation:
    """A generation request's common fields, checked: what to decode, how, with which forget strengths
    (a number, or "auto" for an adapter with a scope)."""

    sampling: Sampling
    forget: dict[str, float | str]
    n: int = 1
    stream: bool = False
    include_usage: bool = False


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


def parse_common(body: dict[str, Any], allowed: set[str], limits: Limits, loaded: dict[str, dict]) -> Generation:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}. Supported: {', '.join(sorted(allowed))}", unknown[0],
                       "unknown_field")
    for key, ok in NEUTRAL.items():
        if key in body and body[key] not in ok:
            raise ApiError(400, f"{key}={body[key]!r} is not supported by this server (leave {key} out)", key,
                           "unsupported")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{key} must be a positive integer, got {max_tokens!r}", key)
    elif max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key}={max_tokens} is over this server's limit of {limits.max_tokens}: ask for fewer",
                       key, "max_tokens_too_large")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    sampling = Sampling(max_tokens, *_sampling(body), tuple(stops))
    n, stream, include_usage = _choices(body, limits)
    return Generation(sampling, _forget(body, limits, loaded), n, stream, include_usage)


def _sampling(body: dict[str, Any]) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed); temperature 0 or absent decodes greedily."""
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else temperature
    if not is_number(temperature) or not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be a number in [0, 2] (0: greedy), got {temperature!r}",
                       "temperature", "invalid_value")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 62):
        raise ApiError(400, f"seed must be an integer in [0, 2**62), got {seed!r}", "seed", "invalid_value")
    return float(temperature), float(top_p), seed


def _choices(body: dict[str, Any], limits: Limits) -> tuple[int, bool, bool]:
    """(n, stream, include_usage)."""
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_batch:
        raise ApiError(400, f"n must be an integer in 1..{limits.max_batch} (this server's batch), got {n!r}", "n",
                       "invalid_value")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream", "invalid_value")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")
    options = options or {}
    if not isinstance(options, dict) or sorted(set(options) - {"include_usage"}):
        raise ApiError(400, f"stream_options must be an object with the one field include_usage, got {options!r}",
                       "stream_options", "invalid_value")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", "stream_options", "invalid_value")
    return n, stream, include_usage


def _forget(body: dict[str, Any], limits: Limits, loaded: dict[str, dict]) -> dict[str, float]:
    forget = body.get("forget") or {}
    if not isinstance(forget, dict):
        raise ApiError(400, f"forget must be an object of adapter name -> strength, got {type(forget).__name__}",
                       "forget")
    for name, strength in forget.items():
        if name not in loaded:
            raise ApiError(400, f"unknown adapter {name!r} in forget (it maps loaded adapter names to strengths). "
                           f"Loaded: {', '.join(loaded) or '(none)'}", "forget", "unknown_adapter")
        if strength == "auto":
            if not loaded[name].get("scope"):
                raise ApiError(400, f"forget strength \"auto\" for {name!r}: this adapter has no scope, so nothing can "
                               "decide its strength; give a number, or load it with a scope (`lora-unlearn scope` "
                               "fits one)", "forget", "no_scope")
            continue
        if not is_number(strength) or not math.isfinite(strength):
            raise ApiError(400, f"forget strength of {name!r} must be a finite number, got {strength!r}", "forget")
        if abs(strength) > limits.max_strength:
            raise ApiError(400, f"forget strength of {name!r} is {strength:g}, beyond this server's bound of "
                           f"{limits.max_strength:g} (--max-strength): use a strength in [-{limits.max_strength:g}, "
                           f"{limits.max_strength:g}]", "forget", "strength_out_of_range")
    return {k: v if v == "auto" else float(v) for k, v in forget.items()}


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


# ---- responses --------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
