"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Logs in, sees the charts drawn with data from a real store, rolls back (the
registry changes), and is refused everything without a session. Screenshots go
to $CHATCORE_SCREENSHOTS when set (docs/screenshots/ holds the committed ones),
else to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from chatcore.dashboard import Dashboard
from chatcore.message import Message
from chatcore.registry import Registry

from .dashboard_fixtures import PASSWORD, dashboard_bot

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                ".ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


class Served:
    """The bot's dashboard on its own event loop in a thread, so Selenium can block this one."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dashboard-test", daemon=True)
        self.thread.start()
        self.bot = dashboard_bot(tmp_path)
        self.server = Dashboard(self.bot, self.bot.config["dashboard"])
        for text in ("hi there", "what is tea?", "thanks"):  # live latency and tokens/s on the overview
            self.call(self.bot.handle(Message(text=text, adapter="http", channel="api", user="carol",
                                              is_direct=True)))
        self.call(self.server.start())
        self.url = f"http://127.0.0.1:{self.server.port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.call(self.server.stop())
        self.call(self.bot.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("CHATCORE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_loaded(driver, tab: str) -> None:
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.loaded") == tab)


def drawn_pixels(driver, container: str) -> int:
    """Non-transparent pixels on the chart's canvas: 0 means nothing was drawn."""
    return driver.execute_script("""
        const c = document.querySelector(arguments[0] + ' canvas');
        if (!c || !c.width) return 0;
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++;
        return n;""", container)


def fetch(driver, method: str, path: str) -> list:
    """[status, body] of a same-origin fetch from the page (the browser's cookies, if any)."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[1], {method: arguments[0], headers: {'Content-Type': 'application/json'},
                             body: arguments[0] === 'POST' ? '{"confirm": true}' : undefined})
          .then(async r => done([r.status, await r.text()])).catch(e => done([0, String(e)]));""", method, path)


def test_without_a_session_nothing_is_shown_or_done(served, browser, shots):
    browser.get(served.url + "/")
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "app").is_displayed()
    status, body = fetch(browser, "GET", "/api/overview")
    assert status == 401 and "hello" not in body
    status, _ = fetch(browser, "POST", "/api/actions/rollback")
    assert status == 401
    browser.get(served.url + "/api/conversations")
    assert "login required" in browser.page_source and "tea" not in browser.page_source
    assert Registry(served.server.models_dir).history()["serving"] == "finetuned_20260101_000002.safetensors"
    browser.get(served.url + "/")
    browser.save_screenshot(str(shots / "dashboard-login.png"))


def test_login_charts_and_rollback(served, browser, shots):
    browser.get(served.url + "/")
    browser.find_element(By.ID, "name").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login-button").click()
    wait_loaded(browser, "overview")
    assert "logged in as alice" in browser.find_element(By.ID, "who").text
    # the charts hold the store's numbers and drew them
    exchanges = browser.execute_script("return window.dashboardCharts.activity.data[1]")
    assert sum(exchanges) == served.bot.store.stats()["exchanges"] == 39
    assert sum(browser.execute_script("return window.dashboardCharts.feedback.data[1]")) > 0
    assert drawn_pixels(browser, "#chart-activity") > 1000
    assert drawn_pixels(browser, "#chart-feedback") > 1000
    browser.save_screenshot(str(shots / "dashboard-overview.png"))

    browser.get(served.url + "/#learning")
    wait_loaded(browser, "learning")
    curves = browser.execute_script(
        "return Object.keys(window.dashboardCharts).filter(k => k.startsWith('loss:')).length")
    assert curves == 3
    assert drawn_pixels(browser, "#runs .run") > 1000
    assert "finetuned_20260101_000002.safetensors" in browser.find_element(By.ID, "runs").text
    browser.save_screenshot(str(shots / "dashboard-learning.png"))

    browser.find_element(By.ID, "rollback").click()
    alert = WebDriverWait(browser, 10).until(lambda d: d.switch_to.alert)
    assert "Roll back" in alert.text
    alert.accept()
    registry = Registry(served.server.models_dir)
    deadline = time.time() + 30
    while registry.history()["serving"] != "finetuned_20260101_000000.safetensors" and time.time() < deadline:
        time.sleep(0.2)
    assert registry.history()["serving"] == "finetuned_20260101_000000.safetensors"
    WebDriverWait(browser, 30).until(lambda d: "now serving" in d.find_element(By.ID, "flash").text)
    assert served.bot.engine.meta["source"].endswith("finetuned_20260101_000000.safetensors")

    browser.get(served.url + "/#conversations")
    wait_loaded(browser, "conversations")
    assert "secret plans" in browser.find_element(By.ID, "exchanges").text
    browser.save_screenshot(str(shots / "dashboard-conversations.png"))

    browser.get(served.url + "/#settings")
    wait_loaded(browser, "settings")
    audit = browser.find_element(By.ID, "audit").text
    assert "rollback" in audit and "alice" in audit
    assert PASSWORD not in browser.page_source
