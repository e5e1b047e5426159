"""Third-party native log noise, filtered at the file-descriptor level.

MediaPipe's TFLite graphs write to fd 2 from C++ threads: "Created TensorFlow Lite XNNPACK delegate", absl's "All
log messages before absl::InitializeLog()", "Feedback manager requires a model with a single signature
inference" once per model, and "Using NORM_RECT without IMAGE_DIMENSIONS" when tracking starts. No environment
variable turns them off; they come from the graph's own threads (after the constructor returns, or when a
landmark model first runs, which can be any later frame), and a `make demo` creates hundreds of instances
across its worker processes.

:func:`filter_native_logs` (called before a solution is built) puts a pipe on fd 2 for the rest of the process:
a reader thread passes every byte on to the real stderr at once, except whole lines matching a known noise
pattern. Python's own stderr, tqdm bars (partial lines, passed on as
they come), ffmpeg children and real native errors all get through; at exit the pipe is drained and fd 2
restored. faulthandler is pointed at the real stderr so a crash's traceback never waits on the reader.
``STREAMAVATAR_NATIVE_LOGS=all`` turns the filter off (everything as MediaPipe writes it).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import re
import threading

NOISE = (
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^[WI]\d{4} [\d:. ]+\s+\d+ inference_feedback_manager\.cc:\d+\] Feedback manager requires a model"),
    re.compile(r"^[WI]\d{4} [\d:. ]+\s+\d+ gl_context\.cc:\d+\] "),
    re.compile(r"^[WI]\d{4} [\d:. ]+\s+\d+ landmark_projection_calculator\.cc:\d+\] Using NORM_RECT without "),
)
# a partial line that may still become a noise line is held until its newline; anything else passes at once
_HELD = re.compile(rb"^(I(N(F(O(:.*)?)?)?)?|W(A(R(N(I(N(G(:.*)?)?)?)?)?)?)?|[WI]\d{0,4}( .*)?)$", re.S)
_state: dict = {"pid": None}
_lock = threading.Lock()


def is_noise(line: str) -> bool:
    """Whether ``line`` (no newline) is a known noise line. (Nothing is logged from here: the reader thread
    that calls it must never write to the fd it drains.)"""
    return any(p.search(line) for p in NOISE)


def filter_noise(text: str) -> str:
    """``text`` without the known noise lines."""
    return "".join(x for x in text.splitlines(keepends=True) if not is_noise(x.rstrip("\n")))


def _pump(read_fd: int, out_fd: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        data = pending + chunk
        try:
            *lines, pending = data.split(b"\n")
            kept = [x + b"\n" for x in lines if not is_noise(x.decode("utf-8", "replace"))]
            if pending and not _HELD.match(pending):
                kept.append(pending)
                pending = b""
        except Exception:  # never let the reader die: a process writing to a pipe nobody reads would hang
            kept, pending = [data], b""
        if kept:
            _write_all(out_fd, b"".join(kept))
    if pending and not is_noise(pending.decode("utf-8", "replace")):
        _write_all(out_fd, pending)
    os.close(read_fd)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:  # the real stderr is gone (a closed terminal): nothing left to show it to
            return


def filter_native_logs() -> bool:
    """Filter this process's fd 2 from now on (idempotent per process; a forked child installs its own).
    Returns whether the filter is on."""
    if os.environ.get("STREAMAVATAR_NATIVE_LOGS", "").lower() == "all":
        return False
    with _lock:
        if _state["pid"] == os.getpid() and _is_ours():
            return True  # (a test harness that swapped fd 2 since gets a filter of its own)
        import sys

        with contextlib.suppress(AttributeError, ValueError):  # a closed or replaced sys.stderr
            sys.stderr.flush()
        real = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        pipe = os.fstat(2)
        thread = threading.Thread(target=_pump, args=(read_fd, real), name="native-log-filter", daemon=True)
        thread.start()
        crash = os.fdopen(os.dup(real), "w")
        if faulthandler.is_enabled():
            faulthandler.enable(file=crash)
        _state.update(pid=os.getpid(), real=real, thread=thread, crash=crash, pipe=(pipe.st_dev, pipe.st_ino))
        atexit.register(_restore, os.getpid())
        return True


def _is_ours() -> bool:
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == _state.get("pipe")


def _restore(pid: int) -> None:
    """At exit: fd 2 back to the real stderr (the pipe's last writer here closes), the reader drains. Nothing
    is touched when fd 2 is no longer the filter's pipe (something else took it over since)."""
    if _state.get("pid") != pid or os.getpid() != pid or not _is_ours():
        return
    import sys

    with contextlib.suppress(AttributeError, ValueError):
        sys.stderr.flush()
    os.dup2(_state["real"], 2)
    _state["thread"].join(timeout=2.0)
    _state["pid"] = None

