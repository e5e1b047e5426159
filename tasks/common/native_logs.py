"""Third-party native log noise, filtered at the file-descriptor level.

MediaPipe's TFLite graphs write to fd 2 from C++ on the first ``process()`` of every FaceMesh / Pose / Hands /
FaceDetection instance ("Created TensorFlow Lite XNNPACK delegate", absl's "All log messages before
absl::InitializeLog()", and "Feedback manager requires a model with a single signature inference" once per
model) -- no environment variable turns them off, and a `make demo` creates hundreds of instances across its
worker processes. :func:`quiet_first_call` wraps an instance's ``process`` so that its first call runs with
fd 2 captured: the known noise lines are dropped (each logged once per process at DEBUG), anything else --
a real error from the native code, or another thread's output in that window -- is written back to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

NOISE = (
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^[WI]\d{4} [\d:. ]+\s+\d+ inference_feedback_manager\.cc:\d+\] Feedback manager requires a model"),
    re.compile(r"^[WI]\d{4} [\d:. ]+\s+\d+ gl_context\.cc:\d+\] "),
)
_lock = threading.Lock()  # fd 2 is process-wide: one capture at a time
_seen: set[int] = set()


def filter_noise(text: str) -> str:
    """``text`` without the known noise lines (each noted once per process at DEBUG)."""
    kept = []
    for line in text.splitlines(keepends=True):
        hit = next((i for i, p in enumerate(NOISE) if p.search(line.rstrip("\n"))), None)
        if hit is None:
            kept.append(line)
        elif hit not in _seen:
            _seen.add(hit)
            log.debug("native log (shown once, then dropped): %s", line.rstrip())
    return "".join(kept)


def call_quietly(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with fd 2 captured and filtered through :func:`filter_noise`."""
    with _lock, tempfile.TemporaryFile(mode="w+b") as tmp:
        with contextlib.suppress(AttributeError, ValueError):  # a closed or replaced sys.stderr
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            return fn(*args, **kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = filter_noise(tmp.read().decode("utf-8", "replace"))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def quiet_first_call(solution):
    """``solution`` (a MediaPipe solution) whose first ``process`` call has its native noise filtered; returned
    for chaining: ``mesh = quiet_first_call(FaceMesh(...))``."""
    original = solution.process
    state = {"first": True}

    def process(*args, **kwargs):
        if state["first"]:
            state["first"] = False
            return call_quietly(original, *args, **kwargs)
        return original(*args, **kwargs)

    solution.process = process
    return solution
