"""curate.sources with speakervid: SpeakerVid-5M clips fetched the way the dataset is distributed.

The dataset repo on the Hugging Face Hub (``curate.speakervid.repo``) holds no video: it has clip lists
(``all_data_list.json``, ``SFT_set.json``, ``testset.json``) and merged_anno annotation files (JSON records,
batched in .tar/.tar.gz archives). A clip's record gives the YouTube video, the interval and the person box.
So, for the first ``max_clips`` names of ``list_file``:

1. the list and the annotation files come through huggingface_hub (cached under ``download_dir``/hub; any
   endpoint: the Hub, a mirror, or a stand-in server);
2. the names are checked against SpeakerVid's pattern: a name that is not one (``../x``, shell text) never
   reaches a path or a command and becomes a failed row with the reason;
3. the clips are cut in shards of ``shard_size`` (the video2dataset way): per shard, each YouTube video is
   downloaded once with yt-dlp (retries with exponential backoff, a rate limit across all downloads), every
   clip of it is cut to its record's time span (``curate.speakervid.span``) and cropped to its box with ffmpeg, and the shard's
   per-sample status (ok / failed + error) is written to ``shards/NNNNN.parquet``. A shard whose status file
   matches its clips is skipped on a re-run; ids are the clip names, so they are the same on every run.

The cut clips then go through curation like any local clip.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError
from tqdm import tqdm

from tasks.config import SpeakerVidConfig
from tasks.corpus.speakervid import CLIP_RE, MergedAnno
from tasks.curation.sources import SourceClip, safe_id

log = logging.getLogger("streamavatar")
ANNO_SUFFIXES = (".json", ".tar", ".tar.gz", ".tgz")
# yt-dlp errors that another attempt will not fix
PERMANENT = ("HTTP Error 404", "HTTP Error 410", "HTTP Error 403", "Video unavailable", "Private video",
             "has been removed", "account associated with this video has been terminated",
             "Unsupported URL")  # fmt: skip
# runs: how many curate runs have tried the clip; permanent: its error will not change on a retry (PERMANENT, or a
# cut of a downloaded video that failed)
SHARD_COLUMNS = ["clip_id", "name", "ytid", "shard", "status", "error", "path", "attempts", "runs", "permanent"]


def _permanent(error: str) -> bool:
    return any(p in error for p in PERMANENT)


def _settled(row, limit: int) -> bool:
    """A status row that a later run leaves alone: ok, failed for good, or failed in ``limit`` runs already."""
    return row["status"] == "ok" or bool(row["permanent"]) or int(row["runs"]) >= limit


class SourceError(RuntimeError):
    """The dataset's lists or annotations could not be fetched or read (the message says which file)."""


