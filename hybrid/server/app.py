"""The HTTP app: OpenAI's endpoints (chat completions, completions, models, responses), /health and
/metrics, behind an optional API key and a body size limit. Other APIs add their routers to it."""

from __future__ import annotations

import contextlib
import hmac

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from hybrid.server import anthropic_api, openai_api, responses_api
from hybrid.server.errors import APIError, error_response, install_error_handlers
from hybrid.server.serving import Serving

MAX_BODY_BYTES = 32 << 20
OPEN_PATHS = ("/", "/health")  # "/": clients' reachability probe (Claude Code sends HEAD / with no key)


def create_app(serving: Serving, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        serving.thread.stop()

    app = FastAPI(title="hybrid", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKey, key=api_key)
    app.include_router(openai_api.router)
    responses_api.install(app)
    anthropic_api.install(app)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        return Response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": serving.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class APIKey:
    """Refuse (401) any request but the open paths without the key, as `Authorization: Bearer KEY` or
    `x-api-key: KEY` (Anthropic's clients)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
            if not hmac.compare_digest(given, self.key):
                response = error_response(Request(scope), APIError(401, "invalid or missing API key",
                                                                   code="invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse (413) request bodies over max_bytes, by their declared length or as they arrive."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(Request(scope), self._error())
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
