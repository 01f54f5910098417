"""Errors as clients expect them: the right status and the API's error body, never a traceback.

Every failure (bad JSON, a field of the wrong type, an unknown route, an exception in a handler)
becomes an `APIError` rendered by the error format registered for the request's path: OpenAI's
`{"error": {"message", "type", "param", "code"}}` unless another API registered its own prefix.
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ErrorFormat = Callable[[APIError], dict]


def openai_error(e: APIError) -> dict:
    kind = _OPENAI_TYPES.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def register_error_format(app: FastAPI, path_prefix: str, fmt: ErrorFormat) -> None:
    """Render errors of requests under `path_prefix` with `fmt` (OpenAI's shape otherwise)."""
    app.state.error_formats[path_prefix] = fmt


def error_response(request: Request, e: APIError) -> JSONResponse:
    formats = request.app.state.error_formats
    prefix = max((p for p in formats if request.url.path.startswith(p)), key=len, default=None)
    fmt = formats[prefix] if prefix is not None else openai_error
    return JSONResponse(fmt(e), status_code=e.status)


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's complaints as one 400 naming the first field at fault."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = ".".join(loc) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                        for e in errors[:5])
    return APIError(400, message, param=param, code="invalid_value" if param else "invalid_body")


def install_error_handlers(app: FastAPI) -> None:
    app.state.error_formats = {}

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(request, validation_error(e))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return error_response(request, APIError(500, f"internal error: {type(e).__name__}: {e}"))
