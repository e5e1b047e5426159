"""The action detector (tasks/evaluation/actions.py) on rendered actions it was not calibrated on."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tasks.common.facemesh import FaceMesh
from tasks.common.media import read_frames
from tasks.config import load_config
from tasks.corpus.build import run_corpus
from tasks.evaluation.actions import (
    Event,
    Signals,
    action_signals,
    clip_features,
    detect_actions,
    prompt_response,
    score_following,
)
from tests.conftest import REPO, shared_path

SETS = ["corpus.num_conversations=3", "corpus.duration_s=8", "corpus.big_turn_prob=0", "corpus.workers=2",
        "corpus.seed=7", "tracking.enabled=false", "corpus.extra_faces_dirs=[]", "corpus.action_rate_per_min=30",
        "corpus.actions=[nod,shake,turn_left,turn_right,smile,wave]"]  # fmt: skip


def head_crop(frames: np.ndarray, size: int = 64) -> np.ndarray:
    """A fixed square around the first frame's face (1.7x its landmarks' extent), at ``size`` px: the demo's
    head crop, made without curation."""
    mesh = FaceMesh()
    try:
        lm = mesh(frames[0])
    finally:
        mesh.close()
    assert lm is not None
    (x0, y0), (x1, y1) = lm[:, :2].min(0), lm[:, :2].max(0)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 0.85 * max(x1 - x0, y1 - y0)
    h, w = frames.shape[1:3]
    a, b = int(max(0, cy - half)), int(min(h, cy + half))
    c, d = int(max(0, cx - half)), int(min(w, cx + half))
    return np.stack([cv2.resize(f[a:b, c:d], (size, size), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.fixture(scope="module")
def corpus_out(tmp_path_factory):
    """The rendered corpus (SETS) once per module: its videos and ground-truth files."""
    root = tmp_path_factory.mktemp("actions")
    cfg = load_config(sets=SETS, root=root)
    run_corpus(cfg, root, progress=False)
    return root / cfg.corpus.out_dir


@pytest.fixture(scope="module")
def rendered(corpus_out):
    clips = []
    for gt_path in sorted((corpus_out / "gt").glob("*.json")):
        gt = json.loads(gt_path.read_text())
        frames = head_crop(read_frames(corpus_out / "videos" / f"{gt['clip_id']}.mp4"))
        requests = [(a["name"], a["start_frame"], a["end_frame"]) for a in gt["actions"]]
        clips.append((action_signals(frames), requests, len(frames)))
    return clips


def _score(clips, requests_of=lambda r: r, per_action=None):
    requested = followed = false = 0
    idle = 0.0
    for signals, requests, n in clips:
        f = score_following(detect_actions(signals, 25), requests_of(requests), n, 25)
        requested, followed, false, idle = (requested + f.requested, followed + f.followed,
                                            false + f.false_events, idle + f.idle_minutes)  # fmt: skip
        for name, (hit, asked) in f.per_action.items():
            if per_action is not None:
                got = per_action.setdefault(name, [0, 0])
                got[0], got[1] = got[0] + hit, got[1] + asked
    return followed / requested, false / idle, requested


def test_detector_finds_the_requested_actions_at_64_px(rendered):
    per_action: dict[str, list[int]] = {}
    rate, false_per_min, requested = _score(rendered, per_action=per_action)
    assert requested >= 10
    assert rate >= 0.8, rate  # docs/interactive.md: 0.95 on the 60 clips it was calibrated on
    assert false_per_min <= 8, false_per_min
    hit, asked = per_action["wave"]  # the hand beside the face, not a landmark: its own check
    assert asked >= 1 and hit == asked, per_action
    # the same videos scored against the wrong actions (each name swapped for another) follow almost none
    swap = {"nod": "smile", "smile": "wave", "wave": "turn_left", "turn_left": "turn_right", "turn_right": "shake",
            "shake": "nod"}  # fmt: skip
    wrong, _, _ = _score(rendered, lambda rs: [(swap[n], a, b) for n, a, b in rs])
    assert wrong <= 0.25, wrong


def test_scoring_counts_latency_misses_and_false_actions():
    n, fps = 500, 25
    events = [Event("nod", 110, 150), Event("shake", 300, 330), Event("smile", 420, 440)]
    f = score_following(events, [("nod", 100, 130), ("shake", 200, 230), ("turn_left", 400, 430)], n, fps)
    assert (f.requested, f.followed) == (3, 1)  # the shake came 4 s late: a miss, and a false action
    assert f.per_action == {"nod": (1, 1), "shake": (0, 1), "turn_left": (0, 1)}
    assert f.latency_s == [pytest.approx(0.4)]
    # idle frames: all but each request's span + 1 s; the late shake counts, the smile overlaps turn_left's slack
    assert f.false_events == 1
    assert f.idle_minutes == pytest.approx((n - 3 * (30 + 25)) / fps / 60)
    # a still video: no events, so no false ones
    still = Signals(np.zeros(n), np.zeros(n), np.ones(n))
    assert detect_actions(still, fps) == []
    # a 20-degree turn to the right for 1.2 s in the middle is one turn_right event there
    yaw = np.zeros(n)
    yaw[200:230] = 20.0
    ev = detect_actions(Signals(yaw, np.zeros(n), np.ones(n)), fps)
    assert [e.name for e in ev] == ["turn_right"] and 175 <= ev[0].start <= 205 and 225 <= ev[0].end <= 255



def test_prompt_response_signs_each_action_and_is_zero_for_a_model_that_ignores_it():
    n, fps = 25, 25
    still = Signals(np.zeros(n), np.zeros(n), np.ones(n), np.zeros((n, 2)))
    right = Signals(np.full(n, 10.0), np.zeros(n), np.ones(n), np.zeros((n, 2)))
    t = np.arange(n) / fps
    shaking = Signals(6.0 * np.sin(2 * np.pi * 3 * t), np.zeros(n), np.ones(n), np.zeros((n, 2)))
    base = clip_features(still, fps)
    assert clip_features(right, fps)["yaw"] == 10.0 and clip_features(shaking, fps)["yaw_osc"] > 2.0
    assert np.isnan(clip_features(Signals(np.full(n, np.nan), np.zeros(n), np.ones(n)), fps)["yaw"])  # no face
    feats = {"idle": [base, base], "turn_right": [clip_features(right, fps), base],
             "turn_left": [clip_features(right, fps), base], "shake": [clip_features(shaking, fps)] * 2}
    r = prompt_response(feats)
    assert r["response_turn_right"] == 5.0 and r["right_way_turn_right"] == 0.5
    assert r["response_turn_left"] == -5.0 and r["right_way_turn_left"] == 0.0  # turned the wrong way
    assert r["right_way_shake"] == 1.0
    ignored = prompt_response({"idle": [base], "nod": [base], "smile": [base]})  # the same clip under every prompt
    assert ignored == {"response_nod": 0.0, "right_way_nod": 0.0, "response_smile": 0.0, "right_way_smile": 0.0}


def test_prompt_response_reads_the_rendered_turns_the_right_way(rendered):
    """On the rendered corpus: the first second of each requested turn against the same video's first
    request-free second, as a prompt's sample against the idle prompt's: turns go their way; named the other way
    round, they do not."""
    pairs: dict[str, tuple[list, list]] = {"turn_left": ([], []), "turn_right": ([], [])}  # (turned, idle)

    def cut(s: Signals, start: int) -> Signals:
        return Signals(*(x[start : start + 25] for x in (s.yaw, s.pitch, s.width, s.hand)))

    for signals, requests, n in rendered:
        busy = np.zeros(n, bool)
        for _name, a, b in requests:
            busy[max(0, a - 25) : b + 25] = True
        free = next((i for i in range(n - 25) if not busy[i : i + 25].any()), None)
        for name, a, _b in requests:
            if name in pairs and free is not None and a + 30 <= n:
                pairs[name][0].append(clip_features(cut(signals, a + 5), 25))
                pairs[name][1].append(clip_features(cut(signals, free), 25))
    left = prompt_response({"idle": pairs["turn_left"][1], "turn_left": pairs["turn_left"][0]})
    right = prompt_response({"idle": pairs["turn_right"][1], "turn_right": pairs["turn_right"][0]})
    assert len(pairs["turn_left"][0]) >= 2 and len(pairs["turn_right"][0]) >= 2
    assert left["right_way_turn_left"] >= 0.75 and left["response_turn_left"] > 3.0
    assert right["right_way_turn_right"] >= 0.75 and right["response_turn_right"] > 3.0
    swapped = prompt_response({"idle": pairs["turn_left"][1], "turn_right": pairs["turn_left"][0]})
    assert swapped["right_way_turn_right"] <= 0.25


def test_the_ceiling_scores_curated_action_clips_as_they_are_and_through_the_autoencoder(tmp_path, corpus_out):
    """bench --actions --ceiling on a small curated set (head crops of a rendered corpus, seed 7, written as the
    curated clips are) with the committed demo autoencoder: the clips themselves follow their labels as the
    calibration says, the autoencoder keeps faces; malformed labels and a missing manifest are clear errors."""
    import pandas as pd

    from tasks.common.media import write_video
    from tasks.config import ConfigError
    from tasks.evaluation.action_bench import autoencoder_ceiling, format_report

    rows = []
    for gt_path in sorted((corpus_out / "gt").glob("*.json"))[:2]:
        gt = json.loads(gt_path.read_text())
        frames = head_crop(read_frames(corpus_out / "videos" / f"{gt['clip_id']}.mp4"))
        rel = f"data/curated/clips/{gt['clip_id']}.mp4"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(tmp_path / rel, list(frames), 25)
        acts = [[a["name"], a["start_frame"] / 25, a["end_frame"] / 25] for a in gt["actions"]]
        rows.append({"clip_id": gt["clip_id"], "video_path": rel, "actions": json.dumps(acts)})
    rows.append({"clip_id": "failed", "video_path": None, "actions": ""})  # a clip curation dropped: skipped
    (tmp_path / "data" / "curated" / "clips" / "broken.mp4").write_bytes(b"not a video")
    rows.append({"clip_id": "broken", "video_path": "data/curated/clips/broken.mp4", "actions": '[["nod", 1, 2]]'})
    (tmp_path / "data" / "manifests").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "manifests" / "curated.parquet")
    cfg = load_config(sets=[f"vae.pretrained_path={REPO / 'weights' / 'demo_vae.pt'}"], root=tmp_path)
    r = autoencoder_ceiling(cfg, tmp_path, progress=False)
    asked = sum(len(json.loads(x["actions"])) for x in rows[:2])
    for key in ("curated", "autoencoder"):  # the broken clip is named and left out, the others count
        assert r[key]["clips"] == 2 and r[key]["requested"] == asked and list(r[key]["failed"]) == ["broken"]
        assert sum(v["requested"] for v in r[key]["per_action"].values()) == asked
    assert r["curated"]["followed"] >= 0.8 and r["curated"]["face_rate"] >= 0.95
    assert 0.0 <= r["autoencoder"]["followed"] <= 1.0 and r["autoencoder"]["face_rate"] >= 0.8
    assert r["autoencoder"] != r["curated"]  # its own video: here the autoencoder's flicker reads as false actions
    text = format_report({**_empty_report(), "ceiling": r})
    assert "through the autoencoder: followed" in text and "unreadable, left out: broken" in text

    bad = pd.DataFrame(rows[:1]).assign(actions='[["nod", "soon"]]')
    bad.to_parquet(tmp_path / "data" / "manifests" / "curated.parquet")
    with pytest.raises(ConfigError, match=rows[0]["clip_id"]):
        autoencoder_ceiling(cfg, tmp_path, progress=False)
    (tmp_path / "data" / "manifests" / "curated.parquet").unlink()
    with pytest.raises(ConfigError, match="curate"):
        autoencoder_ceiling(cfg, tmp_path, progress=False)


def _empty_report() -> dict:
    return {"videos": [], "seconds_streamed": 0.0, "seconds": 0.0, "every_s": 2.5, "requested": 0, "followed": None,
            "followed_without_requests": None, "false_per_idle_min": None, "false_per_min_without_requests": None,
            "median_latency_s": None, "switch_latency_chunks_max": None, "checkpoint": "x", "per_action": {}}


def test_action_bench_streams_with_and_without_requests(tmp_path):
    """bench --actions on the seeded untrained student: the schedule, both videos per portrait, the prompt
    switched within one chunk of each request, and the report's figures in range."""
    from tasks.evaluation.action_bench import format_report, run_action_bench, schedule

    assert schedule(10, 2.5) == "1:nod,3.5:shake,6:turn_left,8.5:turn_right"

    avatars = shared_path("fixtures", "avatars", "fashion_blogger.jpg").parent
    cfg = load_config(sets=["tracking.enabled=false", "vae.pretrained_path=null"], root=tmp_path)
    r = run_action_bench(cfg, tmp_path, "random", [(avatars / "fashion_blogger.jpg", avatars / "fashion_blogger.wav")],
                         seconds=5.0, every_s=1.5, progress=False)  # fmt: skip
    assert r["schedule"] == "1:nod,2.5:shake" and r["requested"] == 2
    v = r["videos"][0]
    assert [a for a, _s, _e in v["requests"]] == ["nod", "shake"]
    assert (tmp_path / "data" / "reports" / "action_bench").is_dir()
    assert 0 <= r["switch_latency_chunks_max"] < 1  # the next chunk boundary, never later
    for key in ("followed", "followed_without_requests"):
        assert 0 <= r[key] <= 1
    assert "followed (detected within 1 s)" in format_report(r)
