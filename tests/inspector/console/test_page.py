"""The page in a real browser: broker, `inspector run --locate` and `inspector console` as processes, the page
opened before any frame exists, then a few dozen frames replayed while it watches.

The screenshots (the whole page, beyond the window) go to the test's temporary directory, or to
CONSOLE_SCREENSHOT_DIR when it is set: scripts/console_screenshot.py makes docs/img/console.png from them.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.helpers import NEU_CLS
from tests.helpers.harness import InspectorProcess
from tests.helpers.http import http_get
from tests.helpers.streams import Frame, create_topics, encoded_frame, produce, service_settings

pytestmark = pytest.mark.kafka

HOSTILE_CAMERA = "<img src=x onerror=alert(1)>"
HOSTILE_FRAME = "<script>alert(2)</script>"
PER_CLASS = 5
WAIT_S = 90
TOTALS_JS = "return document.getElementById('totals').textContent"


def frame_images(tmp_path: Path) -> list[Path]:
    """PER_CLASS images of each class: NEU-CLS when it is there, else the demo's synthesized textures."""
    root = NEU_CLS
    if not root.is_dir():
        from inspector.demo import synthesize_frames

        root = synthesize_frames(tmp_path / "frames", per_class=PER_CLASS)
    return [path for folder in sorted(p for p in root.iterdir() if p.is_dir())
            for path in sorted(folder.iterdir())[:PER_CLASS]]


def line_frames(images: list[Path]) -> list[Frame]:
    """Two cameras along one coil, a hostile camera id and frame id, and one frame that is not an image."""
    frames = []
    for i, path in enumerate(images):
        camera = HOSTILE_CAMERA if i % 10 == 3 else f"cam-{1 + i % 2}"
        frame_id = HOSTILE_FRAME if i == 5 else f"{path.parent.name}/{path.name}"
        encoding = "png" if path.suffix == ".png" else "jpeg"
        frames.append(encoded_frame(frame_id, path.read_bytes(), encoding, camera_id=camera,
                                    coil_id="C-1042" if i < 20 else "C-1043", strip_offset_m=round(4.2 * i, 1)))
    return frames + [encoded_frame("broken.png", b"not a png", "png", camera_id="cam-1")]


def script(driver, js: str):
    return driver.execute_script(js)


def cards(driver) -> list[dict]:
    """What each card on the wall shows, read from the DOM."""
    return script(driver, """return [...document.querySelectorAll('#wall .card')].map(c => ({
        id: c.dataset.eventId, camera: c.querySelector('.camera').textContent,
        frame: c.querySelector('.frame').textContent, label: c.querySelector('.label').textContent,
        loaded: c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0,
        boxes: c.querySelectorAll('svg rect.box').length}))""")


