"""`streamavatar bench --actions`: does the streaming student perform the actions it is asked for?

For each reference portrait and voice (default: the shared avatar fixtures, people never trained on), the
student streams ``seconds`` of video twice with the same seed: once with a request schedule that cycles
through the vocabulary's actions every ``every_s`` seconds (``generate --actions``: State-Cycling and
Cache-Switching) and once without any request. The action detector (tasks/evaluation/actions.py) scores both
videos against the same schedule: the second is the chance level of "following" (the detector finding the
requested motion although nothing asked for it). Reported: followed share with and without the requests, per
action, false actions per idle minute, the detector's latency and the switch latency in chunks (the chunk
whose prompt changed after each request, from the generator's own log).

``--ceiling`` adds what the student is measured against: the profile's curated action clips scored by the same
detector against their own labels, as they are and through the autoencoder (encoded and decoded again, as
every generated video is): the share of their actions followed, per action, the false actions per idle minute
and the face rate. Nothing that generates latents can be expected to do better than the second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from model.interaction import ACTIONS
from tasks.config import Config, ConfigError, resolve_path
from tasks.inference.generate import generate, measure_actions

DEFAULT_PAIRS = ("fashion_blogger", "kitchen_grandmother")


def schedule(seconds: float, every_s: float, start_s: float = 1.0) -> str:
    """``--actions`` for the run: each non-idle action in turn, every ``every_s`` s from ``start_s`` on, none
    later than 1.5 s before the end (so each has time to show)."""
    names = [a for a in ACTIONS if a != "idle"]
    out, t, i = [], start_s, 0
    while t <= seconds - 1.5:
        out.append(f"{t:g}:{names[i % len(names)]}")
        t += every_s
        i += 1
    return ",".join(out)


def _clip_requests(actions: str | None, fps: float, where: str) -> list[tuple[str, int, int]]:
    """A manifest row's ``actions`` JSON ``[[name, start_s, end_s], ...]`` as (name, start frame, end frame)."""
    if not isinstance(actions, str) or not actions:
        return []
    try:
        return [(str(a), int(round(float(s) * fps)), int(round(float(e) * fps))) for a, s, e in json.loads(actions)]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: 'actions' is not a list of [name, start_s, end_s]: {actions!r}") from e


