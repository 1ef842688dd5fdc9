"""Every Redis key name redbatch uses. The only module that spells a key prefix."""

from __future__ import annotations

import re
from enum import Enum

DEFAULT_PREFIX = "rb"
GROUP = "workers"
# rq (bulk jobs) keeps its own keys and channels under its own fixed prefix; named here for the bulk ACL role
RQ_KEY_PATTERN = "rq:*"
RQ_CHANNEL_PATTERN = "rq:*"

_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BULK_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Priority(str, Enum):
    """A request's priority level, highest first. A request's level is the stream it is added to
    (Keys.requests(model, priority)); a worker admits waiting work of a higher level first and
    preempts lower-level work for it. Defined here because it is part of the key name."""

    INTERACTIVE = "interactive"  # the default: chats and completions someone waits for
    BULK = "bulk"  # offline jobs (redbatch bulk submits here by default)
    BACKGROUND = "background"  # below bulk: work that may wait for everything else

    @property
    def rank(self) -> int:
        """0 for the highest level; a larger rank yields to a smaller one."""
        return PRIORITIES.index(self)


PRIORITIES = tuple(Priority)  # highest first: the order a worker reads the streams in
DEFAULT_PRIORITY = Priority.INTERACTIVE


def check_priority(priority: object) -> Priority:
    try:
        return Priority(priority)
    except ValueError:
        raise ValueError(f"invalid priority {priority!r}: one of {', '.join(p.value for p in PRIORITIES)}") from None


def check_model_name(name: object) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: 1-64 chars of [A-Za-z0-9._-]")
    return name


def check_bulk_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not BULK_JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"invalid bulk job id {job_id!r}: 1-64 chars of [A-Za-z0-9_-]")
    return job_id


def check_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id):
        raise ValueError(f"invalid request id {request_id!r}: 1-128 chars of [A-Za-z0-9._:-]")
    return request_id


class Keys:
    """Key names under one prefix. `{model}` and `{id}` are Redis Cluster hash tags: a model's keys share a
    slot, and so do one request's."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"invalid key prefix {prefix!r}: 1-32 chars of [A-Za-z0-9._-]")
        self.prefix = prefix

    def requests(self, model: str, priority: Priority | str = DEFAULT_PRIORITY) -> str:
        """stream: the model's requests of one priority level. The default level is the v1 stream itself;
        each other level is a stream of its own beside it (same hash tag, same `workers` group)."""
        model, priority = check_model_name(model), check_priority(priority)
        if priority == DEFAULT_PRIORITY:
            return self._model_key(model, "requests")
        return self._model_key(model, f"requests:{priority.value}")

    def dead(self, model: str) -> str:
        return self._model_key(check_model_name(model), "dead")

    def model_workers(self, model: str) -> str:
        # zset worker_id -> last heartbeat (unix ms); an addition to the v1 key table
        return self._model_key(check_model_name(model), "workers")

    def request_owner(self, model: str, request_id: str) -> str:
        """string: the request stream entry id that owns request_id (duplicate guard); in the model's slot."""
        return self._model_key(check_model_name(model), f"id:{check_request_id(request_id)}")

    def models(self) -> str:
        return f"{self.prefix}:models"

    def worker(self, worker_id: str) -> str:
        if not WORKER_ID_RE.fullmatch(worker_id):
            raise ValueError(f"invalid worker id {worker_id!r}")
        return self._worker_key(worker_id)

    def worker_pattern(self) -> str:
        return self._worker_key("*")

    def events(self, request_id: str) -> str:
        return self._request_key(check_request_id(request_id), "events")

    def abort(self, request_id: str) -> str:
        return self._request_key(check_request_id(request_id), "abort")

    def patterns(self) -> dict[str, str]:
        """Glob patterns matching every key of each kind (ACL rules, SCAN): the names above with `*`."""
        return {
            "requests": self._model_key("*", "requests"), "requests_level": self._model_key("*", "requests:*"),
            "dead": self._model_key("*", "dead"),
            "owner": self._model_key("*", "id:*"), "workers": self._model_key("*", "workers"),
            "models": self.models(), "worker": self._worker_key("*"),
            "events": self._request_key("*", "events"), "abort": self._request_key("*", "abort"),
            "bulk_lease": self._bulk_key("*", "lease"), "bulk_cancel": self._bulk_key("*", "cancel"),
            "gateway_wake": self._gateway_key("*", "wake"),
            "redis_master": self.redis_master(), "redis_failover": self.redis_failover(),
        }

    def bulk_lease(self, job_id: str) -> str:
        """string, TTL: the token of the bulk runner that holds job_id (one runner writes its output at a time)."""
        return self._bulk_key(check_bulk_job_id(job_id), "lease")

    def bulk_cancel(self, job_id: str) -> str:
        """string, TTL: present = the bulk job stops submitting and aborts what it has in flight."""
        return self._bulk_key(check_bulk_job_id(job_id), "cancel")

    def gateway_wake(self, gateway_id: str) -> str:
        """stream, TTL: a gateway's own wake-up entries; its shared event reader blocks on it beside the events streams."""
        if not WORKER_ID_RE.fullmatch(gateway_id):
            raise ValueError(f"invalid gateway id {gateway_id!r}")
        return self._gateway_key(gateway_id, "wake")

    def redis_master(self) -> str:
        """string: the replication id of the Redis master the workers last saw (a failover changes it)."""
        return f"{self.prefix}:redis:master"

    def redis_failover(self) -> str:
        """string, TTL a lease window: a newly seen master's replication id, while leases aged by the failover
        are renewed (workers do not reclaim meanwhile)."""
        return f"{self.prefix}:redis:failover"

    def _model_key(self, model: str, suffix: str) -> str:
        return f"{self.prefix}:{{{model}}}:{suffix}"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def _request_key(self, request_id: str, suffix: str) -> str:
        return f"{self.prefix}:req:{{{request_id}}}:{suffix}"  # {id}: a request's keys share a Cluster slot

    def _bulk_key(self, job_id: str, suffix: str) -> str:
        return f"{self.prefix}:bulk:{job_id}:{suffix}"

    def _gateway_key(self, gateway_id: str, suffix: str) -> str:
        return f"{self.prefix}:gateway:{gateway_id}:{suffix}"
