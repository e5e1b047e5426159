"""MediaPipe's native noise is dropped at the file-descriptor level for the whole process; anything else --
Python's stderr, real native errors, progress bars' partial lines -- gets through, at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from tasks.common.native_logs import _pump, filter_noise
from tests.conftest import REPO, shared_path

NOISE = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
         b"W0000 00:00:1796315397.798174   19436 inference_feedback_manager.cc:114] Feedback manager requires a "
         b"model with a single signature inference. Disabling support for feedback tensors.\n")  # fmt: skip

CHILD = """
import os, sys, cv2, numpy as np
from tasks.common.native_logs import filter_native_logs
from tasks.evaluation.metrics import extract_keypoints
print("filter", filter_native_logs(), flush=True)
os.write(2, NOISE + b"E0000 something real went wrong\\n" + NOISE + b"\\rbar 50%")
sys.stderr.write("\\na Python warning\\n")
face = cv2.cvtColor(cv2.imread(sys.argv[1]), cv2.COLOR_BGR2RGB)
face = cv2.resize(face, (256, 256))
frames = np.stack([np.zeros_like(face)] * 2 + [face] * 4)  # the landmark models start on the third frame
for tracking in (False, True):  # video mode: the tracking calculators warn once a face is found
    kp = extract_keypoints(frames, tracking=tracking)
    assert np.isfinite(kp.face[2:]).all(), "no face found"
print("done", flush=True)
"""


def _child(env: dict) -> subprocess.CompletedProcess:
    photo = shared_path("fixtures", "portraits", "LivePortrait__s10.jpg")
    code = f"NOISE = {NOISE!r}\n" + CHILD
    return subprocess.run([sys.executable, "-c", code, str(photo)], cwd=REPO, env=env, capture_output=True,
                          timeout=300)  # fmt: skip


def test_mediapipe_noise_dropped_for_the_whole_process_and_the_rest_kept():
    """A real run: Pose, Hands and FaceMesh built and run (static and tracking) on a face after empty frames,
    in a child process whose stderr we read. Without the filter the same run prints the noise (so the scenario
    does produce it); with it, only the real lines remain, in order."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    raw = _child({**env, "STREAMAVATAR_NATIVE_LOGS": "all"})
    assert raw.returncode == 0, raw.stderr.decode()[-2000:]
    assert b"Feedback manager" in raw.stderr and b"XNNPACK" in raw.stderr and b"NORM_RECT" in raw.stderr

    out = _child(env)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["filter", "True", "done"]
    err = out.stderr.decode()
    assert "Feedback manager" not in err and "XNNPACK" not in err and "NORM_RECT" not in err and "absl" not in err, err
    assert err.startswith("E0000 something real went wrong\n\rbar 50%\na Python warning\n"), err


def test_partial_lines_pass_at_once_and_noise_lines_whole():
    """The reader forwards a progress bar's partial line before any newline comes, holds a line that may still
    become noise until its end, then drops it."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    reader = threading.Thread(target=_pump, args=(r_in, w_out), daemon=True)
    reader.start()

    def read_now() -> bytes:
        time.sleep(0.3)
        os.set_blocking(r_out, False)
        try:
            return os.read(r_out, 65536)
        except BlockingIOError:
            return b""

    os.write(w_in, b"\rteacher:  40%|####")
    assert read_now() == b"\rteacher:  40%|####"
    os.write(w_in, b"\nW0000 00:00:1796315397.798174   19436 inference_feedback")
    assert read_now() == b"\n"  # the start of a glog line waits for its end
    os.write(w_in, NOISE[NOISE.index(b"_manager"):] + b"W0000 real warning\n")
    assert read_now() == b"W0000 real warning\n"
    os.close(w_in)
    reader.join(timeout=5)
    assert not reader.is_alive()
    os.close(r_out)
    os.close(w_out)


def test_filter_noise_keeps_everything_else():
    text = (NOISE + b"E0000 something real went wrong\n" + NOISE).decode()
    assert filter_noise(text) == "E0000 something real went wrong\n"