# --------------------------------------------------------------------------------------------- the Hub side
class HubFiles:
    """The dataset repo's files through huggingface_hub, with retries; or, with ``local`` (curate.speakervid.
    repo_dir), the files of a local copy of the repo (``huggingface-cli download ... --local-dir``), no network."""

    def __init__(self, cfg: SpeakerVidConfig, cache_dir: Path, local: Path | None = None) -> None:
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.local = local
        if local is not None and not local.is_dir():
            raise SourceError(f"curate.speakervid.repo_dir: {local} is not a folder (a local copy of {cfg.repo})")

    def _retry(self, what: str, fn: Callable):
        for attempt in range(self.cfg.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 -- re-raised with the file named after the last attempt
                if attempt == self.cfg.retries or _is_missing(exc):
                    where = self.cfg.endpoint or "the Hugging Face Hub"
                    raise SourceError(f"{what} from dataset {self.cfg.repo} on {where}: "
                                      f"{type(exc).__name__}: {exc}") from None  # fmt: skip
                time.sleep(self.cfg.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def list(self) -> list[str]:
        """Every file path of the dataset repo at the revision: the Hub's tree API (what
        ``HfApi.list_repo_files`` reads), page by page. One request per page and attempt, so that ``retries``
        and ``backoff_s`` are the only retry policy: huggingface_hub's own listing retries each request 5
        times more (1 + 2 + 4 + 8 + 8 s), which made an unreachable endpoint with ``retries: 1`` cost 46 s."""
        if self.local is not None:
            return sorted(p.relative_to(self.local).as_posix() for p in self.local.rglob("*")
                          if p.is_file() and ".cache" not in p.relative_to(self.local).parts)  # fmt: skip
        from urllib.parse import quote

        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        endpoint = (self.cfg.endpoint or constants.ENDPOINT).rstrip("/")
        url = f"{endpoint}/api/datasets/{self.cfg.repo}/tree/{quote(self.cfg.revision, safe='')}"

        def pages() -> list[str]:
            files: list[str] = []
            page: str | None = url
            params: dict | None = {"recursive": True, "expand": False}
            while page is not None:
                r = http_backoff("GET", page, max_retries=0, params=params, headers=build_hf_headers(),
                                 timeout=self.cfg.timeout_s)  # fmt: skip
                hf_raise_for_status(r)
                files += [e["path"] for e in r.json() if e.get("type") == "file"]
                page, params = r.links.get("next", {}).get("url"), None  # the next link carries its query
            return files

        return self._retry("cannot list the files", pages)

    def fetch(self, filename: str) -> Path:
        if self.local is not None:
            path = (self.local / filename).resolve()
            if not path.is_file() or not path.is_relative_to(self.local.resolve()):
                raise SourceError(f"{filename} is not in curate.speakervid.repo_dir {self.local}")
            return path
        from huggingface_hub import hf_hub_download

        return Path(self._retry(
            f"cannot download {filename}",
            lambda: hf_hub_download(self.cfg.repo, filename, repo_type="dataset", revision=self.cfg.revision,
                                    endpoint=self.cfg.endpoint, cache_dir=str(self.cache_dir)),
        ))  # fmt: skip


def _is_missing(exc: Exception) -> bool:
    return type(exc).__name__ in ("EntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
                                  "RemoteEntryNotFoundError")  # fmt: skip


def _clip_stem(name: str) -> str:
    """A list entry's clip name: SpeakerVid's lists name the clips' annotation files (``<clip>.json``)."""
    name = name.strip()
    return name[: -len(".json")] if name.lower().endswith(".json") else name


def read_list(path: Path, label: str) -> list[str]:
    """Clip names, in file order, from a list file: a JSON object of lists of clip names (``all_data_list.json``:
    each YouTube video's clips; the keys are not clip names and are not read as such), a JSON object keyed by
    clip name (records as values), a JSON list of names or of records with a name field, or one name per line.
    A name may end in ``.json`` (the clip's annotation file). Any other shape is refused, naming it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [_clip_stem(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        values = list(data.values())
        if values and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in values):
            return [_clip_stem(n) for v in values for n in v]  # {video: [clip, ...]}: the clips
        strays = [str(k) for k in data if not CLIP_RE.match(_clip_stem(str(k)))]
        if strays:
            raise SourceError(f"{label}: a JSON object whose keys are not SpeakerVid clip names ({', '.join(strays[:3])}"
                              f"{' ...' if len(strays) > 3 else ''}) and whose values are not lists of clip names; "
                              "expected {video: [clip names]}, an object keyed by clip name, a list of clip names or "
                              "of records")  # fmt: skip
        return [_clip_stem(str(k)) for k in data]
    if isinstance(data, list):
        names = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                names.append(_clip_stem(item))
            elif isinstance(item, dict):
                key = next((k for k in ("video_name", "clip_name", "name", "id") if k in item), None)
                if key is None:
                    raise SourceError(f"{label}: entry {i} has none of video_name, clip_name, name, id")
                names.append(_clip_stem(str(item[key])))
            else:
                raise SourceError(f"{label}: entry {i} is a {type(item).__name__}, expected a name or a record")
        return names
    raise SourceError(f"{label}: expected a JSON list or object of clip names")


# ------------------------------------------------------------------------------------------------ the clips
@dataclass(frozen=True)
class RemoteClip:
    name: str  # the SpeakerVid clip name (validated: it is also the clip id)
    ytid: str
    start_s: float
    end_s: float
    bbox: tuple[float, float, float, float]
    width: int  # size of the cut clip (the record's clip_video_width/height)
    height: int


def invalid_id(name: str) -> str:
    """A deterministic, safe id for a list entry that is not a SpeakerVid clip name."""
    digest = hashlib.sha1(name.encode("utf-8", "replace")).hexdigest()[:8]
    try:
        readable = safe_id(name)[:40]
    except ValueError:
        readable = "entry"
    return f"invalid-{readable}-{digest}"


def _sync_confidence(sync, person: int | None):
    """The record's SyncNet confidence as one number: a number as it is, a list of numbers by its mean, and
    SpeakerVid's per-person map ``{person: [[conf, dist, offset], ...]}`` (one triple per speech interval, the
    person being the clip name's last number) by the mean confidence of the clip's own person. None: the field
    has another shape (or the map no entry for the person), so it cannot be judged."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(sync):
        return float(sync)
    if isinstance(sync, list) and sync and all(number(v) for v in sync):
        return sum(sync) / len(sync)
    if isinstance(sync, dict) and person is not None:
        rows = sync.get(str(person), sync.get(person))
        if isinstance(rows, list) and rows and all(isinstance(r, list) and r and number(r[0]) for r in rows):
            return sum(float(r[0]) for r in rows) / len(rows)
    return None


def quality_rejection(record: dict, cfg: SpeakerVidConfig, person: int | None = None) -> str | None:
    """Why the record's quality fields fail curate.speakervid's filters (None: kept, or no filter set).
    ``person``: the clip's person number (its name's last part), which picks its entry of a per-person sync."""
    field = "curate.speakervid"
    if cfg.min_sync is not None:
        sync = _sync_confidence(record.get("sync"), person)
        if sync is None:
            return (f"sync {record.get('sync')!r} is not a number, a list of numbers or a per-person map with an "
                    f"entry for person {person}: {field}.min_sync cannot judge it")  # fmt: skip
        if sync < cfg.min_sync:
            return f"sync {sync:.3g} < {field}.min_sync {cfg.min_sync:g}"
    for key in ("conf", "clear", "dover"):
        limit = getattr(cfg, f"min_{key}")
        if limit is None:
            continue
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{key} {value!r} is not a number: {field}.min_{key} cannot judge it"
        if value < limit:
            return f"{key} {value:.3g} < {field}.min_{key} {limit:g}"
    if cfg.require_clear and not record.get("clear"):
        return f"clear is {record.get('clear')!r} ({field}.require_clear)"
    return None


def remote_clip(name: str, record: dict, span: str = "track") -> RemoteClip:
    """The clip to cut: its YouTube video, its time span (``MergedAnno.span``: ValueError naming the fields when
    the record has none for ``span``), its person box and the size to crop to."""
    anno = MergedAnno.model_validate(record)
    start, end, _ = anno.span(span)
    m = CLIP_RE.match(name)
    assert m is not None
    return RemoteClip(name, m["ytid"], start, end, tuple(float(v) for v in anno.bbox),
                      int(anno.clip_video_width), int(anno.clip_video_height))  # fmt: skip


def find_records(hub: HubFiles, files: list[str], wanted: set[str], anno_dir: Path, prefix: str) -> dict[str, dict]:
    """merged_anno records for the wanted clip names: per-clip JSON files, or members of JSON/tar archives.
    Records found are kept under ``anno_dir`` (named by the validated clip name), so a re-run reads them
    there. Archive member paths are never used as paths: only the member's base name is matched."""
    anno_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, dict] = {}
    for name in wanted:
        cached = anno_dir / f"{name}.json"
        if cached.is_file():
            found[name] = json.loads(cached.read_text())
    missing = wanted - set(found)
    candidates = sorted(f for f in files if f.startswith(prefix) and f.lower().endswith(ANNO_SUFFIXES))
    direct = {Path(f).name[: -len(".json")]: f for f in candidates if f.lower().endswith(".json")}
    for name in sorted(missing & set(direct)):
        found.update(_records_in_json(hub.fetch(direct[name]).read_bytes(), name, {name}))
    archives = [f for f in candidates if not f.lower().endswith(".json")]
    # clip -> archive index (anno_dir/archive_index.json): every archive read once lists the clip-named records
    # it holds, so later runs fetch only the archives that hold the clips they miss; an archive with records in
    # files not named like a clip ("batched") may hold any clip and is still read when a clip is missing
    index_file = anno_dir / "archive_index.json"
    try:
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    except json.JSONDecodeError:
        index = {}  # a torn index: rebuilt as archives are read

    def rank(archive: str) -> int:  # 0: the index says it holds a missing clip; 1: not read yet; 2: batched
        entry = index.get(archive)
        if entry is None:
            return 1
        return 0 if (wanted - set(found)) & set(entry["clips"]) else 2 if entry["batched"] else 3

    todo = sorted((a for a in archives if rank(a) < 3), key=rank)
    for archive in tqdm(todo, desc="speakervid: annotation archives", unit="archive", leave=False,
                        disable=not todo or not (wanted - set(found))):  # fmt: skip
        missing = wanted - set(found)
        if not missing:
            break
        if rank(archive) == 3:
            continue  # indexed since the order was made: holds none of the clips still missing
        path = hub.fetch(archive)
        names, batched = set(), False
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if not member.isfile() or not base.endswith(".json"):
                        continue
                    stem = base[: -len(".json")]
                    if CLIP_RE.match(stem):
                        names.add(stem)
                        if stem not in missing:
                            continue  # another clip's record
                    else:
                        batched = True  # a file not named like a clip may batch records
                    data = tar.extractfile(member)
                    if data is not None:
                        found.update(_records_in_json(data.read(), stem, missing))
        except tarfile.TarError as exc:
            raise SourceError(f"{archive}: not a readable tar archive ({exc})") from None
        index[archive] = {"clips": sorted(names), "batched": batched}
        _atomic_write(index_file, json.dumps(index).encode())
    for name in set(found) & wanted:
        target = anno_dir / f"{name}.json"
        if not target.is_file():
            _atomic_write(target, json.dumps(found[name], indent=1).encode())
    return {k: v for k, v in found.items() if k in wanted}


def _records_in_json(blob: bytes, stem: str, wanted: set[str]) -> dict[str, dict]:
    """One record (named by the file stem or its video_name), a list of records, or an object of records."""
    try:
        data = json.loads(blob)
    except json.JSONDecodeError:
        return {}
    if isinstance(data, dict) and "bbox" in data:
        items = [(str(data.get("video_name", stem)), data), (stem, data)]
    elif isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(str(r.get("video_name", "")), r) for r in data if isinstance(r, dict)]
    else:
        items = []
    return {name: rec for name, rec in items if name in wanted and isinstance(rec, dict)}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ downloads
