"""OpenAI-shaped HTTP errors, and which status each redbatch error becomes."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from producer.errors import (
    DeadLettered,
    DuplicateRequest,
    InvalidRequest,
    ModelError,
    NoLiveWorker,
    QueueFull,
    RedbatchError,
    RequestAborted,
    RequestError,
    RequestExpired,
    RequestTimeout,
    UnknownModel,
    UnsupportedTask,
)

# HTTP 499 "client closed request": the request was aborted (by its client or an operator)
ABORTED_STATUS = 499


class HTTPError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` (OpenAI's shape) with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # `detail` as well: the Xinference client shows that field of a failed response
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error, "detail": self.message}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_validation(exc: ValidationError) -> HTTPError:
    """A pydantic error on the HTTP body: unknown fields the way OpenAI words them, others by field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return HTTPError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return HTTPError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return HTTPError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value")


def unknown_model(model: str) -> HTTPError:
    return HTTPError(404, f"The model `{model}` does not exist or has no worker.", param="model", code="model_not_found")


def from_redbatch(exc: RedbatchError, model: str, retry_after_s: int) -> HTTPError:
    """The HTTP error for a producer exception or an error/aborted event."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, UnknownModel):
        return unknown_model(model)
    if isinstance(exc, QueueFull):
        return HTTPError(429, str(exc), type="rate_limit_error", code="queue_full", headers=retry)
    if isinstance(exc, NoLiveWorker):
        return HTTPError(503, str(exc), type="server_error", code="no_live_worker", headers=retry)
    if isinstance(exc, (InvalidRequest, UnsupportedTask)):
        return HTTPError(400, str(exc), code=exc.code)
    if isinstance(exc, DuplicateRequest):
        return HTTPError(409, str(exc), code="duplicate_request_id", param="request_id")
    if isinstance(exc, (RequestExpired, RequestTimeout)):
        return HTTPError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, RequestAborted):
        return HTTPError(ABORTED_STATUS, str(exc), type="aborted", code="request_aborted")
    if isinstance(exc, (ModelError, DeadLettered)):
        return HTTPError(500, str(exc), type="server_error", code=exc.code)
    if isinstance(exc, RequestError):
        return HTTPError(500, str(exc), type="server_error", code=exc.code)
    return HTTPError(500, str(exc), type="server_error")
