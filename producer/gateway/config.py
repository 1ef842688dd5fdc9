"""The gateway's settings, built once from the command line (or a test) and passed down."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.connection import DEFAULT_REDIS_URL
from producer.keys import DEFAULT_PREFIX, check_model_name
from producer.protocol import DEFAULT_RESULT_TTL_S

ALL_MODELS = "*"


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = DEFAULT_PREFIX
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # API key -> the models it may use ("*": all). Empty: no authentication.
    api_keys: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    num_event_readers: int = Field(1, ge=1, le=64)  # XREAD loops shared by all open requests
    redis_max_connections: int = Field(32, ge=2)  # the command pool (submits, aborts, models); readers are apart
    request_timeout_s: float = Field(600.0, gt=0)  # longest wait for a request's next event, then 504 (and abort)
    max_queue_wait_s: float | None = Field(None, gt=0)  # default deadline: a request not started by then is 504
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of a 429 (queue full) or 503 (no live worker)
    model_info_ttl_s: float = Field(1.0, ge=0)  # how long a model's registration is cached between requests
    result_ttl_s: int = Field(DEFAULT_RESULT_TTL_S, ge=1)
    grace_s: float = Field(30.0, ge=0)  # on SIGTERM, open requests get this long to finish
    status_page: bool = True

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for key, models in value.items():
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty and without whitespace")
            for model in models:
                if model != ALL_MODELS:
                    check_model_name(model)
        return value

    @property
    def requires_key(self) -> bool:
        return bool(self.api_keys)

    def allows(self, api_key: str | None, model: str) -> bool:
        models = self.api_keys.get(api_key or "")
        return models is not None and (ALL_MODELS in models or model in models)


def parse_api_key(spec: str) -> tuple[str, tuple[str, ...]]:
    """`KEY` (every model) or `KEY=model1,model2` (only those)."""
    key, _, models = spec.partition("=")
    names = tuple(m.strip() for m in models.split(",") if m.strip()) if models else (ALL_MODELS,)
    return key.strip(), names


def load_api_keys(specs: list[str], path: str | None) -> dict[str, tuple[str, ...]]:
    """Keys from `--api-key` specs and a JSON file {"KEY": ["model", ...] or "*"} (keeps keys out of `ps`)."""
    keys: dict[str, tuple[str, ...]] = {}
    if path:
        for key, models in json.loads(Path(path).read_text()).items():
            keys[key] = (models,) if isinstance(models, str) else tuple(models)
    for spec in specs:
        key, models = parse_api_key(spec)
        keys[key] = models
    return keys