class RateLimiter:
    """At most ``per_minute`` starts per minute, spaced evenly; shared by the download threads."""

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        if start > now:
            time.sleep(start - now)


class _QuietLog:
    """yt-dlp's logger: its progress and info lines are dropped; errors reach the raised exception and debug."""

    def debug(self, msg: str) -> None:
        return None

    info = warning = debug

    def error(self, msg: str) -> None:
        log.debug(msg)


def download_video(url: str, dest_dir: Path, stem: str, cfg: SpeakerVidConfig, limiter: RateLimiter,
                   section: tuple[float, float] | None = None) -> tuple[Path, int]:  # fmt: skip
    """yt-dlp ``url`` to ``dest_dir``/``stem``.<ext>; returns (path, attempts). ``section`` (start, end) in
    seconds: only that time range is downloaded (yt-dlp's download ranges through ffmpeg, cut on exact frames,
    so the file's time 0 is ``start``). Transient errors are retried with exponential backoff; errors in
    PERMANENT are not. Raises RuntimeError with yt-dlp's message."""
    import yt_dlp

    for done in dest_dir.glob(f"{stem}.*"):
        if done.suffix in (".mp4", ".mkv", ".webm") and ".part" not in done.name and done.stat().st_size > 0:
            return done, 0
    opts = {
        "outtmpl": str(dest_dir / f"{stem}.%(ext)s").replace("%", "%%").replace("%%(ext)s", "%(ext)s"),
        "format": cfg.ytdlp_format, "merge_output_format": "mp4", "noplaylist": True, "quiet": True,
        "no_warnings": True, "noprogress": True, "logger": _QuietLog(), "retries": 0, "fragment_retries": 0,
        "extractor_retries": 0, "socket_timeout": cfg.timeout_s, "overwrites": True,
    }  # fmt: skip
    if cfg.cookies_file:
        opts["cookiefile"] = cfg.cookies_file
    if section is not None:
        from yt_dlp.utils import download_range_func

        from tasks.common.media import ffmpeg_exe

        opts.update({"download_ranges": download_range_func(None, [section]), "force_keyframes_at_cuts": True,
                     "ffmpeg_location": ffmpeg_exe()})  # fmt: skip
    error = ""
    for attempt in range(1, cfg.retries + 2):
        limiter.wait()
        try:
            with yt_dlp.YoutubeDL(opts) as ydl:
                info = ydl.extract_info(url, download=True)
                path = Path((info.get("requested_downloads") or [{}])[0].get("filepath") or ydl.prepare_filename(info))
            if path.is_file():
                return path, attempt
            error = f"yt-dlp reported success but wrote no file at {path}"
        except Exception as exc:  # noqa: BLE001 -- yt-dlp raises DownloadError and others
            error = str(exc).replace("ERROR: ", "").strip()
            if _permanent(error):
                raise RuntimeError(f"download failed (not retried): {error}") from None
        if attempt <= cfg.retries:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
    raise RuntimeError(f"download failed after {cfg.retries + 1} attempts: {error}")


VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov")


def local_raw_video(raw_dir: Path | None, ytid: str) -> Path | None:
    """A raw video already on disk for ``ytid`` in ``raw_dir`` (curate.speakervid.raw_video_dir): named
    ``{ytid}.<ext>`` or, as SpeakerVid's own cutting script expects, ``{ytid}_{W}x{H}.<ext>``."""
    if raw_dir is None:
        return None
    for ext in VIDEO_EXTS:
        for path in [raw_dir / f"{ytid}{ext}", *sorted(raw_dir.glob(f"{ytid}_*x*{ext}"))]:
            if path.is_file() and path.stat().st_size > 0:
                return path
    return None


def run_shard(index: int, clips: list[RemoteClip], cfg: SpeakerVidConfig, base: Path, limiter: RateLimiter,
              previous: pd.DataFrame | None = None, raw_dir: Path | None = None) -> pd.DataFrame:  # fmt: skip
    """Download and cut one shard's clips; every clip gets a status row, whatever happens to the others.
    ``previous``: the shard's status from an earlier run; its settled rows (``_settled``) are kept as they are,
    its other failed rows are tried again. ``raw_dir``: raw videos already on disk (``local_raw_video``) are
    cut from there, never downloaded nor deleted."""
    from tasks.common.media import probe
    from tasks.curation.normalize import cut_clip

    download_dir, clip_dir = base / "videos", base / "clips"
    download_dir.mkdir(parents=True, exist_ok=True)
    before = {} if previous is None else {r["clip_id"]: r for r in previous.to_dict("records")}
    rows = []
    by_video: dict[str, list[RemoteClip]] = {}
    for clip in clips:
        by_video.setdefault(clip.ytid, []).append(clip)
    parts = []  # (ytid, the section downloaded or None for the whole video, its clips)
    on_disk = {ytid: local_raw_video(raw_dir, ytid) for ytid in by_video}  # looked up once per video
    for ytid, group in by_video.items():
        if on_disk[ytid] is not None:
            parts.append((ytid, None, group))
        elif cfg.download_sections:
            parts += [(ytid, (s, e), cs) for s, e, cs in sections(group, cfg.section_margin_s, cfg.section_gap_s)]
        else:
            parts.append((ytid, None, group))
    for ytid, section, group in parts:
        kept = {c.name: before[c.name] for c in group
                if c.name in before and before[c.name]["status"] != "ok" and _settled(before[c.name], cfg.retry_runs)}
        pending = [c for c in group if not (clip_dir / f"{c.name}.mp4").is_file() and c.name not in kept]
        raw, attempts, error = None, 0, ""
        offset = section[0] if section else 0.0
        stem = f"{ytid}_{round(section[0] * 1000)}-{round(section[1] * 1000)}ms" if section else ytid
        local = on_disk[ytid]
        if pending:
            try:
                if local is not None:
                    raw = local
                else:
                    raw, attempts = download_video(cfg.video_url.format(ytid=ytid), download_dir, stem, cfg, limiter,
                                                   section)  # fmt: skip
                info = probe(raw)
            except Exception as exc:  # noqa: BLE001 -- recorded per sample
                error = str(exc)
        for clip in group:
            if clip.name in kept:  # failed for good, or in retry_runs runs: not tried again
                rows.append({**kept[clip.name], "shard": index})
                continue
            dst = clip_dir / f"{clip.name}.mp4"
            status, err, permanent = "ok", "", False
            runs = int(before[clip.name]["runs"]) if clip.name in before else 0
            if not dst.is_file():
                runs += 1
                if error:
                    status, err, permanent = "failed", error, _permanent(error)
                else:
                    try:
                        cut_clip(raw, dst, info, clip.start_s - offset, clip.end_s - offset, clip.bbox, clip.width,
                                 clip.height)  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 -- the video is here: cutting it again would fail again
                        status, err, permanent = "failed", str(exc), True
            rows.append({"clip_id": clip.name, "name": clip.name, "ytid": ytid, "shard": index, "status": status,
                         "error": err, "path": str(dst) if status == "ok" else "", "attempts": attempts,
                         "runs": max(runs, 1), "permanent": permanent})  # fmt: skip
        if raw is not None and local is None and not cfg.keep_raw_videos:
            raw.unlink(missing_ok=True)
    table = pd.DataFrame(rows, columns=SHARD_COLUMNS)
    out = base / "shards" / f"{index:05d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    _atomic_write(out, buf.getvalue())
    return table