@torch.no_grad()
def autoencoder_ceiling(cfg: Config, root: Path, progress: bool = True) -> dict[str, Any]:
    """The curated clips with action labels (the profile's manifest), scored by the detector against their own
    labels as they are (``curated``) and encoded and decoded by the profile's autoencoder (``autoencoder``)."""
    from tasks.common.media import MediaError, read_frames
    from tasks.common.models import build_vae
    from tasks.evaluation.actions import action_signals, detect_actions, score_following

    manifest = root / cfg.curate.manifest
    if not manifest.is_file():
        raise ConfigError(f"--ceiling: {manifest} does not exist (run `streamavatar curate` for this profile)")
    rows = pd.read_parquet(manifest)
    if "actions" not in rows:
        raise ConfigError(f"--ceiling: {manifest} has no 'actions' column (a corpus without corpus.actions)")
    rows = rows[rows.video_path.apply(lambda p: isinstance(p, str)) & (rows.actions.fillna("") != "")]
    if rows.empty:
        raise ConfigError(f"--ceiling: no curated clip in {manifest} has action labels")
    vae = build_vae(cfg, root=root).eval()
    fps = cfg.video.fps
    out = {k: {"requested": 0, "followed": 0, "false": 0, "idle_min": 0.0, "face": [], "per_action": {}}
           for k in ("curated", "autoencoder")}  # fmt: skip
    failed: dict[str, str] = {}
    for r in tqdm(list(rows.itertuples()), desc="ceiling", unit="clip", disable=not progress):
        try:
            frames = read_frames(root / r.video_path)
        except MediaError as e:  # one unreadable clip is reported, the others still count
            failed[str(r.clip_id)] = str(e)
            continue
        frames = frames[: 1 + cfg.vae.temporal_compression * ((len(frames) - 1) // cfg.vae.temporal_compression)]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()[None] / 127.5 - 1.0
        decoded = vae.decode(vae.encode(x.to(next(vae.parameters()).device)))[0].clamp(-1, 1).cpu()
        decoded = ((decoded + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        requests = _clip_requests(r.actions, fps, f"{manifest} clip {r.clip_id}")
        for key, video in (("curated", frames), ("autoencoder", decoded)):
            signals = action_signals(video)
            f = score_following(detect_actions(signals, fps), requests, len(video), fps)
            o = out[key]
            o["requested"] += f.requested
            o["followed"] += f.followed
            o["false"] += f.false_events
            o["idle_min"] += f.idle_minutes
            o["face"].append(float((~np.isnan(signals.yaw)).mean()))
            for name, (hit, asked) in f.per_action.items():
                p = o["per_action"].setdefault(name, [0, 0])
                p[0], p[1] = p[0] + hit, p[1] + asked
    if not out["curated"]["face"]:
        raise ConfigError(f"--ceiling: no curated action clip in {manifest} could be read: {failed}")
    return {key: {"clips": len(rows) - len(failed), "failed": failed, "requested": o["requested"],
                  "followed": o["followed"] / o["requested"] if o["requested"] else None,
                  "false_per_idle_min": o["false"] / o["idle_min"] if o["idle_min"] else None,
                  "face_rate": float(np.mean(o["face"])),
                  "per_action": {k: {"followed": v[0], "requested": v[1]} for k, v in sorted(o["per_action"].items())}}
            for key, o in out.items()}  # fmt: skip


def avatar_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(portrait, voice) of the avatar fixtures in DEFAULT_PAIRS (the benches' default portraits)."""
    shared = resolve_path("../shared/fixtures/avatars", root)
    pairs = [(shared / f"{n}.jpg", shared / f"{n}.wav") for n in DEFAULT_PAIRS]
    pairs = [p for p in pairs if p[0].is_file() and p[1].is_file()]
    if not pairs:
        raise ConfigError(f"no avatar fixtures (jpg + wav) in {shared}: pass --reference and --voice")
    return pairs


def run_action_bench(cfg: Config, root: Path, checkpoint: str | None = None, pairs: list[tuple[Path, Path]] | None = None,
                     seconds: float = 20.0, every_s: float = 2.5, progress: bool = True, ceiling: bool = False
                     ) -> dict[str, Any]:  # fmt: skip
    if seconds < 4 or every_s < 1.5:
        raise ConfigError("--seconds must be at least 4 and --every at least 1.5")
    if pairs is None:
        pairs = avatar_pairs(root)
    plan = schedule(seconds, every_s)
    out_dir = root / cfg.project.data_dir / "reports" / "action_bench"
    fps = cfg.video.fps
    videos, totals = [], {"acted": [0, 0, 0, 0.0], "plain": [0, 0, 0, 0.0]}
    free = [0, 0.0]  # false events and minutes of the videos streamed without requests
    per_action: dict[str, list[int]] = {}
    switch_chunks: list[int] = []
    latency: list[float] = []
    for image, voice in pairs:
        acted = generate(cfg, root, image, voice, out_dir / f"{image.stem}_actions.mp4", checkpoint=checkpoint,
                         seconds=seconds, progress=progress, actions=plan)  # fmt: skip
        plain = generate(cfg, root, image, voice, out_dir / f"{image.stem}_idle.mp4", checkpoint=checkpoint,
                         seconds=seconds, progress=progress)  # fmt: skip
        requests = acted["requests"]
        f_acted = measure_actions(acted["out"], requests, fps)
        f_plain = measure_actions(plain["out"], requests, fps)
        f_free = measure_actions(plain["out"], [], fps)  # nothing requested: every event is a false one
        free[0], free[1] = free[0] + f_free["false_events"], free[1] + f_free["idle_minutes"]
        for key, f in (("acted", f_acted), ("plain", f_plain)):
            t = totals[key]
            t[0], t[1], t[2], t[3] = t[0] + f["requested"], t[1] + f["followed"], t[2] + f["false_events"], \
                t[3] + f["idle_minutes"]  # fmt: skip
        for name, (a, b) in f_acted["per_action"].items():
            p = per_action.setdefault(name, [0, 0, 0])
            p[0], p[1] = p[0] + a, p[1] + b
        for name, (a, _b) in f_plain["per_action"].items():
            per_action.setdefault(name, [0, 0, 0])[2] += a
        latency += f_acted["latency_s"]
        chunk_s = acted["chunk_video_frames"] / fps
        switched = [r["chunk"] for r in acted["action_log"] if r["action"] != "idle"]
        for item in acted["actions"]:  # the first chunk conditioned on the action after its request
            due = [c for c in switched if c * chunk_s >= item["at_s"] - 1e-6]
            if due:
                switch_chunks.append((min(due) * chunk_s - item["at_s"]) / chunk_s)
        videos.append({"reference": str(image), "voice": str(voice), "with_actions": acted["out"],
                       "without": plain["out"], "requests": requests, "following": f_acted,
                       "following_without_requests": f_plain, "rtf": acted["rtf"],
                       "checkpoint": acted["checkpoint"], "seconds": acted["seconds"]})  # fmt: skip

    def share(t: list) -> float | None:
        return t[1] / t[0] if t[0] else None

    return {
        "checkpoint": videos[0]["checkpoint"], "seconds": seconds, "every_s": every_s,
        "schedule": plan, "videos": videos,
        "followed": share(totals["acted"]), "followed_without_requests": share(totals["plain"]),
        "requested": totals["acted"][0],
        "false_per_idle_min": totals["acted"][2] / totals["acted"][3] if totals["acted"][3] else None,
        "false_per_min_without_requests": free[0] / free[1] if free[1] else None,
        "seconds_streamed": sum(v["seconds"] for v in videos),
        "per_action": {k: {"followed": v[0], "requested": v[1], "found_without_request": v[2]}
                       for k, v in sorted(per_action.items())},
        "median_latency_s": sorted(latency)[len(latency) // 2] if latency else None,
        "switch_latency_chunks_max": max(switch_chunks) if switch_chunks else None,  # < 1: the next boundary
        **({"ceiling": autoencoder_ceiling(cfg, root, progress)} if ceiling else {}),
    }  # fmt: skip


def format_report(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f}"

    lines = [f"action following: {len(r['videos'])} videos, {r['seconds_streamed']:.1f} s in all (at most "
             f"{r['seconds']:g} s each), a request every {r['every_s']:g} s ({r['requested']} in all)",
             f"  followed (detected within 1 s): {pct(r['followed'])} with the requests, "
             f"{pct(r['followed_without_requests'])} of the same schedule without them (chance)",
             f"  false actions per idle minute: {num(r['false_per_idle_min'])} between the requests, "
             f"{num(r['false_per_min_without_requests'])} in the videos streamed without any",
             f"  detector latency (median): {num(r['median_latency_s'])} s; the prompt switched at most "
             f"{num(r['switch_latency_chunks_max'])} chunk(s) after a request (student {r['checkpoint']})",
             "  action       followed  found without a request"]  # fmt: skip
    for name, v in r["per_action"].items():
        lines.append(f"  {name:<12} {v['followed']}/{v['requested']:<7} {v['found_without_request']}/{v['requested']}")
    if "ceiling" in r:
        c = r["ceiling"]
        lines.append(f"  the ceiling: the profile's {c['curated']['clips']} curated action clips "
                     f"({c['curated']['requested']} actions) against their own labels"
                     + (f"; unreadable, left out: {', '.join(c['curated']['failed'])}" if c["curated"]["failed"] else ""))
        for key, label in (("curated", "as they are"), ("autoencoder", "through the autoencoder")):
            v = c[key]
            per = ", ".join(f"{k} {a['followed']}/{a['requested']}" for k, a in v["per_action"].items())
            lines.append(f"    {label}: followed {pct(v['followed'])} ({per}); false per idle minute "
                         f"{num(v['false_per_idle_min'])}; face found {pct(v['face_rate'])}")
    return "\n".join(lines)
