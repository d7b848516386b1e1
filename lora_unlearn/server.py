"""HTTP serving with per-request forgetting: an OpenAI-style API over one :class:`ForgetRuntime`.

    POST /v1/completions        {"prompt", "max_tokens", "forget": {"adapter": strength}, ...}
    POST /v1/chat/completions   {"messages", "max_tokens", "forget": {...}, ...}
    GET  /v1/adapters           loaded adapters (rank, default strength, path, kind)
    POST /v1/adapters           {"name", "path": local folder or Hub id, "default": 0.0}
    DELETE /v1/adapters/{name}
    GET  /v1/models, GET /health (counters: requests, batches, rows, largest batch)

Generation is greedy (temperature 0 or absent). A request's ``forget`` sets the strength of
each named adapter for its rows (row model: base + sum_k c_k dW_k); adapters it does not name
use their default. Requests are batched: a worker thread takes the first waiting request,
collects those that arrive within ``batch_window_ms`` (up to ``max_batch`` rows) with the same
``max_tokens`` and mode, and runs one ``runtime.generate`` with a forget setting per row, under
``runtime.lock`` (adapter loading takes the same lock). Rows are independent (left padding,
attention mask), so an answer equals the answer to the same request sent alone.

Every bad request gets a 4xx JSON error ``{"error": {"message", "type", "param", "code"}}`` that
says what to change; unknown fields are refused (a misspelt ``forget`` must not silently serve
the unforgotten model). With an API key (``--api-key`` or ``LORA_UNLEARN_API_KEY``) every
``/v1`` route needs ``Authorization: Bearer KEY``; ``/health`` stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import queue
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
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
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- batching ---------------------------------------------------------------------------------

@dataclass
class Job:
    """One request: its rows, one forget dict per row, and the generation key it can share a batch on."""

    prompts: list[str]
    forgets: list[dict[str, float]]
    max_new_tokens: int
    chat: bool  # True: the runtime wraps each prompt as one user turn
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[int, bool]:
        return self.max_new_tokens, self.chat


class Batcher:
    """A queue and one worker thread that runs waiting requests together."""

    def __init__(self, runtime, max_batch: int = 8, window_s: float = 0.005):
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "batched_requests": 0,
                      "errors": 0}
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lora-unlearn-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        pending: deque[Job] = deque()
        while True:
            if not pending:
                job = self.queue.get()
                if job is None:
                    return
                pending.append(job)
            deadline = time.monotonic() + self.window_s
            stop = False
            while sum(len(j.prompts) for j in pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                pending.append(job)
            key, rows, batch = pending[0].key, 0, []
            for job in list(pending):
                if job.key == key and rows + len(job.prompts) <= self.max_batch:
                    batch.append(job)
                    rows += len(job.prompts)
            for job in batch:
                pending.remove(job)
            self._run(batch)
            if stop:
                for job in pending:
                    job.future.set_exception(ApiError(503, "the server is shutting down"))
                return

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.runtime.lock:
                loaded = set(self.runtime.adapters())
                ready = []
                for job in batch:
                    missing = sorted({n for f in job.forgets for n in f} - loaded)
                    if missing:
                        job.future.set_exception(ApiError(
                            400, f"adapter {missing[0]!r} was unloaded while the request waited. "
                            f"Loaded: {', '.join(sorted(loaded)) or '(none)'}", "forget", "unknown_adapter"))
                    else:
                        ready.append(job)
                self._generate(ready)
        except Exception as e:  # noqa: BLE001 - the worker must survive anything; the request gets a 500
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(ApiError(500, f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one batch (caller holds the runtime lock); isolate a failing request."""
        if not jobs:
            return
        prompts = [p for j in jobs for p in j.prompts]
        forgets = [f for j in jobs for f in j.forgets]
        try:
            texts = self.runtime.generate(prompts, forgets, max_new_tokens=jobs[0].max_new_tokens, chat=jobs[0].chat)
        except UserError as e:
            if len(jobs) > 1:  # one request's bad row must not fail the others: run each alone
                for job in jobs:
                    self._generate([job])
                return
            jobs[0].future.set_exception(ApiError(400, str(e)))
            return
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(prompts)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(prompts))
            if len(jobs) > 1:
                self.stats["batched_requests"] += len(jobs)
        at = 0
        for job in jobs:
            n = len(job.prompts)
            job.future.set_result({"outputs": [(t, self._count(t)) for t in texts[at:at + n]],
                                   "prompt_tokens": self._prompt_tokens(job)})
            at += n

    def _count(self, text: str) -> int:
        return len(self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_tokens(self, job: Job) -> int:
        # Tokenizers are not safe to call from several threads: counting happens here, in the worker.
        return sum(self._count(p) for p in job.prompts)


# ---- request parsing --------------------------------------------------------------------------

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


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _common(body: dict[str, Any], allowed: set[str], limits: Limits, loaded: dict[str, dict]) -> tuple[int, dict, list]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}. Supported: {', '.join(sorted(allowed))}", unknown[0],
                       "unknown_field")
    for key, ok in NEUTRAL.items():
        if key in body and body[key] not in ok:
            raise ApiError(400, f"{key}={body[key]!r} is not supported: this server decodes greedily, one choice "
                           f"per prompt, without streaming (leave {key} out)", key, "unsupported")
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or temperature != 0):
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
        if not _is_number(strength) or not math.isfinite(strength):
            raise ApiError(400, f"forget strength of {name!r} must be a finite number, got {strength!r}", "forget")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return max_tokens, {k: float(v) for k, v in forget.items()}, stops


