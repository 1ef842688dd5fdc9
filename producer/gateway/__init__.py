"""The OpenAI-compatible HTTP gateway over the queue (the `gateway` extra: FastAPI, uvicorn)."""

from producer.gateway.app import create_app
from producer.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
