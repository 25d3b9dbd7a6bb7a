"""`inspector console` as a subprocess, and Debian's headless Chromium driven by Selenium (tests/inspector/console,
benchmarks/console.py).

Nothing is downloaded: Selenium gets /usr/bin/chromium and /usr/bin/chromedriver and Selenium Manager is
kept offline; `headless_chromium` raises `BrowserUnavailable` (with the fix) when either is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from inspector.broker import free_port
from tests.helpers.http import http_get

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1480,1000")
CONSOLE_COMMAND = (sys.executable, "-m", "inspector.console")


class BrowserUnavailable(Exception):
    pass


def headless_chromium(profile_dir: Path) -> Any:
    """A Selenium Chrome driver on a fresh profile, logging the page's console (`driver.get_log("browser")`)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not Path(chromedriver).exists():
        raise BrowserUnavailable("chromium / chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        raise BrowserUnavailable("selenium not installed (pip install -e '.[dev]')") from None
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)


class ConsoleProcess:
    """`inspector console` in a child process with the given flags, JSON logs in a file; `url` once it answers.
    INSPECTOR_* variables of this process are not passed on, so only the flags configure it."""

    def __init__(self, workdir: Path, flags: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "console.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")} | {"PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [*CONSOLE_COMMAND, "--http-port", str(self.port), "--log-format", "json", *flags], env=env,
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def state(self) -> dict[str, Any] | None:
        status, _, body = http_get(self.url + "api/state")
        return orjson.loads(body) if status == 200 else None

    def wait_joined(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until the console's group has its partitions, so it sees every event produced from now on."""
        deadline = time.monotonic() + timeout_s
        while (state := self.state()) is None or not state["kafka"]["partitions"]:
            assert self.popen.poll() is None, "the console exited:\n" + self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the console did not join its group:\n" + self.log_path.read_text()
            time.sleep(0.1)
        return state

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and the exit code."""
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise
