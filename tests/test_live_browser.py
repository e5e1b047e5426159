"""The live page in a real browser: Debian's chromium, headless, driven by Playwright (no browser download),
with a fake microphone playing a real recorded voice; WebRTC to a real `streamavatar live` process on
loopback. Plus the WebRTC signalling's refusals over plain HTTP.

.ci/run installs chromium with apt when it is missing; outside CI the browser test is skipped without it.
"""

from __future__ import annotations

import base64
import os
import shutil
import time

import httpx
import numpy as np
import pytest

from tasks.common.media import read_audio, write_wav
from tests.test_live import FIXTURES, SR, Server, portrait, wait_idle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    s = Server(tmp_path_factory.mktemp("live-web"), "--max-sessions", "1")
    yield s
    s.stop()


def browser_or_skip():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it with apt")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


FRAME_STATS = """() => {
  const v = document.getElementById('avatar'); const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight; if (!c.width) return {w: 0};
  const g = c.getContext('2d'); g.drawImage(v, 0, 0); const d = g.getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0; for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; }
  const n = d.length / 4;
  return {w: c.width, h: c.height, mean: s / n, std: Math.sqrt(Math.max(0, s2 / n - (s / n) ** 2)),
          sum: Array.from(d).reduce((a, b) => a + b, 0), t: v.currentTime, paused: v.paused};
}"""


def test_the_page_streams_the_avatar_over_webrtc_with_a_fake_microphone(server, tmp_path):
    sync_playwright = browser_or_skip()
    mic = tmp_path / "user.wav"
    write_wav(mic, read_audio(FIXTURES / "kitchen_grandmother.wav", SR, duration=6.0), SR)
    voice = tmp_path / "avatar.wav"
    write_wav(voice, read_audio(FIXTURES / "fashion_blogger.wav", SR, duration=6.0), SR)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required", "--no-sandbox"])  # fmt: skip
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.set_input_files("#portrait", str(FIXTURES / "fashion_blogger.jpg"))
            page.set_input_files("#voice", str(voice))
            page.click("#start")
            page.wait_for_function("() => window.streamavatar && window.streamavatar.stats.chunks >= 8", timeout=60_000)
            first = page.evaluate(FRAME_STATS)
            time.sleep(1.0)
            later = page.evaluate(FRAME_STATS)
            readout = page.text_content("#readout")
            status = page.text_content("#status")
            stats = page.evaluate("() => window.streamavatar.stats")
            page.screenshot(path=str(tmp_path / "page.png"))
            assert server.health()["sessions"] == 1
            busy = _offer(server, sdp="v=0", type="offer", reference="x")  # live.max_sessions is 1 here
            assert busy.status_code == 503 and busy.json()["type"] == "busy", busy.text
            page.click("#stop")
        finally:
            browser.close()
    assert not errors, errors
    assert "error" not in status, status
    assert (first["w"], first["h"]) == (64, 64) and not first["paused"], first
    assert 5 < first["mean"] < 250 and first["std"] > 0.5, first  # a picture, not a black or blank element
    assert later["t"] > first["t"] and later["sum"] != first["sum"], (first, later)  # it plays and changes
    assert "ms" in readout.splitlines()[0] and float(readout.splitlines()[1].split()[1]) > 15, readout  # latency, fps
    assert stats["talking"] > 0, stats  # the avatar's own voice reached the server: talking frames
    assert stats["talking"] < stats["frames"], stats  # and the microphone alone: listening frames
    assert wait_idle(server, 30)["sessions"] == 0  # the session ends when the page stops


def _offer(server: Server, **body) -> httpx.Response:
    return httpx.post(server.url + "/webrtc/offer", json=body, timeout=60)


def test_webrtc_signalling_refuses_bad_offers_with_the_same_codes(server):
    import cv2

    gray = cv2.imencode(".png", np.full((200, 200, 3), 128, np.uint8))[1].tobytes()
    url = "data:image/png;base64," + base64.b64encode(gray).decode()
    r = _offer(server, sdp="v=0", type="answer")
    assert r.status_code == 400 and r.json()["code"] == "bad_offer"
    r = _offer(server, sdp="v=0", type="offer")
    assert r.status_code == 400 and r.json()["code"] == "expected_reference"
    r = _offer(server, sdp="v=0", type="offer", reference=url)
    assert r.status_code == 400 and r.json()["code"] == "no_face", r.json()
    r = _offer(server, sdp="v=0", type="offer", reference=base64.b64encode(os.urandom(3000)).decode())
    assert r.status_code == 400 and r.json()["code"] == "bad_image"
    r = httpx.post(server.url + "/webrtc/offer", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "bad_json"
    assert portrait()  # the fixture exists: the refusals above are about the input, not a missing file
    assert wait_idle(server)["sessions"] == 0
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "RTCPeerConnection" in page.text
