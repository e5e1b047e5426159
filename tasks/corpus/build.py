"""Stage `corpus`: the self-made demo corpus of two-person conversations, written like a SpeakerVid-5M download.

Layout under ``corpus.out_dir``::

    videos/{clip}.mp4          H.264 25 fps + 16 kHz mono AAC of the whole conversation (both voices)
    merged_anno/{clip}.json    a SpeakerVid merged_anno record
    gt/{clip}.json             ground truth only tests and evaluation read: per-frame speaking mask,
                               head yaw/pitch/roll, mouth opening, blink, gesture, both speech envelopes
    corpus.parquet             one row per clip (paths relative to the project root, status, reason)

Faces: the photos bundled with installed packages, every image in ``corpus.extra_faces_dirs`` (the shared
portraits and avatars; an absent folder is skipped with a logged reason) and the files in ``corpus.extra_faces``.
Each is screened once for a face (FaceMesh; the answer is cached by file digest): a photo without one is recorded
in the report's faces.json and left out. Side s of conversation i shows face (2i + s) mod F, so every usable
face is used once the corpus has F / 2 conversations, and the first ones twice beyond that.

A conversation is one unit of work: finished ones (their ground truth written last, with a fingerprint of the
settings and the two photos that shaped them) are skipped on re-run; a failing one is recorded with its reason
and the rest goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.common.media import write_video, write_wav
from tasks.common.parallel import map_jobs
from tasks.common.stage import StageResult
from tasks.config import Config, CorpusConfig, resolve_path
from tasks.corpus.speakervid import clip_name, synthetic_ytid

log = logging.getLogger(__name__)

CORPUS_VERSION = 2  # bump when the generator's output changes, so old conversations are regenerated
SIDES = ("A", "B")
MANIFEST_COLUMNS = [
    "clip_id", "conversation", "side", "partner_clip_id", "video_path", "anno_path", "gt_path", "identity",
    "photo", "voice", "num_frames", "fps", "duration_s", "width", "height", "speaking_ratio", "listening_ratio",
    "max_abs_yaw", "status", "reason",
]


@dataclass(frozen=True)
class PhotoSpec:
    """A face photo as the jobs receive it: loaded in the worker, named in the fingerprint by its content."""

    name: str
    path: str  # "" for a photo bundled with an installed package
    digest: str  # sha1 of the file (of the pixels for a bundled photo)


def fingerprint(cfg: CorpusConfig, index: int, photos: tuple[PhotoSpec, ...]) -> str:
    shaping = cfg.model_dump(mode="json", exclude={"out_dir", "report_dir", "workers", "num_conversations",
                                                   "extra_faces", "extra_faces_dirs"})  # fmt: skip
    blob = json.dumps({"v": CORPUS_VERSION, "i": index, "cfg": shaping,
                       "photos": [[p.name, p.digest] for p in photos]}, sort_keys=True)  # fmt: skip
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def side_photos(index: int, photos: list[PhotoSpec]) -> tuple[PhotoSpec, PhotoSpec]:
    """Conversation ``index``'s two faces: slots 2i and 2i + 1 of the face list, wrapping around."""
    return photos[(2 * index) % len(photos)], photos[(2 * index + 1) % len(photos)]


@dataclass(frozen=True)
class _Job:
    index: int
    cfg: dict
    out_dir: str
    root: str
    photos: tuple[PhotoSpec, PhotoSpec]


# ------------------------------------------------------------------------------------------------ the faces
@dataclass
class FaceList:
    usable: list[PhotoSpec]
    without_face: list[dict]  # {"name", "path", "reason"}
    missing_dirs: list[str]
    candidates: int