def _prompts(body: dict[str, Any], limits: Limits) -> list[str]:
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


def _messages(body: dict[str, Any], limits: Limits) -> list[dict[str, str]]:
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


def _render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
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


def _truncate(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ---- the app ----------------------------------------------------------------------------------

def create_app(runtime, *, api_key: str | None = None, limits: Limits | None = None, model_name: str | None = None,
               kinds: dict[str, str] | None = None):
    """The FastAPI app serving ``runtime`` (a :class:`lora_unlearn.runtime.ForgetRuntime`).

    ``kinds``: adapter name -> card kind (forget, negated, ...) of adapters loaded before, as
    :func:`load_named` records them.
    """
    limits = limits or Limits()
    limits.validate()
    info = getattr(runtime, "info", None)
    model_id = model_name or getattr(info, "hub_id", None) or "lora-unlearn"
    kinds = kinds if kinds is not None else {}
    state: dict[str, Batcher] = {}
    max_body = 4 * limits.max_prompt_chars * limits.max_batch + 65536

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(runtime, limits.max_batch, limits.batch_window_ms / 1000)
        try:
            yield
        finally:
            await run_in_threadpool(state.pop("batcher").close)

    app = FastAPI(title="lora-unlearn", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.limits = limits

    def error(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error(ApiError(400, f"invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        return error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        authorize(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            raise ApiError(413, f"the request body is {size} bytes, over this server's limit of {max_body}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise ApiError(413, f"the request body is over this server's limit of {max_body} bytes")
            chunks.append(chunk)
        return _parse_json(b"".join(chunks))

    def effective(forget: dict[str, float]) -> dict[str, float]:
        loaded = runtime.adapters()
        return {name: forget.get(name, float(meta["default"])) for name, meta in loaded.items()}

    async def run_jobs(prompts, forget, max_tokens, chat) -> tuple[list[tuple[str, int]], int]:
        job = Job(prompts, [dict(forget) for _ in prompts], max_tokens, chat)
        with state["batcher"]._stats_lock:
            state["batcher"].stats["requests"] += 1
        result = await asyncio.wrap_future(state["batcher"].submit(job))
        return result["outputs"], result["prompt_tokens"]

    def usage(prompt_tokens: int, outs) -> dict[str, int]:
        completion = sum(n for _, n in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def finish(text: str, tokens: int, max_tokens: int, stops: list[str]) -> tuple[str, str]:
        text, stopped = _truncate(text, stops)
        return text, "stop" if stopped or tokens < max_tokens else "length"

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        max_tokens, forget, stops = _common(body, COMPLETION_FIELDS, limits, runtime.adapters())
        prompts = _prompts(body, limits)
        outs, prompt_tokens = await run_jobs(prompts, forget, max_tokens, chat=False)
        choices = []
        for i, (text, n) in enumerate(outs):
            text, reason = finish(text, n, max_tokens, stops)
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": choices, "usage": usage(prompt_tokens, outs),
                "forget": effective(forget)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        max_tokens, forget, stops = _common(body, CHAT_FIELDS, limits, runtime.adapters())
        messages = _messages(body, limits)
        prompt, chat = _render_chat(runtime.tokenizer, messages)
        outs, prompt_tokens = await run_jobs([prompt], forget, max_tokens, chat=chat)
        text, reason = finish(outs[0][0], outs[0][1], max_tokens, stops)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "usage": usage(prompt_tokens, outs), "forget": effective(forget),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}]}

    def adapter_list() -> list[dict[str, Any]]:
        return [{"id": name, "object": "adapter", "kind": kinds.get(name, "unknown"), **meta}
                for name, meta in runtime.adapters().items()]

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        authorize(request)
        return {"object": "list", "data": adapter_list()}

    @app.post("/v1/adapters", status_code=201)
    async def load(request: Request):
        body = await read_json(request)
        unknown = sorted(set(body) - {"name", "path", "default"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}. Supported: name, path, default", unknown[0])
        name, path, default = body.get("name"), body.get("path"), body.get("default", 0.0)
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(400, f"name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}", "name")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "path must be a local adapter folder or a Hub repository id", "path")
        if not _is_number(default) or not math.isfinite(default):
            raise ApiError(400, f"default must be a finite number, got {default!r}", "default")
        if name in runtime.adapters():
            raise ApiError(409, f"an adapter named {name!r} is already loaded: DELETE /v1/adapters/{name} first",
                           "name", "exists")
        try:
            await run_in_threadpool(load_named, runtime, kinds, name, path, float(default))
        except UserError as e:
            raise ApiError(400, str(e), "path") from None
        return {"id": name, "object": "adapter", "kind": kinds.get(name), **runtime.adapters()[name]}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request):
        authorize(request)
        if name not in runtime.adapters():
            raise ApiError(404, f"no adapter named {name!r} is loaded. Loaded: {', '.join(runtime.adapters()) or '(none)'}",
                           "name", "unknown_adapter")

        def work():
            with runtime.lock:
                runtime.unload(name)
            kinds.pop(name, None)

        try:
            await run_in_threadpool(work)
        except UserError as e:  # unloaded by a concurrent DELETE
            raise ApiError(404, str(e), "name", "unknown_adapter") from None
        return {"id": name, "object": "adapter", "deleted": True}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "lora-unlearn"}]}

    @app.get("/health")
    async def health():
        batcher = state.get("batcher")
        stats = dict(batcher.stats) if batcher else {}
        return {"status": "ok" if batcher else "starting", "model": model_id, "adapters": len(runtime.adapters()),
                "queued": batcher.queue.qsize() if batcher else 0, **stats,
                "limits": {"max_tokens": limits.max_tokens, "max_prompt_chars": limits.max_prompt_chars,
                           "max_batch": limits.max_batch, "batch_window_ms": limits.batch_window_ms}}

    return app