def sections(clips: list[RemoteClip], margin: float, gap: float) -> list[tuple[float, float, list[RemoteClip]]]:
    """The time ranges to download for one video's clips: each clip's [start - margin, end + margin), ranges
    less than ``gap`` seconds apart merged (one download serves both); in time order, with their clips."""
    out: list[tuple[float, float, list[RemoteClip]]] = []
    for clip in sorted(clips, key=lambda c: c.start_s):
        start, end = max(0.0, clip.start_s - margin), clip.end_s + margin
        if out and start - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], end), [*out[-1][2], clip])
        else:
            out.append((start, end, [clip]))
    return out


def make_shards(clips: list[RemoteClip], size: int) -> list[list[RemoteClip]]:
    """Shards of about ``size`` clips in list order; all clips of one video land in the same shard, so each
    video is downloaded once and no two shards touch the same raw file."""
    by_video: dict[str, list[RemoteClip]] = {}
    for clip in clips:
        by_video.setdefault(clip.ytid, []).append(clip)
    shards: list[list[RemoteClip]] = [[]]
    for group in by_video.values():
        if shards[-1] and len(shards[-1]) + len(group) > size:
            shards.append([])
        shards[-1].extend(group)
    return [s for s in shards if s]


def _shard_status(path: Path, clips: list[RemoteClip]) -> pd.DataFrame | None:
    """The shard's status file from an earlier run, when it is about these clips (else None: redo it)."""
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 -- a torn status file: redo the shard
        return None
    if list(table["clip_id"]) != [c.name for c in clips]:
        return None  # the list or max_clips changed: this shard now holds other clips
    if "runs" not in table:  # written before retries across runs: each row has had one run
        table["runs"] = 1
        table["permanent"] = [_permanent(str(e)) for e in table["error"]]
    return table


