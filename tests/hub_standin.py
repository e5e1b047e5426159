"""A stand-in for the two remote services curate.source=speakervid talks to, served on 127.0.0.1:

* the Hugging Face Hub's file API for one dataset repo (a local folder laid out like the repo): the tree
  listing huggingface_hub's list_repo_files reads, and the resolve URLs hf_hub_download HEADs and GETs;
* plain video files under /videos/ (what yt-dlp's generic extractor downloads in place of YouTube).

``fail_first[path] = n`` answers 503 to the first n requests of a path (a transient outage); ``hits``
counts requests per path, ``sent`` the body bytes sent per path. Video files honour HTTP Range requests (206
Partial Content), as YouTube's media servers do, so a time-range download can fetch part of a video. The production code talks to it unchanged, through curate.speakervid.endpoint and
curate.speakervid.video_url.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, repo_id: str, repo_dir: Path, videos_dir: Path) -> None:
        self.repo_id, self.repo_dir, self.videos_dir = repo_id, Path(repo_dir), Path(videos_dir)
        self.hits: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.fail_first: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, code: int, data: bytes, headers: dict | None = None, body: bool = True) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    path = unquote(urlparse(self.path).path)
                    for at in range(0, len(data), 1 << 16):  # counted as written: a reader may stop early
                        try:
                            self.wfile.write(data[at : at + (1 << 16)])
                            self.wfile.flush()
                        except (BrokenPipeError, ConnectionResetError):  # (ffmpeg seeking elsewhere)
                            break
                        with hub.lock:
                            hub.sent[path] += len(data[at : at + (1 << 16)])

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                with hub.lock:
                    hub.hits[path] += 1
                    failing = hub.fail_first.get(path, 0) >= hub.hits[path]
                if failing:
                    return self._send(503, b"try again later", body=body)
                tree = f"/api/datasets/{hub.repo_id}/tree/"
                resolve = f"/datasets/{hub.repo_id}/resolve/"
                if path.startswith(tree):
                    files = sorted(p for p in hub.repo_dir.rglob("*") if p.is_file())
                    listing = [{"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                                "size": p.stat().st_size, "path": p.relative_to(hub.repo_dir).as_posix()}
                               for p in files]  # fmt: skip
                    return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
                if path.startswith(resolve):
                    rel = path[len(resolve) :].split("/", 1)[-1]  # drop the revision
                    return self._file(hub.repo_dir, rel, body, hub_headers=True)
                if path.startswith("/videos/"):
                    return self._file(hub.videos_dir, path[len("/videos/") :], body, hub_headers=False)
                return self._send(404, b"not found", body=body)

            def _file(self, base: Path, rel: str, body: bool, hub_headers: bool) -> None:
                target = (base / rel).resolve()
                if base.resolve() not in target.parents or not target.is_file():
                    headers = {"X-Error-Code": "EntryNotFound"} if hub_headers else {}
                    return self._send(404, b"Entry not found", headers, body)
                data = target.read_bytes()
                headers = {"Content-Type": "video/mp4" if target.suffix == ".mp4" else "application/octet-stream"}
                if hub_headers:
                    headers.update({"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
                else:
                    headers["Accept-Ranges"] = "bytes"
                    wanted = self.headers.get("Range", "")
                    if wanted.startswith("bytes=") and "," not in wanted:
                        first, _, last = wanted[len("bytes="):].partition("-")
                        start = int(first) if first else max(0, len(data) - int(last))
                        end = min(int(last), len(data) - 1) if first and last else len(data) - 1
                        if start >= len(data):
                            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
                        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                        return self._send(206, data[start:end + 1], headers, body)
                self._send(200, data, headers, body)

        return Handler
