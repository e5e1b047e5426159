"""Head-pose statistics and the pose filter (paper 4.1), on constructed poses and on real SpeakerVid clips."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.common.media import read_frames
from tasks.curation.pose import clip_pose, pose_stats, pose_verdict
from tests.conftest import shared_path


def test_pose_stats_and_verdict_numbers():
    pose = np.array([[10.0, 0, 0], [-40, 5, 0], [20, -35, 0], [np.nan, np.nan, np.nan], [0, 0, 31]])
    st = pose_stats(pose, max_yaw=35, max_pitch=30, max_roll=30)
    assert (st.frames, st.face_frames) == (5, 4)
    assert st.mean_abs_yaw == pytest.approx(17.5) and st.max_abs_yaw == 40 and st.max_abs_pitch == 35
    assert st.beyond_fraction == pytest.approx(3 / 4)  # yaw 40, pitch 35, roll 31 are beyond
    assert "75%" in pose_verdict(st, max_fraction=0.2, min_face_fraction=0.5)
    assert pose_verdict(st, max_fraction=0.8, min_face_fraction=0.5) == ""
    assert "face found in 4/5" in pose_verdict(st, max_fraction=0.8, min_face_fraction=0.9)
    empty = pose_stats(np.full((3, 3), np.nan), 35, 30, 30)
    assert empty.face_frames == 0 and "0/3" in pose_verdict(empty, 0.2, 0.8)


def test_frames_scaled_by_width_keep_their_aspect():
    video = shared_path("fixtures", "speakervid", "head_4.mp4")  # 1376x1088
    frames = read_frames(video, width=480)[:2]
    assert frames.shape[1:] == (380, 480, 3)


@pytest.mark.parametrize(("clip", "passes"), [("head_4", True), ("half_body_1", True), ("side_2", False), ("side_3", False)])
def test_filter_keeps_frontal_clips_and_rejects_side_views(clip, passes):
    frames = read_frames(shared_path("fixtures", "speakervid", f"{clip}.mp4"), width=480)
    pose = clip_pose(frames, stride=4)
    stats = pose_stats(pose, max_yaw=35, max_pitch=30, max_roll=30)
    verdict = pose_verdict(stats, max_fraction=0.2, min_face_fraction=0.8)
    assert (verdict == "") is passes, (clip, verdict, stats)
    if passes:
        assert stats.face_frames == stats.frames and stats.beyond_fraction <= 0.05
    else:
        assert stats.mean_abs_yaw > 35 and "pose limits" in verdict
