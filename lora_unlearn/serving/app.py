"""HTTP serving with per-request forgetting: an OpenAI-style API over one ForgetRuntime.

The app (:func:`create_app`) is FastAPI: :mod:`.routes` holds the endpoints, :mod:`.schemas` the
request and response shapes, :mod:`.batcher` the worker that decodes concurrent requests
together (continuous batching), each row with its own forget strengths and sampling (:mod:`.decoding`: greedy when temperature
is 0 or absent), and :mod:`.streaming` answers in one body or as Server-Sent Events.

Every bad request gets a 4xx JSON error ``{"error": {"message", "type", "param", "code"}}`` that
says what to change. With an API key (``--api-key`` or ``LORA_UNLEARN_API_KEY``) every ``/v1``
route needs ``Authorization: Bearer KEY``; ``/health`` stays open.
"""

from __future__ import annotations

import contextlib
import threading
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .batcher import Batcher
from .registry import load_named
from .routes import Service, router
from .schemas import ApiError, Limits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(runtime, *, api_key: str | None = None, limits: Limits | None = None, model_name: str | None = None,
               kinds: dict[str, str] | None = None):
    """The FastAPI app serving ``runtime`` (a :class:`lora_unlearn.serving.runtime.ForgetRuntime`).

    ``kinds``: adapter name -> card kind (forget, negated, ...) of adapters loaded before, as
    :func:`~.registry.load_named` records them.
    """
    limits = limits or Limits()
    limits.validate()
    info = getattr(runtime, "info", None)
    service = Service(runtime, limits, model_name or getattr(info, "hub_id", None) or "lora-unlearn",
                      kinds if kinds is not None else {}, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher = Batcher(runtime, limits.max_batch, limits.batch_window_ms / 1000)
        try:
            yield
        finally:
            batcher, service.batcher = service.batcher, None
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="lora-unlearn", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    app.include_router(router)
    return app


def _error(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as OpenAI's error object."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return _error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return _error(ApiError(400, f"invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))


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
          limits: Limits | None = None, adapters: list[tuple[str, str, float | str]] = (), log_level: str = "info") -> None:
    """Load ``adapters`` ((name, folder or Hub id, default: a number or "auto")) into ``runtime``, each with the
    scope saved beside it if any, and serve it until interrupted."""
    import uvicorn

    kinds: dict[str, str] = {}
    bound = (limits or Limits()).max_strength
    for name, path, default in adapters:
        load_named(runtime, kinds, name, path, default, max_strength=bound)  # and the scope saved beside it
    app = create_app(runtime, api_key=api_key, limits=limits, kinds=kinds)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
