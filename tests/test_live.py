"""`streamavatar live`: the session server as a real process on loopback, driven by the real client and by raw
WebSocket connections that misbehave, plus the protocol's and the session's parts on their own.

The server runs the seeded untrained student (--checkpoint random) with a random autoencoder
(vae.pretrained_path=null) of the default demo profile in an empty project root, so nothing needs `make demo`;
the real avatar fixtures in ../shared (portraits and recorded voices) are the inputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from live.client import run_client
from live.protocol import (
    AVATAR,
    REFERENCE,
    USER,
    AudioFormat,
    LinearResampler,
    ProtocolError,
    pack,
    pack_chunk,
    unpack,
    unpack_chunk,
)
from live.session import Outbox, OutChunk
from tasks.common.media import probe, read_audio, read_frames, write_wav
from tests.conftest import REPO, shared_path, tool_env

FIXTURES = REPO.parent / "shared" / "fixtures" / "avatars"
SR = 16000
IDLE_S = 3.0


def portrait() -> bytes:
    return shared_path("fixtures", "avatars", "fashion_blogger.jpg").read_bytes()


def voice(name: str, seconds: float) -> np.ndarray:
    return read_audio(FIXTURES / f"{name}.wav", SR, duration=seconds)


# ------------------------------------------------------------------------------------------------ the server
class Server:
    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        ready = root / "ready.json"
        self.log = open(root / "server.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "flows.cli", "live", "--checkpoint", "random", "--port", "0", "--ready-file",
               str(ready), "--set", "vae.pretrained_path=null", "--set", "project.device=cpu",
               "--set", f"live.idle_timeout_s={IDLE_S}", "--set", "live.start_timeout_s=5", *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=tool_env(root), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while not ready.is_file():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"the live server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(0.3)  # the ready file is written just before uvicorn accepts
        self.url = json.loads(ready.read_text())["url"]
        self.ws = self.url.replace("http", "ws", 1) + "/ws"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("live")
    s = Server(root, "--max-sessions", "2", "--set", "live.send_buffer_bytes=16384")
    yield s
    s.stop()


def start(ws, image: bytes, **fmt) -> dict:
    ws.send(json.dumps({"type": "start", **fmt}))
    ws.send(pack(REFERENCE, image))
    return json.loads(ws.recv(timeout=60))


def error_of(ws) -> dict:
    """The session's last text message before the server closed it."""
    last = None
    try:
        while True:
            msg = ws.recv(timeout=30)
            if isinstance(msg, str):
                last = json.loads(msg)
    except ConnectionClosed:
        pass
    return last