def _shard_done(table: pd.DataFrame | None, limit: int) -> bool:
    """Nothing left to do in the shard: every clip ok (its file still there) or settled as failed."""
    if table is None:
        return False
    ok = table[table["status"] == "ok"]
    if not all(Path(p).is_file() for p in ok["path"]):
        return False  # a cut clip vanished
    return all(_settled(r, limit) for r in table.to_dict("records"))


def speakervid_clips(cfg: SpeakerVidConfig, root: Path, workers: int = 2, progress: bool = True) -> list[SourceClip]:
    """Fetch (or reuse) the first ``max_clips`` clips of the list; one SourceClip per list entry, failed ones
    carrying their error."""
    base = Path(cfg.download_dir)
    base = (base if base.is_absolute() else root / base).resolve()
    def under_root(path: str | None) -> Path | None:
        return None if path is None else (Path(path) if Path(path).is_absolute() else root / path).resolve()

    raw_dir = under_root(cfg.raw_video_dir)
    if raw_dir is not None and not raw_dir.is_dir():
        raise SourceError(f"curate.speakervid.raw_video_dir: {raw_dir} is not a folder")
    hub = HubFiles(cfg, base / "hub", under_root(cfg.repo_dir))
    files = hub.list()
    if cfg.list_file not in files:
        lists = [f for f in files if f.endswith(".json") and "/" not in f]
        raise SourceError(f"curate.speakervid.list_file: {cfg.list_file!r} is not in {cfg.repo} "
                          f"(top-level lists there: {', '.join(lists) or 'none'})")  # fmt: skip
    names = read_list(hub.fetch(cfg.list_file), cfg.list_file)
    names = names[: cfg.max_clips] if cfg.max_clips else names

    out: dict[str, SourceClip] = {}
    valid: list[str] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        if CLIP_RE.match(name):
            valid.append(name)
        else:
            cid = invalid_id(name)
            out[cid] = SourceClip(cid, "", "invalid", error=f"{cfg.list_file}: entry {name!r} is not a SpeakerVid "
                                  "clip name ({ytid}_{W}x{H}_full_video_{scene}_{A|B|None}_{person}); not fetched")  # fmt: skip
    records = find_records(hub, files, set(valid), base / "anno", cfg.anno_prefix)
    remote: list[RemoteClip] = []
    for name in valid:
        m = CLIP_RE.match(name)
        if name not in records:
            out[name] = SourceClip(name, "", m["ytid"], error=f"no merged_anno record for {name} under {cfg.anno_prefix}")
            continue
        try:
            clip = remote_clip(name, records[name], cfg.span)
            why = quality_rejection(records[name], cfg, int(m["person"]))
            if why:
                out[name] = SourceClip(name, "", m["ytid"], rejected=why)
            else:
                remote.append(clip)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            out[name] = SourceClip(name, "", m["ytid"], error=f"merged_anno record of {name}: {field}: {first['msg']}")
        except ValueError as exc:  # no time fields for curate.speakervid.span
            out[name] = SourceClip(name, "", m["ytid"], error=f"merged_anno record of {name}: {exc} "
                                   "(curate.speakervid.span)")  # fmt: skip

    shards = make_shards(remote, cfg.shard_size)
    limiter = RateLimiter(cfg.rate_limit_per_min)
    tables: dict[int, pd.DataFrame] = {}
    previous: dict[int, pd.DataFrame | None] = {}
    todo = []
    for i, shard in enumerate(shards):
        previous[i] = _shard_status(base / "shards" / f"{i:05d}.parquet", shard)
        if _shard_done(previous[i], cfg.retry_runs):
            tables[i] = previous[i]
        else:
            todo.append(i)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool, \
            tqdm(total=len(todo), desc="speakervid: shards", unit="shard", disable=not progress) as bar:  # fmt: skip
        futures = {i: pool.submit(run_shard, i, shards[i], cfg, base, limiter, previous[i], raw_dir) for i in todo}
        for i, fut in futures.items():
            tables[i] = fut.result()
            bar.update()
    skipped = len(shards) - len(todo)
    if skipped:
        log.info("speakervid: %d of %d shards already finished, skipped", skipped, len(shards))
    retried = sum(int(previous[i] is not None) for i in todo)
    if retried:
        log.info("speakervid: %d shards with failed downloads tried again (curate.speakervid.retry_runs %d)",
                 retried, cfg.retry_runs)  # fmt: skip
    for i in sorted(tables):
        for row in tables[i].itertuples():
            ok = row.status == "ok"
            out[row.clip_id] = SourceClip(row.clip_id, row.path if ok else "", row.ytid,
                                          error=None if ok else f"download: {row.error}")  # fmt: skip
    order = [invalid_id(n) if not CLIP_RE.match(n) else n for n in dict.fromkeys(names)]
    return [out[cid] for cid in order if cid in out]
