"""Headless Chromium for the browser tests, driven through the DevTools protocol.

Debian's `chromium` (`.ci/run` installs it where it is missing). The page's own
DOM and images are read by evaluating JavaScript in it (`Runtime.evaluate`), and
screenshots are taken with `Page.captureScreenshot`.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# As root, with no sandbox; without the background-networking flags Chromium keeps trying hosts it can't reach.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--remote-allow-origins=*", "--window-size=1400,1000",
)


def open_browser() -> "Browser":
    """A `Browser`; the test is skipped where there is no chromium, and fails instead under SWEEP_REQUIRE_BROWSER
    (set by `.ci/run`, which installs it)."""
    import pytest

    if chromium_path() is None:
        if os.environ.get("SWEEP_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH, and SWEEP_REQUIRE_BROWSER is set (.ci/run installs it)")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    return Browser()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where a browser test writes its screenshot: SWEEP_SCREENSHOT_DIR when set (CI keeps them), else tmp_path."""
    return Path(os.environ.get("SWEEP_SCREENSHOT_DIR") or tmp_path) / name


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one page; `with Browser() as b: b.open(url); b.evaluate("document.title")`."""

    def __init__(self, timeout_s: float = 60):
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        import websocket

        path = chromium_path()
        if path is None:
            raise RuntimeError("no chromium on PATH (.ci/run installs Debian's chromium)")
        self._profile = tempfile.mkdtemp(prefix="sweep-chromium-")
        self._process = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=self.timeout_s,
                                               suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        return self

    def __exit__(self, *exc) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, **params) -> dict:
        """Sends one DevTools command and returns its result (events that arrive meanwhile are dropped)."""
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        """Navigates to `url` and waits until the document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float | None = None):
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (seconds or self.timeout_s)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {seconds or self.timeout_s}s for {expression!r}")
            time.sleep(0.2)

    def text(self) -> str:
        """The page's rendered text."""
        return self.evaluate("document.body ? document.body.innerText : ''")

    def screenshot(self, path: str | os.PathLike) -> Path:
        """A PNG of the whole page."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
