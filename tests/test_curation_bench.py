"""`bench --curation`: throughput of the curate stage's decode, ASD and pose on real SpeakerVid fixtures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flows.cli import main as cli_main
from tasks.config import ConfigError, load_config
from tasks.evaluation.curation_bench import (
    ASD_STEPS,
    PARTS,
    curation_clips,
    format_report,
    run_curation_bench,
)
from tests.conftest import shared_path

RATE_KEYS = ("wall_s", "process_cpu_s", "child_cpu_s", "cpu_utilisation", "realtime_x", "throughput")


def _cfg(root):
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    return load_config(sets=["tracking.enabled=false", f"curate.asd_weights={weights}"], root=root)


def _check_rates(report: dict) -> None:
    for part in (*PARTS, "total"):
        for key in RATE_KEYS:
            value = report[part][key]
            assert math.isfinite(value) and value >= 0, (part, key, value)
        assert report[part]["wall_s"] > 0 and report[part]["throughput"] > 0, part
        cores = report["hardware"]["cores"]
        rate = report["video_seconds"] / report[part]["wall_s"] / cores
        assert report[part]["throughput"] == pytest.approx(rate), part
    parts = sum(report[p]["wall_s"] for p in PARTS)
    if report["settings"]["workers"] == 1:
        assert report["total"]["wall_s"] == pytest.approx(parts)
    else:  # until the last worker finished >= the mean worker's parts
        assert report["total"]["wall_s"] >= parts * (1 - 1e-9)
    assert report["total"]["throughput"] < min(report[p]["throughput"] for p in PARTS)


def test_curation_bench_on_a_3_s_clip(repo_root):
    clip = shared_path("fixtures", "speakervid", "head_4.mp4")  # 10.12 s at 25 fps
    report = run_curation_bench(_cfg(repo_root), repo_root, [clip], seconds=3.0, progress=False)

    assert report["video_seconds"] == pytest.approx(3.0, abs=1 / 25)
    (row,) = report["clips"]
    assert (
        row["clip"] == "head_4.mp4"
        and row["frames"] == 75
        and row["video_seconds"] == report["video_seconds"]
    )
    assert row["asd_face_fraction"] > 0.9 and row["pose_face_fraction"] > 0.9  # a frontal face: all parts ran
    for part in PARTS:
        assert row[f"{part}_s"] == pytest.approx(report[part]["wall_s"])
    _check_rates(report)
    assert report["decode"]["child_cpu_s"] > 0  # ffmpeg's CPU is counted
    steps = report["asd"]["steps_s"]
    assert set(steps) == {*ASD_STEPS, "other"} and steps["detect_faces"] > 0 and steps["asd_scores"] > 0
    assert sum(steps.values()) == pytest.approx(report["asd"]["wall_s"], rel=1e-6)
    assert report["asd"]["load_s"] > 0 and report["warmup_s"] > 0

    hw = report["hardware"]
    assert hw["cpu"] and hw["torch"] and hw["cores"] >= 1 and hw["torch_threads"] >= 1
    assert hw["torch_interop_threads"] >= 1 and hw["process_threads"] >= 1
    assert set(hw["load_avg_1m"]) == {"before", "after"}
    assert report["settings"]["seconds"] == 3.0 and report["settings"]["asd"] == "light-asd"
    assert report["unit"] == "video seconds curated per wall second per core"
    table = format_report(report)
    assert "head_4.mp4" in table and all(f"  {p} " in table for p in (*PARTS, "total"))


def test_cli_bench_curation_json_on_the_default_clips(repo_root, tmp_path, capsys):
    shared_path("fixtures", "speakervid", "head_4.mp4")
    out = tmp_path / "curation_bench.json"
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    threads = torch.get_num_threads()
    code = cli_main(["bench", "--curation", "--json", "--seconds", "1", "--torch-threads", "1", "--out", str(out),
                     "--set", f"curate.asd_weights={weights}", "--set", "curate.workers=2"])  # fmt: skip
    assert code == 0 and torch.get_num_threads() == threads  # set for the bench only
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    # as the stage runs: curate.workers processes side by side, each curating every clip
    assert report["settings"]["workers"] == 2
    names = ["head_4.mp4", "half_body_2.mp4", "side_2.mp4"]
    assert [(r["worker"], r["clip"]) for r in report["clips"]] == [(w, n) for w in (0, 1) for n in names]
    assert all(r["video_seconds"] == pytest.approx(1.0) for r in report["clips"])
    assert all(r["asd_face_fraction"] > 0.9 for r in report["clips"])
    assert report["video_seconds"] == pytest.approx(6.0)
    assert report["hardware"]["torch_threads"] == 1
    _check_rates(report)


def test_bench_flags_and_missing_clips_are_clear(repo_root, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    assert cli_main(["bench", "--curation", "--clips", str(missing), "--out", str(tmp_path / "x.json")]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--curation", "--model-only"])  # one benchmark at a time
    assert "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no video files"):
        curation_clips([str(tmp_path / "empty")], repo_root)
    monkeypatch.setenv("STREAMAVATAR_SHARED", str(tmp_path / "no-shared"))
    with pytest.raises(
        ConfigError, match=f"{tmp_path / 'no-shared' / 'fixtures' / 'speakervid'} holds none of"
    ):
        curation_clips(None, repo_root)


def test_read_frames_into_one_array_and_the_reused_buffer(monkeypatch):
    from tasks.common import media

    clip = shared_path("fixtures", "speakervid", "head_4.mp4")
    stacked = np.stack(list(media.iter_frames(clip, width=160, fps=25, duration=1.0)))
    direct = media.read_frames(clip, width=160, fps=25, duration=1.0)
    assert direct.shape == stacked.shape == (25, 126, 160, 3) and np.array_equal(direct, stacked)
    # reuse: the second clip's frames land in the first one's buffer (no fresh memory), and are right
    media._REUSED.clear()
    first = media.read_frames(clip, width=160, fps=25, duration=1.0, reuse=True)
    held = first.copy()
    second = media.read_frames(clip, width=128, fps=25, duration=0.5, reuse=True)
    assert np.shares_memory(first, second) and len(second) == 13
    assert np.array_equal(second, np.stack(list(media.iter_frames(clip, width=128, fps=25, duration=0.5))))
    assert not np.array_equal(first[:1].reshape(-1)[:100], held[:1].reshape(-1)[:100])  # overwritten: a view
    grown = media.read_frames(clip, width=320, fps=25, duration=1.0, reuse=True)  # larger: a new buffer, kept
    assert not np.shares_memory(grown, first) and media._REUSED[0].nbytes >= grown.nbytes
    # more frames than the container announces (a duration that lies): the array grows, nothing is lost
    import dataclasses

    real = media.probe(clip)
    monkeypatch.setattr(media, "probe", lambda path: dataclasses.replace(real, duration_s=0.1))
    assert np.array_equal(media.read_frames(clip, width=160, fps=25, duration=1.0), stacked)


def test_a_small_face_is_read_again_at_the_detectors_scale():
    from tasks.common.media import probe
    from tasks.curation.asd import ASD_MIN_CROP, detect_faces
    from tasks.curation.clip import analysis_frames, crop_side, detector_scale

    clip = shared_path("fixtures", "speakervid", "head_4.mp4")
    info = probe(clip)
    big = analysis_frames(clip, info, 480, 25, 1.0)
    track = detect_faces(big, stride=5)
    assert crop_side(track) >= ASD_MIN_CROP
    same, kept = detector_scale(clip, info, big, track, 25, 1.0)
    assert same is big and kept is track  # large enough: nothing is read again
    small = analysis_frames(clip, info, 160, 25, 1.0).copy()
    track = detect_faces(small, stride=5)
    assert crop_side(track) < ASD_MIN_CROP  # ~76 px at 160 px wide
    frames, scaled = detector_scale(clip, info, small, track, 25, 1.0)
    assert frames.shape[0] == small.shape[0] and small.shape[2] < frames.shape[2] <= info.width
    assert ASD_MIN_CROP <= crop_side(scaled) < ASD_MIN_CROP * 1.1
    k = frames.shape[2] / small.shape[2]
    assert np.allclose(scaled.boxes[:, 0], track.boxes[:, 0] * k) and np.array_equal(scaled.found, track.found)
    # the scaled track sits on the face of the sharper frames: detection there agrees
    direct = detect_faces(frames, stride=5)
    from tasks.curation.asd import box_iou

    assert np.median(np.diag(box_iou(direct.boxes, scaled.boxes))) > 0.8
