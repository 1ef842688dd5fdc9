"""`redbatch gateway`: the app under uvicorn. SIGTERM: stop accepting, let open requests finish within grace_s."""

from __future__ import annotations

import uvicorn

from producer.gateway.app import create_app
from producer.gateway.config import GatewayConfig


def run_gateway(config: GatewayConfig, log_level: str = "info") -> int:
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=config.host, port=config.port, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=config.grace_s, lifespan="on"))
    server.run()
    return 0