def wait(driver, check, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: check(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; the wall has {len(cards(driver))} cards, the figures "
                             f"say {script(driver, TOTALS_JS)}; "
                             f"the browser logged {driver.get_log('browser')}") from None


def alive(inspector: InspectorProcess) -> bool:
    assert inspector.alive(), "inspector run exited:\n" + inspector.log_path.read_text(errors="replace")[-3000:]
    return True


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    menu = lambda d: Select(d.find_element(By.ID, select_id))  # noqa: E731 - options follow the figures' refresh
    wait(driver, lambda d: value in [o.get_attribute("value") for o in menu(d).options], f"{value!r} in #{select_id}")
    menu(driver).select_by_value(value)


def test_the_page_shows_the_line_live(kafka_broker, new_topic, tmp_path, browser, console_process) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    frames_topic = new_topic(partitions=2)
    settings = service_settings(kafka_broker, frames_topic, None, locate=True, max_batch=8)
    create_topics(kafka_broker, {settings.output_topic: 2, settings.dead_letter_topic: 1})
    inspector = InspectorProcess(settings, tmp_path / "inspector").start()
    try:
        console = console_process("--bootstrap-servers", kafka_broker, "--topic", settings.output_topic,
                                  "--dead-letter-topic", settings.dead_letter_topic, "--max-cards-per-s", "1000",
                                  "--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500")
        console.wait_joined()
        asyncio.run(inspector.wait_for_log("inspector_started", timeout_s=WAIT_S))  # latencies then measure the line
        browser.get(console.url)
        wait(browser, lambda d: d.find_element(By.ID, "link").get_attribute("data-state") == "connected",
             "the page to show Kafka connected")
        assert cards(browser) == []  # no frame exists yet

        frames = line_frames(frame_images(tmp_path))
        asyncio.run(produce(kafka_broker, frames_topic, frames))
        expected = len(frames) - 1  # the broken one becomes a dead letter
        wait(browser, lambda d: alive(inspector) and len(cards(d)) == expected and all(c["loaded"] for c in cards(d)),
             f"{expected} cards with their pictures, without a reload")
        shown = cards(browser)
        assert len({c["id"] for c in shown}) == expected

        # boxes: each card draws exactly the boxes its event carries, and --locate gave some
        events = {c["id"]: orjson.loads(http_get(console.url + f"api/event?id={c['id']}")[2]) for c in shown}
        assert {c["id"]: c["boxes"] for c in shown} == {i: len(e["boxes"] or []) for i, e in events.items()}
        assert sum(c["boxes"] for c in shown) > 0

        # hostile ids are text, not markup
        assert sorted(c["camera"] for c in shown if c["camera"].startswith("<")) == [HOSTILE_CAMERA] * 3
        assert [c["frame"] for c in shown if c["frame"].startswith("<")] == [HOSTILE_FRAME]
        assert script(browser, "return document.querySelectorAll('img[src=\"x\"], #wall script').length") == 0
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - reading it is the check

        # figures beside the wall
        wait(browser, lambda d: "undecodable" in d.find_element(By.ID, "dead").text, "the dead letter by reason")
        wait(browser, lambda d: script(d, "return document.querySelectorAll('#coil-map circle').length") > 0,
             "the coil map")
        assert browser.find_element(By.ID, "rates-legend").text

        # the detail view: every probability, the frame at full size
        browser.find_elements(By.CSS_SELECTOR, "#wall .card")[0].click()
        wait(browser, lambda d: d.find_element(By.ID, "detail").get_attribute("open") is not None
             and script(d, "const i = document.querySelector('#detail img'); return i.complete && i.naturalWidth > 0"),
             "the detail dialog")
        first = events[shown[0]["id"]]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#detail-probs tr")) == len(first["probabilities"])
        save(browser, tmp_path, "console-detail.png")
        browser.find_element(By.CSS_SELECTOR, "#detail .close").click()

        # filters
        choose(browser, "filter-camera", HOSTILE_CAMERA)
        wait(browser, lambda d: [c["camera"] for c in cards(d)] == [HOSTILE_CAMERA] * 3, "the camera filter")
        choose(browser, "filter-camera", "")
        label, count = Counter(c["label"] for c in shown).most_common(1)[0]
        choose(browser, "filter-label", label)
        wait(browser, lambda d: [c["label"] for c in cards(d)] == [label] * count, "the class filter")
        choose(browser, "filter-label", "")
        choose(browser, "filter-status", "defect")
        defects = sum(e["status"] == "defect" for e in events.values())
        wait(browser, lambda d: len(cards(d)) == defects and all(events[c["id"]]["status"] == "defect"
                                                                  for c in cards(d)), "the status filter")
        choose(browser, "filter-status", "")
        wait(browser, lambda d: len(cards(d)) == expected and all(c["loaded"] for c in cards(d)), "all cards again")
        save(browser, tmp_path, "console.png")

        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        inspector.terminate(timeout_s=60)


def save(driver, tmp_path: Path, name: str) -> None:
    """A PNG of the whole page: the viewport made as tall as the page for the capture (Chromium DevTools)."""
    folder = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = script(driver, "return [window.innerWidth, document.documentElement.scrollHeight]")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    (folder / name).write_bytes(base64.b64decode(shot["data"]))
