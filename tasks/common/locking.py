"""One writer at a time: the lock a pipeline run (Prefect, `streamavatar pipeline`, or a stage under
`dvc repro`) holds while it writes data/; the re-evaluation takes the same lock (it reads what a pipeline
writes, and appends to its history).

An OS file lock (flock through `filelock`): the kernel drops it when the holder dies, so a killed run never
leaves a stale lock behind. Who holds it (pid, host, what, since when) is written beside it, so a refused run
can say whom it waited for. Within one process the lock is re-entrant (the full-pipeline flow holds it and its
stages take it again)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.config import ConfigError

_LOCKS: dict[str, FileLock] = {}
_GUARD = threading.Lock()


class Busy(ConfigError):
    """Another run holds the lock; the message names it. A ConfigError, so the CLI prints it and exits 2."""


def lock_path(root: Path, name: str = "pipeline") -> Path:
    return Path(root).resolve() / "data" / f".{name}.lock"


def _info_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")  # data/.pipeline.lock.json


def _lock(path: Path) -> FileLock:
    with _GUARD:
        key = str(path)
        if key not in _LOCKS:
            # thread_local=False: the flow and its task threads in one process share the re-entrant count
            _LOCKS[key] = FileLock(key, thread_local=False)
        return _LOCKS[key]


def holder(path: Path) -> dict:
    """What the lock's holder wrote about itself ({} when nothing is known)."""
    info = _info_path(path)
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"{info.get('what', 'a run')} (pid {info.get('pid')} on {info.get('host')}, since {since})"


@contextlib.contextmanager
def hold(root: Path, what: str, timeout_s: float = 0.0, name: str = "pipeline") -> Iterator[Path]:
    """Hold the project's ``name`` lock for the block, or raise Busy naming the holder.

    ``what`` says who we are (e.g. "flow run full-pipeline/demo 3f2a..."); ``timeout_s`` how long to wait
    for another holder first (0: refuse at once)."""
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    outermost = not lock.is_locked
    try:
        lock.acquire(timeout=timeout_s if timeout_s > 0 else 0, poll_interval=0.5)
    except Timeout:
        waited = f" after waiting {timeout_s:g} s" if timeout_s > 0 else ""
        raise Busy(
            f"{path} is held by {describe(holder(path))}{waited}: another run is writing "
            f"{path.parent}. Let it finish (or stop it) and run again; nothing was changed. "
            f"(orchestration.lock_timeout_s makes a run wait instead of refusing.)"
        ) from None
    try:
        if outermost:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}
            tmp = path.with_name(path.name + ".json.partial")
            tmp.write_text(json.dumps(info))
            tmp.replace(_info_path(path))
        yield path
    finally:
        lock.release()
