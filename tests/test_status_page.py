"""The gateway's status page: its JSON is `redbatch status --json`'s, behind the API keys when they are configured."""

from __future__ import annotations

import os
import shutil
import threading
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


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_WAIT_S = 60  # a condition the page never reaches fails the test instead of hanging it
SCREENSHOT_ENV = "REDBATCH_STATUS_SCREENSHOT"  # a path: the browser test saves the page there (docs/img/)


@pytest.fixture
def browser():
    """Headless Debian Chromium through selenium and Debian's chromedriver."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,560",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


class Load:
    """Short completions sent one after another through the gateway until stopped, so that tokens keep flowing."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key
        self.num_done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60) as http:
            while not self._stop.is_set():
                reply = http.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon a time",
                                                           "max_tokens": 16, "temperature": 0})
                reply.raise_for_status()
                self.num_done += 1

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _text(driver, css: str) -> str:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )

    try:  # the page redraws every second: an element found a moment ago may be gone
        return driver.find_element("css selector", css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_the_page_in_a_browser_shows_a_running_worker_and_updates(worker_factory, gateway_factory, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    worker = worker_factory(max_num_seqs=4).start()
    gateway = gateway_factory(api_keys={"k-page": ("*",)})
    wait = WebDriverWait(browser, BROWSER_WAIT_S, poll_frequency=0.1)
    browser.get(gateway.url + "/#key=k-page")

    wait.until(lambda d: "1 live worker(s)" in _text(d, '[data-model="tiny"] h2'))
    row = f'[data-model="tiny"] tr.worker[data-worker="{worker.worker.config.worker_id}"]'
    assert _text(browser, row + " .live") == "live"
    assert _text(browser, "#error") == "" and not browser.find_element("id", "key-form").is_displayed()
    tokens_before = int(_text(browser, '[data-model="tiny"] .model-tokens'))
    updated_before = browser.find_element("id", "updated").get_attribute("data-ts")

    load = Load(gateway.url, "k-page").start()
    try:
        # redrawn from newer polls: more tokens generated, and a tokens/s measured while they flow
        wait.until(lambda d: int(_text(d, '[data-model="tiny"] .model-tokens') or 0) > tokens_before)
        wait.until(lambda d: float(_text(d, '[data-model="tiny"] .model-tokens-per-s') or 0) > 0)
        assert browser.find_element("id", "updated").get_attribute("data-ts") != updated_before
        if os.environ.get(SCREENSHOT_ENV):
            browser.save_screenshot(os.environ[SCREENSHOT_ENV])
    finally:
        load.stop()
    assert load.num_done > 0
