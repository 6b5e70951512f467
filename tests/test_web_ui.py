"""The web page at `/`, in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by .ci/run) driven by selenium against a real `edgeweave serve` process (the one-process
reference engine). It types a question, waits for the streamed answer, reads the cluster view, and
saves a screenshot; with an API key, the page asks for it and works once it is entered."""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_process import free_port, serve_process

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France? Answer in one sentence."
KEY = "secret"
SERVE_ARGS = ["--engine", "reference", "--quantize", "none"]
ANSWER_TIMEOUT_S = 120
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


def test_static_files_ship_in_the_package():
    """The page needs no build step: its files are package data of edgeweave.coordinator."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "web/*" in pyproject["tool"]["setuptools"]["package-data"]["edgeweave.coordinator"]
    from edgeweave.coordinator.web_ui import WEB_DIR

    for name in ("index.html", "app.js", "style.css"):
        text = (WEB_DIR / name).read_text()
        assert text.strip(), name
        assert "http://" not in text and "https://" not in text, f"{name} must not load anything from the network"
    assert "innerHTML" not in (WEB_DIR / "app.js").read_text(), "model output is set as text, never as HTML"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (each start loads the model): with a key, as on a LAN."""
    args = [*SERVE_ARGS, "--api-key", KEY]
    with serve_process(args, tmp_path_factory.mktemp("web"), {"OMP_NUM_THREADS": "2"}) as url:
        yield url


#: /v1/status of a tensor-parallel engine over two nodes, with the scheduler's batch figures
DISTRIBUTED_STATUS = {
    "model": "tiny-llama", "version": "9.9.9", "uptime_s": 3725.0,
    "engine": {
        "engine": "tensor parallel over 2 node(s)", "model": "tiny-llama", "layers": 4, "plan_id": "p1",
        "recoveries": [{"lost": "rank 1"}], "rejoins": [], "something_new": {"a": 1},
        "nodes": [
            {"name": "rank 0", "address": "10.0.0.2:50051", "job_id": "j0", "weight": 2.0, "kv_heads": 2,
             "q_heads": 6, "columns": 1024, "weight_bytes": 52_400_000},
            {"name": "rank 1", "address": "10.0.0.3:50051", "job_id": "j1", "weight": 1.0, "kv_heads": 1,
             "q_heads": 3, "columns": 512, "weight_bytes": 26_200_000},
        ],
    },
    "scheduler": {"active": 3, "waiting": 1, "max_active": 8, "max_queue": 64, "median_tokens_per_s": 11.25,
                  "median_ttft_s": None, "recent": [], "batch_size": 3, "tokens_per_s": 31.5},
}