def resolve_adapter_path(path: str) -> Path:
    """A local folder as is; a Hub id (``owner/name``) downloaded (adapter files only, safetensors)."""
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return Path(snapshot_download(path, allow_patterns=["adapter_config.json", "adapter_model.safetensors",
                                                            "lora_unlearn.json", "README.md"]))
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise UserError(f"cannot download adapter {path!r} from the Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}): check the id, the network and HF_TOKEN") from None


def load_named(runtime, kinds: dict[str, str], name: str, path: str | Path, default: float) -> None:
    """Read (outside the lock) and load (under it) one adapter; record its card kind."""
    from .adapter import load_adapter
    from .cards import kind_of

    folder = resolve_adapter_path(str(path))
    adapter = load_adapter(folder)
    kind = kind_of(folder, adapter).kind
    with runtime.lock:
        runtime.load(name, adapter, default)
    kinds[name] = kind


def parse_adapter_spec(spec: str) -> tuple[str, str, float]:
    """``NAME=DIR[:DEFAULT]`` -> (name, dir, default strength, 0.0 when not given)."""
    name, sep, rest = spec.partition("=")
    if not sep or not NAME.match(name) or not rest:
        raise UserError(f"--adapter {spec!r}: expected NAME=DIR[:DEFAULT], e.g. forget=adapters/forget_negated:0 "
                        "(NAME: letters, digits, '.', '_', '-')")
    path, colon, tail = rest.rpartition(":")
    if colon:
        try:
            default = float(tail)
        except ValueError:
            return name, rest, 0.0
        if not math.isfinite(default):
            raise UserError(f"--adapter {spec!r}: the default strength must be a finite number")
        return name, path, default
    return name, rest, 0.0


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` with uvicorn in a thread (port 0: a free one); yield its base URL, stop on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="lora-unlearn-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)


def serve(runtime, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, adapters: list[tuple[str, str, float]] = (), log_level: str = "info") -> None:
    """Load ``adapters`` ((name, folder or Hub id, default)) into ``runtime`` and serve it until interrupted."""
    import uvicorn

    kinds: dict[str, str] = {}
    for name, path, default in adapters:
        load_named(runtime, kinds, name, path, default)
    app = create_app(runtime, api_key=api_key, limits=limits, kinds=kinds)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
