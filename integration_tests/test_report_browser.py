"""The HTML report in a real browser: headless Chromium (Debian's package) opens report.html.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so the test needs no browser
download, no driver and no network port. The page must load with no console errors, its ROC
images and extraction grids must be decoded (naturalWidth > 0) and visible on screen, and a
full-page screenshot is saved as test-artifacts/report.png.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed"),
]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
]


class DevTools:
    """A minimal Chrome DevTools Protocol client over Chromium's debugging pipe."""

    def __init__(self, user_data_dir: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:  # in the child: the protocol lives on fds 3 (commands) and 4 (replies)
            # Copy both ends above 10 first: the pipes may themselves sit on 3 or 4, and dup2 onto
            # the same number would keep close-on-exec.
            r, w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire_pipes,
            close_fds=False,  # fds 3/4 made by dup2 must survive exec; Python's own fds are close-on-exec
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read_message(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


IMAGES_JS = """
(() => [...document.images].map(img => {
  img.scrollIntoView({block: "center", inline: "center"});
  const r = img.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return {cls: img.className, alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
          naturalHeight: img.naturalHeight, width: r.width, height: r.height, onTop: hit === img,
          visibility: getComputedStyle(img).visibility, display: getComputedStyle(img).display};
}))()
"""


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from report_data import build_run_result
    finally:
        sys.path.remove(str(REPO / "tests"))
    from s2l_plugin.report.writers import write_reports

    run = tmp_path_factory.mktemp("run")
    write_reports(build_run_result(run), run, ["html"])
    return run / "report.html", json.loads((run / "result.json").read_text())


def test_report_opens_in_chromium_without_errors_with_visible_plots_and_grids(report_html, tmp_path):
    html, data = report_html
    browser = DevTools(tmp_path / "profile")  # a new, empty profile
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": html.as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        images = browser.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True}, session=session)["result"]["value"]
        height = browser.send(
            "Runtime.evaluate", {"expression": "document.documentElement.scrollHeight", "returnByValue": True}, session=session
        )["result"]["value"]
        browser.send(
            "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        # Let late messages (a console error after load) arrive before judging.
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)
    finally:
        browser.close()

    ARTIFACTS.mkdir(exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "report.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 50_000

    errors = [
        e["params"]
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert not errors, f"console errors: {errors}"

    attacks = {x["attack"] for a in data["audits"] for x in a["membership"]["attacks"]}
    rocs = [i for i in images if i["cls"] == "roc"]
    grids = [i for i in images if i["cls"] == "grid"]
    assert len(rocs) == 2 * len(attacks) and len(grids) == len(data["audits"])
    for img in rocs + grids:
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, f"not decoded: {img['alt']}"
        assert img["width"] > 100 and img["height"] > 50, f"not shown at a readable size: {img}"
        assert img["visibility"] == "visible" and img["display"] != "none" and img["onTop"], f"hidden: {img}"
