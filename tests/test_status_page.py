"""The gateway's status page: its JSON is `redbatch status --json`'s, behind the API keys when they are configured."""

from __future__ import annotations

import time

import httpx
import pytest

from producer import admin
from producer.keys import PRIORITIES, Keys

pytestmark = pytest.mark.redis


def test_status_json_is_the_status_commands_and_the_page_is_served(worker_factory, gateway_factory, rds, prefix):
    worker_factory().start()
    gateway = gateway_factory()
    page = httpx.get(gateway.url + "/", timeout=10)
    assert page.status_code == 200 and "status.json" in page.text and page.headers["content-type"].startswith("text/html")
    deadline = time.monotonic() + 30
    status = httpx.get(gateway.url + "/status.json", timeout=10).json()
    while status["models"]["tiny"]["live_workers"] == 0 and time.monotonic() < deadline:  # until its first heartbeat
        time.sleep(0.1)
        status = httpx.get(gateway.url + "/status.json", timeout=10).json()
    direct = admin.system_status(rds, Keys(prefix))
    assert set(status["models"]) == set(direct["models"]) == {"tiny"}
    tiny = status["models"]["tiny"]
    assert tiny.keys() == direct["models"]["tiny"].keys()
    assert set(tiny["priorities"]) == {p.value for p in PRIORITIES}
    assert tiny["live_workers"] == 1 and tiny["workers"][0]["live"] is True
    assert status["gateway"]["open_requests"] == 0


def test_status_json_needs_a_key_and_shows_only_that_keys_models(worker_factory, gateway_factory):
    worker_factory().start()
    gateway = gateway_factory(api_keys={"k-all": ("*",), "k-other": ("other",)})
    assert httpx.get(gateway.url + "/", timeout=10).status_code == 200  # the page holds no data
    keyless = httpx.get(gateway.url + "/status.json", timeout=10)
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(gateway.url + "/status.json", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    every = httpx.get(gateway.url + "/status.json", headers={"Authorization": "Bearer k-all"}, timeout=10).json()
    assert list(every["models"]) == ["tiny"]
    other = httpx.get(gateway.url + "/status.json", headers={"Authorization": "Bearer k-other"}, timeout=10).json()
    assert other["models"] == {}