def wait_idle(server: Server, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        h = server.health()
        if h["sessions"] == 0 or time.time() > deadline:
            return h
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ end to end
def test_a_two_voice_session_talks_then_listens_and_records_the_right_duration(server, tmp_path):
    """10 s: the avatar's own voice for 5 s, then the user's for 5 s, paced in real time by the client."""
    image = portrait()
    talk, listen = voice("fashion_blogger", 5.0), voice("kitchen_grandmother", 5.0)
    avatar = np.concatenate([talk, np.zeros(5 * SR, np.float32)])
    user = np.concatenate([np.zeros(5 * SR, np.float32), listen])
    write_wav(tmp_path / "avatar.wav", avatar, SR)
    write_wav(tmp_path / "user.wav", user, SR)
    (tmp_path / "me.jpg").write_bytes(image)
    out = tmp_path / "session.mp4"
    s = run_client(server.url, tmp_path / "me.jpg", tmp_path / "avatar.wav", out, listen_to=tmp_path / "user.wav")
    assert s["frames"] == 250 and s["dropped_frames"] == 0, s
    info = probe(out)
    assert abs(info.duration_s - 10.0) < 0.1 and info.fps == 25 and info.audio_codec is not None, info
    assert len(read_frames(out)) == 250
    talking = np.array(s["talking"])
    assert talking[:125].mean() > 0.6, talking[:125]  # the avatar's voice: talking frames
    # the user's voice only: listening frames (Silero's decision trails the voice by up to two frames, 80 ms)
    assert talking[127:].mean() == 0.0 and talking[125:127].sum() <= 2
    assert 9.5 < s["sent_s"] < 14, s["sent_s"]  # paced at the audio rate, not faster
    assert s["latency_ms_p95"] < 1500, s  # the target at the demo size (untrained student)
    m = server.metrics()
    assert "streamavatar_live_chunks_total" in m and 'quantile="0.95"' in m
    assert wait_idle(server)["sessions"] == 0
    session_log = server.root / "data" / "logs" / "live" / f"{s['session']}.log"  # one log file per session
    assert "done: 21 chunks, 252 frames, 0 dropped" in session_log.read_text(), session_log.read_text()


def test_intents_pick_actions_that_start_at_the_next_chunk_and_run_their_length(server):
    """{"type": "intent"}: the rule reasoner's action comes back at once, the next generated chunk is conditioned
    on it (the chunk header's action and state) for the configured chunks, then idle again; {"type": "action"}
    requests one directly; a bad one is a clear error."""
    image = portrait()
    spc = None
    headers: list[dict] = []
    with connect(server.ws, max_size=None) as ws:
        ready = start(ws, image)
        spc = ready["samples_per_chunk"]
        silence = np.zeros(spc, "<i2").tobytes()

        def chunk() -> dict:
            ws.send(pack(AVATAR, silence))
            ws.send(pack(USER, silence))
            while True:
                msg = ws.recv(timeout=60)
                if isinstance(msg, bytes):
                    return unpack_chunk(msg)[0]

        headers.append(chunk())
        ws.send(json.dumps({"type": "intent", "text": "Could you look to the left?"}))
        answer = json.loads(ws.recv(timeout=30))
        assert answer == {"type": "intent", "action": "turn_left", "speak": True, "reason": "rule turn_left"}
        headers += [chunk() for _ in range(4)]
        ws.send(json.dumps({"type": "action", "name": "smile"}))
        headers += [chunk() for _ in range(4)]
        ws.send(json.dumps({"type": "action", "name": "dance"}))
        err = error_of(ws)
    # corpus.action_s (1.0, 1.6) s -> 1.3 s = 3 chunks of 12 frames at 25 fps
    assert [h["action"] for h in headers] == ["idle", "turn_left", "turn_left", "turn_left", "idle",
                                              "smile", "smile", "smile", "idle"]  # fmt: skip
    assert [h["state"] for h in headers][1:4] == ["reacting"] * 3 and headers[4]["state"] == "idle"
    assert err["type"] == "error" and err["code"] == "bad_action" and "dance" in err["message"], err
    assert wait_idle(server)["sessions"] == 0


def test_audio_at_another_rate_and_stereo_is_resampled(server):
    """44.1 kHz stereo float PCM for 2 s of speech: the frames cover 2 s at 25 fps, and the voice detector hears
    the speech through the resampling."""
    image = portrait()
    rate = 44100
    speech16 = voice("fashion_blogger", 2.0)
    t = np.arange(2 * rate) / rate
    speech = np.interp(t, np.arange(speech16.size) / SR, speech16).astype("<f4")  # 16 kHz -> 44.1 kHz
    stereo = np.stack([speech, speech], 1).reshape(-1)
    with connect(server.ws, max_size=None) as ws:
        ready = start(ws, image, sample_rate=rate, channels=2, format="f32le")
        assert ready["type"] == "ready", ready
        for i in range(0, stereo.size, 4410 * 2):
            ws.send(pack(AVATAR, stereo[i : i + 4410 * 2].tobytes()))
        ws.send(json.dumps({"type": "end"}))
        frames, talking = 0, []
        while True:
            msg = ws.recv(timeout=60)
            if isinstance(msg, str):
                done = json.loads(msg)
                break
            header, jpegs, pcm = unpack_chunk(msg)
            frames += len(jpegs)
            talking += header["talking"]
            assert len(pcm) == 2 * header["audio_samples"] == 2 * SR // 25 * len(jpegs)
            assert cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    assert done["type"] == "done" and done["frames"] == frames
    assert 50 <= frames < 50 + ready["chunk_frames"], frames  # 2 s = 50 frames, the last chunk padded
    assert np.mean(talking[:50]) > 0.6  # speech: talking (the same 2 s at 16 kHz: 0.72 of the frames)


@pytest.mark.parametrize("case, expected", [
    ("garbage first message", "expected_start"),
    ("start not json", "bad_json"),
    ("bad sample rate", "bad_sample_rate"),
    ("garbage image", "bad_image"),
    ("no face", "no_face"),
    ("image over max_image_bytes", "image_too_large"),
    ("truncated pcm", "truncated_pcm"),
    ("unknown kind", "unknown_kind"),
    ("idle", "timeout"),
])  # fmt: skip
def test_bad_input_gets_a_clear_error_on_that_session_only(server, case, expected):
    image = portrait()
    gray = cv2.imencode(".png", np.full((200, 200, 3), 128, np.uint8))[1].tobytes()
    with connect(server.ws, max_size=None) as ws:
        if case == "garbage first message":
            ws.send(b"\x00garbage")
        elif case == "start not json":
            ws.send("{start")
        elif case == "bad sample rate":
            ws.send(json.dumps({"type": "start", "sample_rate": 1234}))
        elif case == "garbage image":
            ws.send(json.dumps({"type": "start"}))
            ws.send(pack(REFERENCE, os.urandom(5000)))
        elif case == "no face":
            ws.send(json.dumps({"type": "start"}))
            ws.send(pack(REFERENCE, gray))
        elif case == "image over max_image_bytes":
            ws.send(json.dumps({"type": "start"}))
            ws.send(pack(REFERENCE, image + bytes(10_000_001)))
        else:
            assert start(ws, image)["type"] == "ready"
            if case == "truncated pcm":
                ws.send(pack(AVATAR, b"\x01\x02\x03"))
            elif case == "unknown kind":
                ws.send(b"\x7f" + bytes(640))
            # idle: send nothing
        err = error_of(ws)
    assert err is not None and err["type"] == "error" and err["code"] == expected, err
    assert err["message"]
    assert wait_idle(server)["sessions"] == 0


def test_an_image_beyond_the_message_limit_closes_with_1009(server):
    """A 50 MB image is refused by the WebSocket layer (live.max_message_bytes) before it is buffered."""
    with connect(server.ws, max_size=None) as ws:
        ws.send(json.dumps({"type": "start"}))
        with pytest.raises(ConnectionClosed) as info:
            ws.send(pack(REFERENCE, bytes(50_000_000)))
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert wait_idle(server)["sessions"] == 0


def test_a_misbehaving_session_and_a_vanishing_client_leave_the_other_session_streaming(server):
    """Two sessions at once: one well-behaved (3 s, paced), one that sends garbage; then a client that
    disappears mid-stream. The good one gets every frame; afterwards no session, thread or logger is left."""
    image = portrait()
    before = server.health()
    result = {}
    baseline_rss = before["rss_mib"]

    def good() -> None:
        s = asyncio.run(_paced(server.ws, image, voice("music_producer", 3.0)))
        result.update(s)

    t = threading.Thread(target=good)
    t.start()
    time.sleep(1.0)
    with connect(server.ws, max_size=None) as bad:
        assert start(bad, image)["type"] == "ready"
        bad.send(pack(AVATAR, b"\x01"))
        assert error_of(bad)["code"] == "truncated_pcm"
    gone = connect(server.ws, max_size=None)
    assert start(gone, image)["type"] == "ready"
    gone.send(pack(USER, bytes(3200)))
    gone.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the client just vanishes
    gone.socket.close()
    t.join(60)
    assert result.get("frames") == 75 and result.get("dropped") == 0, result
    after = wait_idle(server)
    assert after["sessions"] == 0
    deadline = time.time() + 10
    while server.health()["session_threads"] and time.time() < deadline:
        time.sleep(0.2)
    assert server.health()["session_threads"] == 0  # every session's worker thread has ended
    assert server.health()["rss_mib"] < baseline_rss + 150, (baseline_rss, server.health())  # nothing piles up
    m = server.metrics()
    assert 'streamavatar_live_session_errors_total{code="disconnected"}' in m
    assert 'streamavatar_live_session_errors_total{code="truncated_pcm"}' in m


async def _paced(url: str, image: bytes, avatar: np.ndarray) -> dict:
    from live.client import run_session

    r = await run_session(url, image, avatar, None)
    n = sum(min(h["frames"], 75 - h["first_frame"]) for h, _, _ in r["chunks"] if h["first_frame"] < 75)
    return {"frames": n, "dropped": r["done"]["dropped_frames"]}


def test_a_client_that_stops_reading_loses_the_oldest_frames_not_the_server(server):
    """The client reads nothing during a 10 s session: the server drops the oldest unsent chunks (counted, in
    "done" and /metrics) instead of buffering them (socket buffers and live.max_pending_chunks hold the
    rest), and the newest video still arrives."""
    from live.client import run_session

    r = asyncio.run(run_session(server.ws, portrait(), voice("music_producer", 10.0), None, stall_s=10.0,
                                receive_buffer=8192))  # fmt: skip
    got = sum(h["frames"] for h, _, _ in r["chunks"])
    dropped = r["done"]["dropped_frames"]
    assert dropped >= 24 and dropped % 12 == 0, r["done"]  # whole chunks, at least two
    assert got + dropped == r["done"]["frames"] + dropped == 252, (got, r["done"])  # 21 chunks made in all
    firsts = [h["first_frame"] for h, _, _ in r["chunks"]]
    assert firsts == sorted(firsts) and firsts[-1] == 240  # in order, and the last chunk always arrives
    assert wait_idle(server)["sessions"] == 0


def test_admission_control_answers_busy_beyond_max_sessions(server):
    image = portrait()
    a, b = connect(server.ws, max_size=None), connect(server.ws, max_size=None)
    try:
        assert start(a, image)["type"] == "ready" and start(b, image)["type"] == "ready"
        with connect(server.ws, max_size=None) as c:
            busy = json.loads(c.recv(timeout=30))
            assert busy["type"] == "busy" and "max_sessions" in busy["message"]
            with pytest.raises(ConnectionClosed) as info:
                c.recv(timeout=30)
            assert info.value.rcvd.code == 1013
    finally:
        a.close()
        b.close()
    wait_idle(server)
    with connect(server.ws, max_size=None) as d:  # a slot is free again
        assert start(d, image)["type"] == "ready"
    assert 'streamavatar_live_sessions_rejected_total{reason="busy"}' in server.metrics()


def test_a_public_bind_needs_a_token(tmp_path):
    env = tool_env(tmp_path)
    env.pop("STREAMAVATAR_LIVE_TOKEN", None)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "live", "--host", "0.0.0.0", "--checkpoint", "random"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "live.token" in out.stderr, out.stderr[-2000:]


def test_the_token_is_checked(tmp_path):
    s = Server(tmp_path, "--set", "live.token=s3cret")
    try:
        with pytest.raises(Exception) as info:  # rejected at the handshake (HTTP 403)
            connect(s.ws, max_size=None).recv(timeout=10)
        assert "403" in str(info.value)
        with connect(s.ws + "?token=s3cret", max_size=None) as ws:
            assert start(ws, portrait())["type"] == "ready"
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ the parts
def test_the_resampler_streams_like_the_whole_signal():
    rate = 44100
    x = np.sin(2 * np.pi * 300 * np.arange(rate) / rate).astype(np.float32)
    whole = LinearResampler(rate, SR)(x)
    r = LinearResampler(rate, SR)
    cuts = [0, 1, 7, 441, 1000, 20000, 33333, rate]
    pieces = np.concatenate([r(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    assert abs(whole.size - SR) <= 1 and pieces.size == whole.size
    np.testing.assert_allclose(pieces, whole, atol=1e-6)
    expected = np.sin(2 * np.pi * 300 * np.arange(whole.size) / SR)
    assert np.abs(whole - expected).max() < 0.01  # the same tone at the new rate


def test_pcm_decoding_and_message_framing():
    fmt = AudioFormat.from_start({"type": "start", "sample_rate": 22050, "channels": 2, "format": "s16le"})
    pcm = np.array([[16384, -16384], [32767, 32767]], "<i2").tobytes()
    np.testing.assert_allclose(fmt.decode(pcm), [0.0, 32767 / 32768])  # channels averaged
    with pytest.raises(ProtocolError) as e:
        fmt.decode(pcm[:-1])
    assert e.value.code == "truncated_pcm"
    for bad, code in [({"channels": 3}, "bad_channels"), ({"format": "mp3"}, "bad_format"),
                      ({"sample_rate": 96000}, "bad_sample_rate"), ({"sample_rate": "16000"}, "bad_sample_rate")]:  # fmt: skip
        with pytest.raises(ProtocolError) as e:
            AudioFormat.from_start(bad)
        assert e.value.code == code
    assert unpack(pack(USER, b"abc")) == (USER, b"abc")
    with pytest.raises(ProtocolError):
        unpack(b"")
    header, jpegs, audio = unpack_chunk(pack_chunk({"chunk": 3}, [b"a", b"bcd"], b"\x00\x01"))
    assert header["chunk"] == 3 and jpegs == [b"a", b"bcd"] and audio == b"\x00\x01"


def test_a_slow_reader_costs_frames_not_memory():
    """The outbox keeps at most max_pending chunks: the oldest unsent ones are dropped and counted."""

    async def run() -> tuple[list[int], list[int]]:
        dropped: list[int] = []
        box = Outbox(asyncio.get_running_loop(), 2, lambda c: dropped.append(c.index))
        for i in range(5):
            box.put_threadsafe(OutChunk(i, 12 * i, [b"x"] * 12, [0] * 12, b"", time.perf_counter()))
        box.put_threadsafe(None)
        await asyncio.sleep(0.05)
        got = []
        while (c := await box.get()) is not None:
            got.append(c.index)
        return got, dropped

    got, dropped = asyncio.run(run())
    assert got == [3, 4] and dropped == [0, 1, 2]


def test_auto_serves_the_registry_champion_else_the_last_trained_student(tmp_path):
    """live.checkpoint auto: the champion's file when the registry has one, else refine/distill final.pt, else a
    clear error; champion without one is an error; a missing path is an error."""
    from mlflow import MlflowClient

    from live.server import resolve_checkpoint
    from tasks.common import tracking
    from tasks.common.model_registry import CHAMPION, register_student
    from tasks.config import ConfigError
    from tests.training_data import tiny_config

    cfg = tiny_config(tmp_path)
    cfg.tracking.enabled = True
    with pytest.raises(ConfigError, match="make demo"):
        resolve_checkpoint(cfg, tmp_path)
    cfg.live.checkpoint = "champion"
    with pytest.raises(ConfigError, match="alias champion"):
        resolve_checkpoint(cfg, tmp_path)
    cfg.live.checkpoint = "nope.pt"
    with pytest.raises(ConfigError, match="no such file"):
        resolve_checkpoint(cfg, tmp_path)

    cfg.live.checkpoint = "auto"
    distill = tmp_path / cfg.train.checkpoint_dir / "distill" / "final.pt"
    distill.parent.mkdir(parents=True)
    distill.write_bytes(b"distilled student")
    assert resolve_checkpoint(cfg, tmp_path) == (str(distill), str(distill.relative_to(tmp_path)))

    champion = tmp_path / "champ.pt"
    champion.write_bytes(b"the champion's weights")
    with tracking.stage_run(cfg, tmp_path, "refine", {}):
        version = register_student(cfg, tmp_path, champion, stage="refine")["version"]
    tracking.setup(cfg, tmp_path)
    MlflowClient().set_registered_model_alias(cfg.registry.model_name, CHAMPION, version)
    for choice in ("auto", "champion"):
        cfg.live.checkpoint = choice
        path, label = resolve_checkpoint(cfg, tmp_path)
        assert Path(path).read_bytes() == b"the champion's weights" and "(champion)" in label, (path, label)


def test_the_client_refuses_an_output_it_could_not_write_before_connecting(tmp_path, capsys):
    """`live-client --out` naming a folder, or a path under a file, fails at once (exit 2, the path named), not
    after a whole session streamed in real time; nothing listens at the address, so a check made after
    connecting would fail with the connection instead."""
    from flows.cli import main as cli_main
    from tasks.common.media import MediaError

    folder = tmp_path / "session.mp4"
    folder.mkdir()
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder would go\n")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for out, said in ((folder, "is a folder"), (blocker / "o.mp4", "cannot create its folder")):
        with pytest.raises(MediaError, match=said):
            run_client(nobody, tmp_path / "me.jpg", tmp_path / "avatar.wav", out)
        args = ["live-client", "--server", nobody, "--reference", str(tmp_path / "me.jpg"), "--audio",
                str(tmp_path / "avatar.wav"), "--out", str(out)]  # fmt: skip
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert said in err and str(out) in err


def test_a_taken_port_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`streamavatar live --port N` where something already listens: exit 2 naming the address and how to pick
    another, no traceback. This project has no student, so a bind made after loading it would fail on that."""
    from flows.cli import main as cli_main

    monkeypatch.setenv("STREAMAVATAR_ROOT", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["live", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is already in use" in err and "--port" in err and "Traceback" not in err
    assert cli_main(["live", "--port", "0", "--set", "live.checkpoint=nothere.pt"]) == 2  # a free port: on to the model
    assert "live.checkpoint nothere.pt: no such file" in capsys.readouterr().err
