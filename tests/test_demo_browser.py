"""demo.html in a real browser: headless Chromium, driven over the DevTools protocol, paints through
the page's own controls (mouse events on the canvas, clicks on the buttons) and presses Generate.

The protocol is JSON over a websocket; the small client below (RFC 6455 handshake and frames) keeps
the test free of new dependencies. Set DEMO_SCREENSHOT=docs/demo.png to keep the README's screenshot.
"""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_demo import Running

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0"]


class DevTools:
    """One websocket to one page: send(method, **params) -> the result; events are skipped."""

    def __init__(self, ws_url):
        url = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        self.stream = self.sock.makefile("rb")
        assert b" 101 " in self.stream.readline(), "the browser refused the websocket"
        while self.stream.readline() not in (b"\r\n", b""):  # the rest of the handshake's headers
            pass
        self.last_id = 0

    def send(self, method, **params):
        self.last_id += 1
        payload = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        n, mask = len(payload), os.urandom(4)  # a client's frames are masked (RFC 6455, 5.3)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81]) + length + mask + masked)  # FIN + text frame
        while True:
            message = json.loads(self.receive())
            if message.get("id") == self.last_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def receive(self):
        data = b""
        while True:
            head = self.stream.read(2)
            n = head[1] & 0x7F
            if n >= 126:
                n = int.from_bytes(self.stream.read(2 if n == 126 else 8), "big")
            data += self.stream.read(n)
            if head[0] & 0x80:  # FIN: the message is complete
                return data.decode()

    def js(self, expression):
        """Evaluate in the page (awaiting a promise) and return the value."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        while not self.js(expression):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def mouse(self, kind, x, y, buttons=1):
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1)

    def click(self, selector):
        x, y = self.center(selector)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y, buttons=0)

    def center(self, selector):
        """The middle of an element in page coordinates, scrolled into view if it is not."""
        return self.js(f"(e => {{ e.scrollIntoView({{block: 'nearest'}}); const r = e.getBoundingClientRect(); "
                       f"return [r.x + r.width / 2, r.y + r.height / 2]; }})(document.querySelector({json.dumps(selector)}))")

    def drag(self, points):
        """A stroke through page points, with the left button held down."""
        self.mouse("mousePressed", *points[0])
        for point in points[1:]:
            self.mouse("mouseMoved", *point)
        self.mouse("mouseReleased", *points[-1], buttons=0)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (profile / "DevToolsActivePort").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written in two lines
        if not (profile / "DevToolsActivePort").is_file():
            proc.kill()
            pytest.fail(f"chromium did not start: {proc.communicate()[1].decode()[-2000:]}")
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.send("Emulation.setDeviceMetricsOverride", width=1000, height=720, deviceScaleFactor=1, mobile=False)
        yield tools
    finally:
        proc.kill()
        proc.wait()


def test_paint_generate_and_see_pictures(browser, tmp_path):
    server = Running()  # the defaults of `python demo.py`: the shipped toy models
    try:
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait("document.querySelectorAll('.swatch').length === 10")
        # an empty canvas: the page says so, and nothing breaks
        browser.click("#generate")
        browser.wait("document.querySelector('#message').className === 'error'")
        assert "the canvas is empty" in browser.js("document.querySelector('#message').textContent")

        # an upload that is not a picture: the same
        (tmp_path / "notes.png").write_text("not a picture")
        document = browser.send("DOM.getDocument")["root"]["nodeId"]
        upload = browser.send("DOM.querySelector", nodeId=document, selector="#upload")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=upload, files=[str(tmp_path / "notes.png")])
        browser.wait("document.querySelector('#message').textContent.startsWith('notes.png: the picture cannot')")

        browser.click("#toy")  # a held-out scene as the starting point
        browser.wait("document.querySelector('#message').textContent.startsWith('held-out toy scene')")
        left, top = browser.js("(r => [r.x, r.y])(document.querySelector('#canvas').getBoundingClientRect())")
        to_page = lambda x, y: (left + 1 + 3 * x + 1, top + 1 + 3 * y + 1)  # canvas pixel -> page: a 1 px border,
        # then 384 px show 128, 3 px each
        pixel = "Array.from(document.querySelector('#canvas').getContext('2d').getImageData(%d, %d, 1, 1).data)"
        browser.click(".swatch:nth-child(9)")  # house
        assert browser.js("document.querySelector('#current').textContent") == "painting: house"
        browser.drag([to_page(20, 100), to_page(40, 100), to_page(60, 110)])
        browser.click(".swatch:nth-child(10)")  # road
        browser.drag([to_page(90, 127), to_page(50, 105)])  # ends on the house's stroke (the scene is random,
        # so only pixels painted here have a known color)
        assert browser.js(pixel % (30, 100)) == [192, 0, 0, 255]  # house, painted at the canvas's pixels
        assert browser.js(pixel % (50, 105)) == [64, 128, 0, 255]  # road over house
        browser.click("#undo")  # takes the road back, keeps the house
        assert browser.js(pixel % (50, 105)) == [192, 0, 0, 255]
        assert browser.js(pixel % (30, 100)) == [192, 0, 0, 255]

        start = time.time()
        browser.click("#generate")
        stages = set()
        while not browser.js("document.querySelectorAll('#results img').length === 2"):
            stages.add(browser.js("document.querySelector('#stage').textContent").split(":")[0])
            assert time.time() - start < 120, browser.js("document.querySelector('#message').textContent")
            time.sleep(0.05)
        browser.wait("Array.from(document.querySelectorAll('#results img')).every(i => i.complete)")
        assert browser.js("Array.from(document.querySelectorAll('#results img'), i => i.naturalWidth)") == [32, 64]
        assert browser.js("document.querySelector('#results a').download").startswith("nanopiti_seed0_0")
        assert "1 picture(s) in" in browser.js("document.querySelector('#message').textContent")
        assert "base model" in stages  # the progress bar ran over the steps

        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        picture = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
        assert picture.shape == (720, 1000, 3)
        (tmp_path / "demo.png").write_bytes(shot)
        if os.environ.get("DEMO_SCREENSHOT"):
            Path(os.environ["DEMO_SCREENSHOT"]).write_bytes(shot)
        print(f"time to the pictures in the browser: {time.time() - start:.1f} s")
    finally:
        server.close()
