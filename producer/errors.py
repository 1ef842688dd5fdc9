"""Exceptions a producer sees. Error events map onto them by their `code`."""

from __future__ import annotations


class RedbatchError(Exception):
    """Base class of every redbatch error."""


class RequestError(RedbatchError):
    """A request ended with an `error` event."""

    code = "error"

    def __init__(self, message: str, request_id: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if code is not None:
            self.code = code


class InvalidRequest(RequestError):
    code = "invalid_request"


class UnknownModel(RequestError):
    code = "unknown_model"


class RequestExpired(RequestError):
    code = "expired"


class ModelError(RequestError):
    code = "model_error"


class DeadLettered(RequestError):
    code = "dead_letter"


class UnsupportedTask(RequestError):
    code = "unsupported_task"


class RequestAborted(RedbatchError):
    """The request ended with an `aborted` event."""

    def __init__(self, request_id: str):
        super().__init__(f"request {request_id} was aborted")
        self.request_id = request_id


class RequestTimeout(RedbatchError):
    """No terminal event arrived within the caller's timeout. The request may still run."""


class QueueFull(RedbatchError):
    """The model's request stream is at its max_queue_len; retry later."""


class DuplicateRequest(RedbatchError):
    """A request with this id is already queued, running or finished."""


class NoLiveWorker(RedbatchError):
    """No worker of the model has heartbeated within its heartbeat TTL: a request would wait with no one to serve it."""


class NoLiveWorkerWarning(UserWarning):
    """Issued instead of NoLiveWorker when the client is built with on_no_live_worker="warn"."""


_BY_CODE = {cls.code: cls for cls in (InvalidRequest, UnknownModel, RequestExpired, ModelError, DeadLettered, UnsupportedTask)}


def error_from_event(code: str | None, message: str | None, request_id: str) -> RequestError:
    cls = _BY_CODE.get(code or "", RequestError)
    return cls(message or code or "request failed", request_id=request_id, code=code)