def _digest_file(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def face_photos(c: CorpusConfig, root: Path, cache_path: Path | None = None) -> FaceList:
    """The usable face photos, in a fixed order: bundled, then each of ``extra_faces_dirs`` (sorted by name),
    then ``extra_faces``. A missing or unreadable ``extra_faces`` file raises FaceError (a configuration error);
    an absent folder is skipped with a logged reason; a photo with no face is recorded and left out."""
    from tasks.corpus.faces import BUNDLED, bundled_photo, folder_photos, load_photo

    explicit = []
    for path in c.extra_faces:  # a missing or unreadable photo is a configuration error: stop before any work
        p = resolve_path(path, root)
        load_photo(p)
        explicit.append(p)
    files: list[Path] = []
    missing = []
    for folder in c.extra_faces_dirs:
        d = resolve_path(folder, root)
        if not d.is_dir():
            log.warning("corpus.extra_faces_dirs: %s is absent (%s): skipped, the corpus uses the other faces",
                        folder, d)  # fmt: skip
            missing.append(folder)
            continue
        files += folder_photos(d)
    cache: dict[str, str] = {}  # file digest -> "ok" or why the photo is left out, one "digest<TAB>verdict" a line
    if cache_path is not None and cache_path.is_file():
        try:
            cache = dict(line.split("\t", 1) for line in cache_path.read_text().splitlines() if "\t" in line)
        except OSError:
            cache = {}
    specs: list[tuple[PhotoSpec, object]] = []
    without: list[dict] = []
    for name in BUNDLED:
        photo = bundled_photo(name)
        specs.append((PhotoSpec(name, "", hashlib.sha1(photo.image.tobytes()).hexdigest()), photo))
    for path in files + explicit:
        try:
            spec = PhotoSpec(path.stem, str(path.resolve()), _digest_file(path))
        except OSError as exc:
            without.append({"name": path.stem, "path": str(path), "reason": f"unreadable: {exc}"})
            continue
        specs.append((spec, path))
    usable = []
    for spec, source in specs:
        verdict = cache.get(spec.digest)
        if verdict is None:
            verdict = _screen(source)
            cache[spec.digest] = verdict
        if verdict == "ok":
            usable.append(spec)
        else:
            without.append({"name": spec.name, "path": spec.path or "(bundled)", "reason": verdict})
            log.warning("corpus: face photo %s left out: %s", spec.path or spec.name, verdict)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text("".join(f"{k}\t{v}\n" for k, v in sorted(cache.items())))
    return FaceList(usable, without, missing, len(BUNDLED) + len(files) + len(explicit))


def _screen(source) -> str:
    """'ok' when FaceMesh finds a face in the photo, else why not."""
    from tasks.corpus.faces import FaceError, load_photo

    try:
        photo = load_photo(source) if isinstance(source, Path) else source
    except FaceError as exc:
        return str(exc)
    return "ok" if _mesh()(photo.image) is not None else "no face found"


# ------------------------------------------------------------------------------------------- one conversation
@lru_cache(maxsize=1)
def _mesh():
    from tasks.common.facemesh import FaceMesh

    return FaceMesh(static_image_mode=True)


@lru_cache(maxsize=8)
def _load(spec: PhotoSpec):
    from tasks.corpus.faces import bundled_photo, load_photo

    return bundled_photo(spec.name) if not spec.path else load_photo(spec.path)


def _render_conversation(job: _Job) -> list[dict]:
    from threadpoolctl import threadpool_limits

    cfg = CorpusConfig.model_validate(job.cfg)
    # the workers share the cores: one BLAS thread each (a multi-threaded solve per frame oversubscribes them)
    with threadpool_limits(limits=max(1, (os.cpu_count() or 1) // max(1, cfg.workers))):
        return _render(job, cfg)


def _render(job: _Job, cfg: CorpusConfig) -> list[dict]:
    from tasks.corpus.animate import ACTIONS, Animator, apply_actions, make_tracks
    from tasks.corpus.faces import Variant, make_identity
    from tasks.corpus.script import frame_envelope, plan_conversation, speaking_mask

    out, root = Path(job.out_dir), Path(job.root)
    rng = np.random.default_rng([cfg.seed, job.index])
    conv = plan_conversation(job.index, cfg, rng)
    n = int(round(cfg.duration_s * cfg.fps))
    ytid = synthetic_ytid(cfg.seed, job.index)
    names = [clip_name(ytid, cfg.width, cfg.height, 1, side, p) for p, side in enumerate(SIDES)]
    envs = [frame_envelope(conv.side_audio[s], cfg.sample_rate, cfg.fps, n) for s in (0, 1)]
    masks = [speaking_mask(conv, s, cfg.fps, n) for s in (0, 1)]
    fp = fingerprint(cfg, job.index, job.photos)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "mix.wav"
        write_wav(wav, conv.mix, cfg.sample_rate)
        for s, side in enumerate(SIDES):
            photo = _load(job.photos[s])
            ident = make_identity(photo, Variant.draw(rng), cfg.width, cfg.height, _mesh(), f"{photo.name}-{job.index}{side}")
            tracks = make_tracks(envs[s], masks[s], masks[1 - s], cfg.fps, rng, cfg.big_turn_prob,
                                 tuple(cfg.big_turn_yaw_deg))
            anim = Animator(ident, arm_side=int(rng.integers(0, 2)))
            poses = np.zeros((n, 3))
            mark, mark_from = draw_mark(cfg, job.index, s, n)
            actions = draw_actions(cfg, job.index, s, n)
            tracks, labels = apply_actions(tracks, actions, cfg.fps)

            def frames(anim=anim, tracks=tracks, poses=poses, mark=mark, mark_from=mark_from):
                for i in range(n):
                    frame, poses[i] = anim.render(tracks.yaw[i], tracks.pitch[i], tracks.roll[i], tracks.mouth[i],
                                                  tracks.blink[i], tracks.gesture[i],
                                                  mark if mark is not None and i >= mark_from else None,
                                                  float(tracks.smile[i]), float(tracks.wave[i]),
                                                  float(tracks.wave_angle[i]))  # fmt: skip
                    yield frame

            video = out / "videos" / f"{names[s]}.mp4"
            write_video(video, frames(), cfg.fps, audio_path=wav, audio_rate=cfg.sample_rate, crf=cfg.crf)
            anno = out / "merged_anno" / f"{names[s]}.json"
            record = _merged_anno(names[s], conv, s, n, cfg, ident)
            if cfg.actions:  # the clip's action annotation (seconds), as a captioner would label a real clip
                record["actions"] = [{"name": a.name, "start_s": round(a.start / cfg.fps, 4),
                                      "end_s": round(a.end / cfg.fps, 4)} for a in actions]  # fmt: skip
            anno.write_text(json.dumps(record, indent=1))
            row = {
                "clip_id": names[s], "conversation": job.index, "side": side, "partner_clip_id": names[1 - s],
                "video_path": _rel(video, root), "anno_path": _rel(anno, root),
                "gt_path": _rel(out / "gt" / f"{names[s]}.json", root), "identity": ident.name,
                "photo": photo.name, "voice": conv.voices[s], "num_frames": n, "fps": cfg.fps,
                "duration_s": n / cfg.fps, "width": cfg.width, "height": cfg.height,
                "speaking_ratio": float(masks[s].mean()),
                "listening_ratio": float(((masks[1 - s] > 0) & (masks[s] == 0)).mean()),
                "max_abs_yaw": float(np.abs(poses[:, 0]).max()), "status": "ok", "reason": "",
            }
            gt = {
                "fingerprint": fp, "clip_id": names[s], "fps": cfg.fps, "num_frames": n,
                "identity": ident.describe(), "voice": conv.voices[s], "row": row,
                "turns": [{"side": SIDES[t.side], "text": t.text, "start_s": round(t.start_s, 4),
                           "end_s": round(t.end_s, 4)} for t in conv.turns],
                "speaking": masks[s].astype(int).tolist(),
                "partner_speaking": masks[1 - s].astype(int).tolist(),
                "yaw": np.round(poses[:, 0], 3).tolist(), "pitch": np.round(poses[:, 1], 3).tolist(),
                "roll": np.round(poses[:, 2], 3).tolist(),
                "mouth_open": np.round(tracks.mouth, 4).tolist(), "blink": np.round(tracks.blink, 3).tolist(),
                "gesture": np.round(tracks.gesture, 4).tolist(),
                "envelope_self": np.round(envs[s], 5).tolist(), "envelope_partner": np.round(envs[1 - s], 5).tolist(),
                "mark": None if mark is None else {"frame": mark_from, "landmark": mark.landmark,
                                                   "color": list(mark.color), "radius_rel": mark.radius_rel},
                "mark_visible": [int(mark is not None and i >= mark_from) for i in range(n)],
                "action_names": list(ACTIONS), "action": labels.tolist(),
                "actions": [{"name": a.name, "start_frame": a.start, "end_frame": a.end} for a in actions],
            }
            _write_json_atomic(out / "gt" / f"{names[s]}.json", gt)  # last: marks the side finished
            rows.append(row)
    return rows


def draw_actions(cfg: CorpusConfig, index: int, side: int, n: int) -> list:
    """The requested actions of one side (``corpus.actions``), from a random stream of their own."""
    from tasks.corpus.animate import schedule_actions

    rng = np.random.default_rng([cfg.seed, index, side, 104729])
    return schedule_actions(n, cfg.fps, rng, list(cfg.actions), cfg.action_rate_per_min, tuple(cfg.action_s))


def draw_mark(cfg: CorpusConfig, index: int, side: int, n: int):
    """(Mark or None, the frame it appears at) for one side of conversation ``index``, from a random stream of
    its own: ``corpus.mark_prob`` 0 leaves every other draw, so every video, as it was."""
    from tasks.corpus.animate import MARK_CHEEKS, MARK_COLORS, Mark

    rng = np.random.default_rng([cfg.seed, index, side, 7919])
    if not cfg.mark_prob or rng.random() >= cfg.mark_prob:
        return None, n
    start = min(n - 1, int(round(rng.uniform(*cfg.mark_after_s) * cfg.fps)))
    mark = Mark(landmark=int(rng.choice(MARK_CHEEKS)), color=MARK_COLORS[int(rng.integers(len(MARK_COLORS)))],
                radius_rel=cfg.mark_radius_rel)  # fmt: skip
    return mark, start


def _merged_anno(name: str, conv, s: int, n: int, cfg: CorpusConfig, ident) -> dict:
    lm = ident.landmarks
    x1, x2 = lm[:, 0].min(), lm[:, 0].max()
    fw = x2 - x1
    # the person box: head and shoulders down to the frame bottom, normalised to the (raw = clip) frame
    bbox = [max(0.0, (x1 - 0.9 * fw) / cfg.width), max(0.0, (lm[:, 1].min() - 0.5 * fw) / cfg.height),
            min(1.0, (x2 + 0.9 * fw) / cfg.width), 1.0]
    dur = n / cfg.fps
    return {
        "video_name": name, "num_frames": n, "is_talking": int(any(t.side == s for t in conv.turns)),
        "clip_speaker_num": 2, "clear": 1, "video_total_duration": dur, "org_start_seconds": 0.0,
        "start_new": 0.0, "duration_new": dur,  # the time fields SpeakerVid's own curation code writes
        "bbox": [round(float(v), 4) for v in bbox], "conf": 1.0, "sync": 0.0,
        "speaker": [f"SPEAKER_{t.side:02d}" for t in conv.turns],
        "raw_video_height": cfg.height, "raw_video_width": cfg.width,
        "clip_video_height": cfg.height, "clip_video_width": cfg.width,
        "source": "streamavatar synthetic corpus (not a YouTube video)",
    }


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _finished_rows(cfg: CorpusConfig, index: int, out: Path, root: Path, photos: tuple[PhotoSpec, ...]
                   ) -> list[dict] | None:  # fmt: skip
    """The manifest rows of a conversation already rendered under ``out``, or None. The rows' paths are where the
    files are now (a corpus folder moved or copied elsewhere resumes with its own paths, not the old ones)."""
    ytid = synthetic_ytid(cfg.seed, index)
    rows = []
    for p, side in enumerate(SIDES):
        name = clip_name(ytid, cfg.width, cfg.height, 1, side, p)
        files = {"video_path": out / "videos" / f"{name}.mp4", "anno_path": out / "merged_anno" / f"{name}.json",
                 "gt_path": out / "gt" / f"{name}.json"}  # fmt: skip
        if not all(f.is_file() for f in files.values()):
            return None
        try:
            data = json.loads(files["gt_path"].read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("fingerprint") != fingerprint(cfg, index, photos):
            return None
        rows.append({**data["row"], **{k: _rel(f, root) for k, f in files.items()}})
    return rows


# ------------------------------------------------------------------------------------------------ the stage
def run_corpus(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    c = cfg.corpus
    root = Path(root)
    out = (root / c.out_dir).resolve()
    report_dir = (root / c.report_dir).resolve()
    for sub in ("videos", "merged_anno", "gt"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    faces = face_photos(c, root, out / "faces_screened.tsv")
    pairs = {i: side_photos(i, faces.usable) for i in range(c.num_conversations)}

    rows: dict[int, list[dict]] = {}
    todo = []
    for i in range(c.num_conversations):
        done = _finished_rows(c, i, out, root, pairs[i])
        if done is None:
            todo.append(i)
        else:
            rows[i] = done
    failures: dict[str, str] = {}
    if todo:
        jobs = [_Job(i, c.model_dump(mode="json"), str(out), str(root.resolve()), pairs[i]) for i in todo]
        for job, result, exc in map_jobs(_render_conversation, jobs, c.workers, "corpus: conversations", "conv",
                                         progress):  # fmt: skip
            if exc is None:
                rows[job.index] = result
            else:  # one bad conversation never stops the batch: record it and go on
                rows[job.index] = _failed_rows(job, exc, failures, c)
    _remove_stale(out, c)

    table = pd.DataFrame([r for i in sorted(rows) for r in rows[i]], columns=MANIFEST_COLUMNS)
    manifest = out / "corpus.parquet"
    table.to_parquet(manifest, index=False)
    seconds = time.perf_counter() - t0

    ok = table[table.status == "ok"]
    metrics = {
        "conversations": float(c.num_conversations),
        "clips_ok": float(len(ok)),
        "clips_failed": float((table.status != "ok").sum()),
        "conversations_generated": float(len(todo)),
        "conversations_skipped": float(c.num_conversations - len(todo)),
        "hours": float(ok.duration_s.sum() / 3600.0),
        "speaking_ratio_mean": float(ok.speaking_ratio.mean()) if len(ok) else 0.0,
        "listening_ratio_mean": float(ok.listening_ratio.mean()) if len(ok) else 0.0,
        "clips_with_turn_past_45deg": float((ok.max_abs_yaw > 45).sum()),
        "photos_total": float(faces.candidates),
        "photos_usable": float(len(faces.usable)),
        "photos_without_face": float(len(faces.without_face)),
        "photos_used": float(len({p.name for pair in pairs.values() for p in pair})),
        "face_dirs_missing": float(len(faces.missing_dirs)),
        "identities": float(ok.photo.nunique()) if len(ok) else 0.0,
        "seconds": seconds,
    }
    artifacts = [manifest]
    if len(ok):
        from tasks.corpus.report import contact_sheet

        sheet = report_dir / "contact_sheet.png"
        contact_sheet(ok, root, sheet)
        artifacts.append(sheet)
    faces_path = report_dir / "faces.json"  # which photos were used, which were left out and why
    faces_path.write_text(json.dumps({
        "used": [{"name": p.name, "path": p.path or "(bundled)",
                  "conversations": sorted(i for i, pair in pairs.items() if p in pair)} for p in faces.usable],
        "without_face": faces.without_face,
        "missing_dirs": faces.missing_dirs,
    }, indent=1))
    artifacts.append(faces_path)
    metrics_path = report_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2))
    artifacts.append(metrics_path)
    notes = "".join([f"; face folder {d} absent: skipped" for d in faces.missing_dirs]
                    + [f"; photo {r['name']} left out: {r['reason']}" for r in faces.without_face])
    summary = (f"corpus: {len(ok)} clips ok, {len(failures)} failed, {len(todo)} conversations generated and "
               f"{c.num_conversations - len(todo)} already finished, {len(faces.usable)} faces, in "
               f"{seconds:.1f} s -> {_rel(out, root)}{notes}")
    return StageResult("corpus", metrics=metrics, artifacts=artifacts, outputs=[out, report_dir],
                       failures=failures, summary=summary)


def _failed_rows(job: _Job, exc: Exception, failures: dict, c: CorpusConfig) -> list[dict]:
    ytid = synthetic_ytid(c.seed, job.index)
    reason = f"{type(exc).__name__}: {exc}"
    failures[f"conversation {job.index}"] = reason
    return [
        {**{k: None for k in MANIFEST_COLUMNS}, "clip_id": clip_name(ytid, c.width, c.height, 1, side, p),
         "conversation": job.index, "side": side, "photo": job.photos[p].name, "status": "failed", "reason": reason}
        for p, side in enumerate(SIDES)
    ]


def _remove_stale(out: Path, c: CorpusConfig) -> None:
    """Files of conversations no longer in the plan (e.g. num_conversations went down) are removed."""
    keep = {clip_name(synthetic_ytid(c.seed, i), c.width, c.height, 1, side, p)
            for i in range(c.num_conversations) for p, side in enumerate(SIDES)}
    for sub, suffix in (("videos", ".mp4"), ("merged_anno", ".json"), ("gt", ".json")):
        for f in (out / sub).iterdir():
            if f.name.endswith(".partial" + suffix) or f.name.endswith(suffix) and f.name[: -len(suffix)] not in keep:
                f.unlink() if f.is_file() else shutil.rmtree(f)
