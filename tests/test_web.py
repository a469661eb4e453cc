"""The web page of `smallm serve`, in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium. A missing browser FAILS this test, saying so; set
SMALLM_SKIP_BROWSER=1 to skip it explicitly (the skip reason says the page went untested)."""

import os
import re
import tempfile
import warnings
from importlib import resources

import pytest
import torch
from conftest import running_server

from smallm import GPTConfig, get_tokenizer
from smallm.model import GPT
from smallm.serve import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_page_uses_no_external_resources():
    static = resources.files("smallm") / "static"
    names = sorted(p.name for p in static.iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(names)
    for name in names:
        text = (static / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), (
            f"{name} loads from the network"
        )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(99)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def server(model):
    with running_server(create_app(model, model_name="tiny", max_tokens_cap=64)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("SMALLM_SKIP_BROWSER") == "1":
        reason = "SMALLM_SKIP_BROWSER=1: the web page was NOT tested in a browser"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(
            f"BROWSER MISSING: {', '.join(missing)} not found, so the web page cannot be tested. Install "
            "Debian's headless Chromium (`apt-get install -y chromium chromium-driver`), or set "
            "SMALLM_SKIP_BROWSER=1 to skip this test explicitly.",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.TemporaryDirectory(prefix="smallm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    profile.cleanup()


def set_slider(browser, element_id, value):
    browser.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input'));",
        element_id,
        str(value),
    )


def test_page_streams_a_story_after_clicking_generate(browser, server, model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    assert "smallm" in browser.title
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: "tiny" in b.find_element(By.ID, "model-info").text)  # /health was read
    prompt = "Once upon a time, a cat"
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    set_slider(browser, "temperature", 0)  # greedy, so the story can be checked exactly
    set_slider(browser, "max-tokens", 20)
    assert browser.find_element(By.ID, "max-tokens-value").text == "20"
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "done", status.text
    story_prompt = browser.find_element(By.ID, "story-prompt").get_attribute("textContent")
    completion = browser.find_element(By.ID, "completion").get_attribute("textContent")
    assert story_prompt == prompt
    assert completion  # text appeared

    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(prompt)])
    new = model.generate(idx, max_new_tokens=20, temperature=0, eos_token_id=50256)[0, idx.size(1) :].tolist()
    assert completion == enc.decode([t for t in new if t != 50256])
    assert browser.find_element(By.ID, "generate").is_enabled()  # ready for the next story