@contextlib.contextmanager
def stub_server(status: dict) -> Iterator[str]:
    """The page over a stub API (no model): uvicorn on a thread, answering `status` at /v1/status."""
    import uvicorn
    from fastapi import FastAPI

    from edgeweave.coordinator.web_ui import mount_web_ui

    app = FastAPI()
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": status["model"], "object": "model"}]})
    app.get("/v1/status")(lambda: status)
    mount_web_ui(app)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stub server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    # an explicit driver path: Selenium Manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def ask(driver, question: str):
    """Type `question`, send it, and return the assistant message element it starts."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait(driver, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")) > before)
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")[-1]


def finished(message) -> str:
    return message.get_attribute("data-state") in ("done", "error", "stopped")


def wait(driver, timeout: float):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1)


def text_of(message) -> str:
    from selenium.webdriver.common.by import By

    return message.find_element(By.CSS_SELECTOR, ".text").text


@needs_browser
@pytest.mark.llm
@pytest.mark.slow  # the module's server loads the model (~15 s), shared by both browser tests
def test_chat_streams_an_answer_and_the_cluster_view_shows_the_node(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    model = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    model = model["data"][0]["id"]
    browser.get(f"{server}/")
    assert browser.title == "edgeweave"
    browser.execute_script("localStorage.setItem('edgeweave.apiKey', arguments[0])", KEY)
    browser.refresh()  # the key was entered before: the page reads it back from localStorage
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    wait(browser, 15).until(lambda d: d.find_element(By.ID, "model-name").text == model)

    answer = ask(browser, QUESTION)
    assert browser.find_element(By.ID, "stop").is_enabled()
    wait(browser, ANSWER_TIMEOUT_S).until(lambda d: text_of(answer).strip() or finished(answer))
    wait(browser, ANSWER_TIMEOUT_S).until(lambda d: finished(answer))
    assert answer.get_attribute("data-state") == "done", text_of(answer)
    assert "Paris" in text_of(answer)
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    user = browser.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    assert [text_of(m) for m in user] == [QUESTION]

    # the cluster view, refreshed every 2 s: the reference engine's one node, and the finished request
    rows = browser.find_elements(By.CSS_SELECTOR, "#nodes tr")
    assert rows and "local" in rows[0].text and "in-process" in rows[0].text, [r.text for r in rows]
    assert "reference" in browser.find_element(By.ID, "engine-desc").text
    assert browser.find_element(By.ID, "layers").text.isdigit()
    for figure in ("batch-size", "tokens-per-s"):  # a number, or "–" while the scheduler does not report it
        assert browser.find_element(By.ID, figure).text.strip(), figure
    wait(browser, 10).until(lambda d: d.find_element(By.ID, "median-tokens-per-s").text not in ("", "–"))
    wait(browser, 10).until(lambda d: "stop" in d.find_element(By.ID, "recent").text)
    assert browser.find_element(By.ID, "auth-message").is_displayed() is False

    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0


@needs_browser
@pytest.mark.llm
@pytest.mark.slow  # the module's server loads the model (~15 s), shared by both browser tests
def test_the_page_asks_for_the_api_key_and_works_with_it(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    for path in ("/", "/ui/app.js", "/ui/style.css"):  # the page itself stays open
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 200, path
    browser.get(f"{server}/")
    banner = browser.find_element(By.ID, "auth-message")
    wait(browser, 15).until(lambda d: banner.is_displayed())
    assert "API key" in banner.text
    refused = ask(browser, "hi")
    wait(browser, 15).until(lambda d: finished(refused))
    assert refused.get_attribute("data-state") == "error" and "API key" in text_of(refused)

    browser.find_element(By.ID, "api-key").send_keys(KEY)
    answer = ask(browser, QUESTION)
    wait(browser, ANSWER_TIMEOUT_S).until(lambda d: finished(answer))
    assert answer.get_attribute("data-state") == "done", text_of(answer)
    assert "Paris" in text_of(answer)
    wait(browser, 10).until(lambda d: not banner.is_displayed())
    assert browser.execute_script("return localStorage.getItem('edgeweave.apiKey')") == KEY
    assert browser.find_elements(By.CSS_SELECTOR, "#nodes tr td")[0].text == "local"

    # an API error shows its message; Stop ends a long answer early
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("5")
    invalid = ask(browser, "hello")
    wait(browser, 15).until(lambda d: finished(invalid))
    assert invalid.get_attribute("data-state") == "error" and "temperature" in text_of(invalid), text_of(invalid)
    temperature.clear()
    temperature.send_keys("0")
    long = ask(browser, "Write a long story about a lighthouse keeper.")
    wait(browser, ANSWER_TIMEOUT_S).until(lambda d: text_of(long).strip() or finished(long))
    browser.find_element(By.ID, "stop").click()
    wait(browser, 15).until(lambda d: finished(long))
    assert long.get_attribute("data-state") == "stopped" and text_of(long).strip()

    browser.set_window_size(420, 900)  # a phone: one column, nothing wider than the screen
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert browser.save_screenshot(str(tmp_path / "narrow.png"))


@needs_browser
def test_cluster_view_shows_a_tensor_parallel_cluster(browser):
    """Every node with its share, the batch figures when the scheduler reports them; unknown keys ignored."""
    from selenium.webdriver.common.by import By

    with stub_server(DISTRIBUTED_STATUS) as url:
        browser.get(f"{url}/")
        wait(browser, 15).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tr td")) == 10)
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in browser.find_elements(By.CSS_SELECTOR, "#nodes tr")]
        assert rows == [["rank 0", "10.0.0.2:50051", "2 / 6", "1024", "52.4 MB"],
                        ["rank 1", "10.0.0.3:50051", "1 / 3", "512", "26.2 MB"]]
        figures = {name: browser.find_element(By.ID, name).text for name in (
            "model-name", "engine-desc", "layers", "batch-size", "tokens-per-s", "active", "waiting",
            "median-tokens-per-s", "median-ttft", "recoveries", "uptime")}
        assert figures == {
            "model-name": "tiny-llama", "engine-desc": "tensor parallel over 2 node(s)", "layers": "4",
            "batch-size": "3", "tokens-per-s": "31.5", "active": "3 of 8", "waiting": "1 of 64",
            "median-tokens-per-s": "11.3", "median-ttft": "–", "recoveries": "1", "uptime": "1 h 2 min",
        }
        assert browser.find_element(By.ID, "auth-message").is_displayed() is False
