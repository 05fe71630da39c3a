"""The playground page in a real headless Chromium: pick models, type a prompt, read the streamed
answers from the page, compare them with the API's, save a screenshot for the docs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx2")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from serving import build_served  # noqa: E402
from test_serve_http import make_server  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "playground.png"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium and chromedriver are not installed "
                                "(.ci/run installs Debian's chromium and chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_playground_streams_answers_side_by_side(browser, tmp_path, default_tokenizer):
    model_dir, folders = build_served(tmp_path, default_tokenizer, names=("lora", "loha"))
    srv, _ = make_server(model_dir, folders, context=256)
    prompt = "Tell me about the sea."
    with srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) == 3)
        assert {e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, "#models input")} == {
            "base", "lora", "loha"}
        browser.find_element(By.ID, "chat").click()  # plain completion: the tiny model's chat answers are blank lines
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("12")
        browser.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done]")) == 3)
        answers = {e.get_attribute("data-model"): (e.find_element(By.CLASS_NAME, "text").text,
                                                   e.find_element(By.CLASS_NAME, "speed").text)
                   for e in browser.find_elements(By.CSS_SELECTOR, ".answer")}
        os.makedirs(SCREENSHOT.parent, exist_ok=True)
        browser.save_screenshot(str(tmp_path / "playground.png"))
        for name in ("base", "lora", "loha"):
            api = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
            text, speed = answers[name]
            assert text and text == api.strip(), (name, text, api)  # the DOM's text loses outer whitespace
            assert "tokens/s" in speed and speed.startswith("12 tokens")
    if os.environ.get("DELTATUNE_SAVE_SCREENSHOT"):
        shutil.copy(tmp_path / "playground.png", SCREENSHOT)
