"""The demo in a real browser: headless Chromium from the distribution's packages (``apt-get install chromium
chromium-driver``), driven by Selenium, against the server on a free loopback port with the built-in model.

Skipped, saying what is missing, without Gradio, Selenium, ``chromium`` or ``chromedriver`` (``.ci/run``
installs them).  ``VQDIFFUSION_DEMO_SCREENSHOT=path.png`` also writes the screenshot there (docs/demo.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

gradio = pytest.importorskip("gradio", reason="the demo needs Gradio: pip install -e '.[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs Selenium: pip install selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless browser: apt-get install -y chromium chromium-driver",
)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from vqdiffusion.demo import launch_demo  # noqa: E402
from vqdiffusion.pipeline import VQDiffusionPipeline  # noqa: E402

TIMEOUT = 60  # seconds for one generation to appear (the built-in model takes about one on a CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    pipe = VQDiffusionPipeline.from_pretrained("builtin:shapes")
    blocks, url = launch_demo(pipe=pipe, model="builtin:shapes", host="127.0.0.1", port=_free_port(), block=False)
    yield url, pipe
    blocks.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # this machine only
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _gallery_sizes(driver) -> list[list[int]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#t2i-gallery img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]);"
    )


def _status(driver) -> str:
    return driver.find_element(By.ID, "t2i-status").text


def _open(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#t2i-prompt textarea"))


def _ask(driver, prompt: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea")
    box.send_keys(Keys.CONTROL, "a")  # typed like a person: clear() fires no input event
    box.send_keys(Keys.DELETE)
    if prompt:
        box.send_keys(prompt)
    driver.find_element(By.ID, "t2i-generate").click()


def test_generate_in_the_browser(server, browser, tmp_path):
    url, pipe = server
    started = time.perf_counter()
    _open(browser, url)
    # every shared sampling option is on the page, with its explanation (a sampler's own, once it is chosen)
    for name in ("num-inference-steps", "guidance-scale", "truncation-rate", "sampler", "spacing", "temperature"):
        WebDriverWait(browser, TIMEOUT).until(lambda d, name=name: d.find_elements(By.ID, f"t2i-{name}"), name)
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "classifier-free guidance" in page and "same seed and settings give the same images" in page

    _ask(browser, "a large red circle in the top left")
    WebDriverWait(browser, TIMEOUT).until(lambda d: len(_gallery_sizes(d)) == 4)
    width = pipe.denoiser.config.width * pipe.vqvae.config.downsample_factor
    assert _gallery_sizes(browser) == [[width, width]] * 4
    assert _status(browser).startswith(f"Generated 4 images of {width} x {width} in ")
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    if os.environ.get("VQDIFFUSION_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["VQDIFFUSION_DEMO_SCREENSHOT"])

    _ask(browser, "")
    try:
        WebDriverWait(browser, TIMEOUT).until(lambda d: "the prompt is empty" in _status(d))
    except Exception:
        raise AssertionError(f"status: {_status(browser)!r}") from None
    assert _status(browser).startswith("Error: the prompt is empty")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert time.perf_counter() - started < 120


def _set_number(driver, elem_id: str, value: int) -> None:
    """Type ``value`` into a slider's number box (as a person would: select, type, leave the field)."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type='number']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_two_tabs_generating_at_once_both_get_images(server, browser):
    url, _ = server
    count = 8  # long enough (several seconds) for the second request to arrive while the first runs
    first = browser.current_window_handle
    _open(browser, url)
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    _open(browser, url)
    for handle in (first, second):
        browser.switch_to.window(handle)
        _set_number(browser, "t2i-num-images", count)
    for handle, prompt in ((first, "a blue square"), (second, "a green triangle at the bottom")):
        browser.switch_to.window(handle)
        _ask(browser, prompt)
    browser.switch_to.window(first)
    assert _gallery_sizes(browser) == [], "the first request ended before the second was sent: nothing overlapped"
    for handle in (first, second):
        browser.switch_to.window(handle)
        WebDriverWait(browser, 2 * TIMEOUT).until(lambda d: len(_gallery_sizes(d)) == count)
        assert _status(browser).startswith(f"Generated {count} images")
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)


def test_variation_tab_in_the_browser(server, browser, tmp_path):
    """Upload an image in the Variations tab, generate, and get the images of the model's size."""
    url, pipe = server
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    source = tmp_path / "source.png"
    image.images[0].save(source)
    _open(browser, url)
    tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text == "Variations")
    tab.click()
    upload = "#variation-image input[type='file']"
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, upload))
    browser.find_element(By.CSS_SELECTOR, upload).send_keys(str(source))
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#variation-image img"))
    box = browser.find_element(By.CSS_SELECTOR, "#variation-prompt textarea")
    box.send_keys("a blue square")
    browser.find_element(By.ID, "variation-generate").click()

    def images(d):
        return d.execute_script(
            "return [...document.querySelectorAll('#variation-gallery img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]);"
        )

    WebDriverWait(browser, TIMEOUT).until(lambda d: len(images(d)) == 4)
    width = pipe.denoiser.config.width * pipe.vqvae.config.downsample_factor
    assert images(browser) == [[width, width]] * 4
    assert browser.find_element(By.ID, "variation-status").text.startswith("Made 4 images")


def test_screenshot_is_committed():
    shot = Path(__file__).resolve().parents[1] / "docs" / "demo.png"
    assert shot.is_file() and shot.stat().st_size < 400_000
