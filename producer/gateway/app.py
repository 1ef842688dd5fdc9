"""The HTTP routes: OpenAI's API, Xinference's few client endpoints, health, readiness and the status page."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

from producer import admin
from producer.gateway.config import ALL_MODELS, GatewayConfig
from producer.gateway.errors import HTTPError, from_validation, unknown_model
from producer.gateway.openai_api import ChatCompletionBody, CompletionBody, ImageBody
from producer.gateway.service import Gateway
from producer.keys import check_model_name, check_request_id
from producer.protocol import TaskKind

STATUS_PAGE = Path(__file__).with_name("static") / "status.html"
B = TypeVar("B", bound=BaseModel)


def create_app(config: GatewayConfig) -> FastAPI:
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await gateway.start()
        yield
        await gateway.stop()

    app = FastAPI(title="redbatch gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(HTTPError)
    async def _http_error(_request: Request, exc: HTTPError) -> Response:
        return exc.response()

    # ------------------------------------------------------------ OpenAI

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionBody)
        _authorize(config, request, body.model)
        return await gateway.serve(request, body.to_request())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionBody)
        _authorize(config, request, body.model)
        return await gateway.serve(request, body.to_request())

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        body = await _parse(request, ImageBody)
        _authorize(config, request, body.model)
        return await gateway.serve(request, body.to_request())

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        key = _api_key(config, request)
        models = await gateway.registered_models()
        data = [_model_card(name, info, live) for name, (info, live) in models.items()
                if live > 0 and (not config.requires_key or config.allows(key, name))]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model}")
    async def describe_model(model: str, request: Request) -> dict[str, Any]:
        """OpenAI's model object, with the fields Xinference's client reads (model_type, model_ability)."""
        _authorize(config, request, model)
        models = await gateway.registered_models()
        if model not in models:
            raise unknown_model(model)
        info, live = models[model]
        return _model_card(model, info, live)

    @app.post("/v1/requests/{request_id}/abort")
    async def abort(request_id: str, request: Request) -> dict[str, Any]:
        key = _api_key(config, request)
        _check_id(request_id)
        if config.requires_key and ALL_MODELS not in config.api_keys[key]:
            await _check_owned(gateway, config.api_keys[key], request_id)
        return {"id": request_id, "object": "request.abort", "aborted": await gateway.abort(request_id, None)}

    # ------------------------------------------------------------ Xinference's client

    @app.get("/v1/cluster/auth")
    async def cluster_auth() -> dict[str, bool]:
        return {"auth": config.requires_key}

    @app.post("/v1/models/{model}/requests/{request_id}/abort")
    async def abort_in_model(model: str, request_id: str, request: Request) -> dict[str, Any]:
        _authorize(config, request, model)
        _check_id(request_id)
        return {"id": request_id, "object": "request.abort", "aborted": await gateway.abort(request_id, model)}

    # ------------------------------------------------------------ operations

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        try:
            await asyncio.wait_for(gateway.redis.ping(), 2.0)
        except Exception as exc:  # noqa: BLE001 - any failure to reach Redis means not ready
            return JSONResponse({"status": "not ready", "reason": f"redis: {exc}"}, status_code=503)
        return JSONResponse({"status": "ready", "open_requests": gateway.num_streams})

    if config.status_page:
        @app.get("/", response_class=HTMLResponse)
        async def status_page() -> HTMLResponse:
            return HTMLResponse(STATUS_PAGE.read_text(encoding="utf-8"))

        @app.get("/status.json")
        async def status_json(request: Request) -> dict[str, Any]:
            # The page itself holds no data; its JSON needs a key when keys are configured and shows that key's models
            key = _api_key(config, request)
            try:
                status = await asyncio.to_thread(admin.system_status, gateway.sync_redis, gateway.keys)
            except redis.exceptions.NoPermissionError as exc:
                raise HTTPError(503, f"The gateway's Redis user may not read the status ({exc}): give it the ACL role "
                                "`gateway` (`redbatch acl gateway`), or run with --no-status-page.", type="server_error",
                                code="status_unavailable") from None
            if config.requires_key:
                status["models"] = {m: info for m, info in status["models"].items() if config.allows(key, m)}
            status["gateway"] = {"id": gateway.hub.gateway_id, "open_requests": gateway.num_streams}
            return status

    return app


async def _parse(request: Request, model: type[B]) -> B:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError:
        raise HTTPError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _api_key(config: GatewayConfig, request: Request) -> str | None:
    """The request's Bearer key; 401 when keys are configured and it has none or an unknown one."""
    if not config.requires_key:
        return None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPError(401, "You didn't provide an API key (Authorization: Bearer KEY).", code="invalid_api_key")
    if key.strip() not in config.api_keys:
        raise HTTPError(401, "Incorrect API key provided.", code="invalid_api_key")
    return key.strip()


def _authorize(config: GatewayConfig, request: Request, model: str) -> None:
    key = _api_key(config, request)
    try:
        check_model_name(model)
    except ValueError:
        raise unknown_model(model) from None
    if config.requires_key and not config.allows(key, model):
        raise HTTPError(404, f"The model `{model}` does not exist or you do not have access to it.", param="model",
                        code="model_not_found")


def _check_id(request_id: str) -> None:
    try:
        check_request_id(request_id)
    except ValueError as exc:
        raise HTTPError(400, str(exc), param="request_id", code="invalid_value") from None


async def _check_owned(gateway: Gateway, models: tuple[str, ...], request_id: str) -> None:
    """A key limited to some models may abort only their requests (the id's owner key is per model)."""
    pipe = gateway.redis.pipeline(transaction=False)
    for model in models:
        pipe.exists(gateway.keys.request_owner(model, request_id))
    if not any(await pipe.execute()):
        raise HTTPError(404, f"No request {request_id!r} among the models this key may use.", param="request_id",
                        code="request_not_found")


def _model_card(name: str, info, live: int) -> dict[str, Any]:
    is_image = TaskKind.TEXT_TO_IMAGE.value in info.tasks
    return {
        "id": name, "object": "model", "created": info.last_seen // 1000, "owned_by": "redbatch",
        "model_type": "image" if is_image else "LLM", "model_name": name,
        "model_ability": ["text_to_image"] if is_image else [t for t in info.tasks if t in ("generate", "chat")],
        "tasks": list(info.tasks), "live_workers": live, "max_num_seqs": info.max_num_seqs,
    }
