"""redbatch producer side: wire protocol, key names and clients. Never imports torch."""

from producer.aio import AsyncClient, AsyncModel
from producer.client import Client, Model
from producer.errors import (
    DeadLettered,
    DuplicateRequest,
    InvalidRequest,
    ModelError,
    NoLiveWorker,
    NoLiveWorkerWarning,
    QueueFull,
    RedbatchError,
    RequestAborted,
    RequestError,
    RequestExpired,
    RequestTimeout,
    UnknownModel,
    UnsupportedTask,
)

__all__ = [
    "AsyncClient", "AsyncModel", "Client", "Model", "DeadLettered", "DuplicateRequest", "InvalidRequest",
    "ModelError", "NoLiveWorker", "NoLiveWorkerWarning", "QueueFull", "RedbatchError", "RequestAborted", "RequestError", "RequestExpired",
    "RequestTimeout", "UnknownModel", "UnsupportedTask",
]
