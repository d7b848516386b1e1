"""The routes of the OpenAI-style API, and the :class:`Service` they share.

    POST /v1/completions        {"prompt", "max_tokens", "forget": {"adapter": strength}, "stream", ...}
    POST /v1/chat/completions   {"messages", "max_tokens", "forget": {...}, "temperature", "seed", ...}
    GET  /v1/adapters           loaded adapters (rank, default strength, path, kind)
    POST /v1/adapters           {"name", "path": local folder or Hub id, "default": 0.0 or "auto",
                                 "scope": true (beside the adapter, the default when there is one), false or a path}
    DELETE /v1/adapters/{name}
    GET  /v1/models, GET /health (counters: requests, batches, rows, largest batch)

Each handler finds its :class:`Service` at ``request.app.state.service``, validates the body
(:mod:`.schemas`), hands the rows to the :class:`~.batcher.Batcher` and shapes the response.
A request's ``forget`` sets the strength of each named adapter for its rows (row model:
base + sum_k c_k dW_k); adapters it does not name use their default. ``"auto"`` (for an adapter
loaded with a scope) lets the scope set it per prompt; the response's ``scope`` gives, per prompt,
{adapter: {"score", "strength"}}.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from .batcher import Batcher, Job
from .registry import load_named
from .schemas import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    NAME,
    ApiError,
    Limits,
    is_number,
    parse_common,
    parse_json,
    parse_messages,
    parse_prompts,
    render_chat,
)
from .streaming import complete, first_event, listen, stream

router = APIRouter()


@dataclass
class Service:
    """What every route needs: the runtime, the limits, the card kinds, and the batcher while the app runs.

    ``kinds``: adapter name -> card kind (forget, negated, ...), as :func:`~.registry.load_named`
    records them.
    """

    runtime: Any  # a lora_unlearn.serving.runtime.ForgetRuntime
    limits: Limits
    model_id: str
    kinds: dict[str, str]
    api_key: str | None = None
    batcher: Batcher | None = None

    @property
    def max_body(self) -> int:
        return 4 * self.limits.max_prompt_chars * self.limits.max_batch + 65536

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The authorized request's JSON body, refused past the size limit before it is all read."""
        self.authorize(request)
        max_body = self.max_body
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            raise ApiError(413, f"the request body is {size} bytes, over this server's limit of {max_body}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise ApiError(413, f"the request body is over this server's limit of {max_body} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def effective(self, forget: dict[str, float | str]) -> dict[str, float | str]:
        """Every loaded adapter's strength for this request: its own or the adapter's default ("auto": the
        scope sets it per prompt, as the response's ``scope`` says)."""
        return {name: forget.get(name, meta["default"] if meta["default"] == "auto" else float(meta["default"]))
                for name, meta in self.runtime.adapters().items()}

    def adapter_list(self) -> list[dict[str, Any]]:
        return [{"id": name, "object": "adapter", "kind": self.kinds.get(name, "unknown"), **meta}
                for name, meta in self.runtime.adapters().items()]


def _service(request: Request) -> Service:
    return request.app.state.service


# ---- generation -------------------------------------------------------------------------------

async def _generate(request: Request, fields: set[str], kind: str):
    """Parse an authorized completion or chat request, queue its rows, answer in one body or as a stream."""
    service = _service(request)
    body = await service.read_json(request)
    gen = parse_common(body, fields, service.limits, service.runtime.adapters())
    texts = None
    if kind == "chat":
        messages = parse_messages(body, service.limits)
        prompt, chat = render_chat(service.runtime.tokenizer, messages)
        prompts, texts = [prompt], ["\n".join(m["content"] for m in messages)]  # a scope reads every message
    else:
        prompts, chat = parse_prompts(body, service.limits), False
    if len(prompts) * gen.n > service.limits.max_batch:
        raise ApiError(400, f"{len(prompts)} prompts x n={gen.n} is {len(prompts) * gen.n} rows: this server runs "
                       f"at most {service.limits.max_batch} per request", "n")
    job = Job(prompts, [gen.forget] * len(prompts), gen.sampling.max_tokens, chat, gen.sampling, gen.n, texts=texts)
    events = listen(job) if gen.stream else None
    service.batcher.submit(job)
    forget = service.effective(gen.forget)
    if not gen.stream:
        return await complete(job, kind, service.model_id, forget)
    first = await first_event(job, events)
    return StreamingResponse(stream(job, events, first, kind, service.model_id, forget, gen.include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions")
async def completions(request: Request):
    return await _generate(request, COMPLETION_FIELDS, "completion")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _generate(request, CHAT_FIELDS, "chat")


# ---- adapters ---------------------------------------------------------------------------------

@router.get("/v1/adapters")
async def list_adapters(request: Request):
    service = _service(request)
    service.authorize(request)
    return {"object": "list", "data": service.adapter_list()}


@router.post("/v1/adapters", status_code=201)
async def load(request: Request):
    service = _service(request)
    runtime = service.runtime
    body = await service.read_json(request)
    unknown = sorted(set(body) - {"name", "path", "default", "scope"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}. Supported: name, path, default, scope", unknown[0])
    name, path, default = body.get("name"), body.get("path"), body.get("default", 0.0)
    scope = body.get("scope", "beside")
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(400, f"name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}", "name")
    if not isinstance(path, str) or not path:
        raise ApiError(400, "path must be a local adapter folder or a Hub repository id", "path")
    if not (isinstance(scope, bool) or (isinstance(scope, str) and scope)):
        raise ApiError(400, f"scope must be true (the scope saved beside the adapter), false, or a scope file or "
                       f"folder, got {scope!r}", "scope")
    if default != "auto":
        if not is_number(default) or not math.isfinite(default):
            raise ApiError(400, f"default must be a finite number or \"auto\" (with a scope), got {default!r}",
                           "default")
        if abs(default) > service.limits.max_strength:
            raise ApiError(400, f"default {default:g} is beyond this server's bound of "
                           f"{service.limits.max_strength:g} (--max-strength)", "default", "strength_out_of_range")
        default = float(default)
    if name in runtime.adapters():
        raise ApiError(409, f"an adapter named {name!r} is already loaded: DELETE /v1/adapters/{name} first",
                       "name", "exists")
    try:
        await run_in_threadpool(load_named, runtime, service.kinds, name, path, default, scope=scope,
                                max_strength=service.limits.max_strength)
    except UserError as e:
        raise ApiError(400, str(e), "scope" if "scope" in str(e) else "path") from None
    return {"id": name, "object": "adapter", "kind": service.kinds.get(name), **runtime.adapters()[name]}


@router.delete("/v1/adapters/{name}")
async def unload(name: str, request: Request):
    service = _service(request)
    runtime = service.runtime
    service.authorize(request)
    if name not in runtime.adapters():
        raise ApiError(404, f"no adapter named {name!r} is loaded. Loaded: {', '.join(runtime.adapters()) or '(none)'}",
                       "name", "unknown_adapter")

    def work():
        with runtime.lock:
            runtime.unload(name)
        service.kinds.pop(name, None)

    try:
        await run_in_threadpool(work)
    except UserError as e:  # unloaded by a concurrent DELETE
        raise ApiError(404, str(e), "name", "unknown_adapter") from None
    return {"id": name, "object": "adapter", "deleted": True}


# ---- the server itself ------------------------------------------------------------------------

@router.get("/v1/models")
async def models(request: Request):
    service = _service(request)
    service.authorize(request)
    return {"object": "list", "data": [{"id": service.model_id, "object": "model", "owned_by": "lora-unlearn"}]}


@router.get("/health")
async def health(request: Request):
    service = _service(request)
    batcher, limits = service.batcher, service.limits
    stats = dict(batcher.stats) if batcher else {}
    return {"status": "ok" if batcher else "starting", "model": service.model_id,
            "adapters": len(service.runtime.adapters()), "queued": batcher.queue.qsize() if batcher else 0, **stats,
            "limits": {"max_tokens": limits.max_tokens, "max_prompt_chars": limits.max_prompt_chars,
                       "max_batch": limits.max_batch, "batch_window_ms": limits.batch_window_ms,
                       "max_strength": limits.max_strength}}
