"""Stage `curate` on real SpeakerVid fixtures (local source) and on the demo corpus (synthetic source)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from tasks.common.media import ffmpeg_exe, probe, read_frames
from tasks.config import load_config
from tasks.corpus.build import run_corpus
from tasks.curation.asd import frame_f1
from tasks.curation.build import MANIFEST_COLUMNS, run_curate
from tasks.curation.pose import clip_pose
from tests.conftest import shared_path

pytestmark = pytest.mark.slow
WEIGHTS = "curate.asd_weights={}"


def _cfg(root, *sets):
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    return load_config(sets=["tracking.enabled=false", WEIGHTS.format(weights), "curate.pose_stride=2", *sets], root=root)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate_local")
    clips = root / "clips"
    clips.mkdir()
    for name in ("head_4", "side_2"):
        shutil.copy(shared_path("fixtures", "speakervid", f"{name}.mp4"), clips / f"{name}.mp4")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(clips / "head_4.mp4"), "-t", "1", "-c", "copy",
                    str(clips / "short.mp4")], check=True)  # fmt: skip
    (clips / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    cfg = _cfg(root, "curate.source=local", f"curate.local_dir={clips}")
    result = run_curate(cfg, root, progress=False)
    table = pd.read_parquet(root / cfg.curate.manifest).set_index("clip_id")
    return root, cfg, result, table


def test_manifest_rows_statuses_and_reasons(local_run):
    root, cfg, result, table = local_run
    assert list(table.reset_index().columns) == MANIFEST_COLUMNS
    assert table.loc["head_4", "status"] == "ok" and table.loc["head_4", "category"] == "speaking"
    assert table.loc["side_2", "status"] == "rejected" and "pose limits" in table.loc["side_2", "reason"]
    assert table.loc["short", "status"] == "rejected" and "too short" in table.loc["short", "reason"]
    assert table.loc["broken", "status"] == "failed" and "broken.mp4" in table.loc["broken", "reason"]
    assert result.failures == {"broken": table.loc["broken", "reason"]}
    m = result.metrics
    assert (m["clips_ok"], m["clips_rejected"], m["clips_failed"], m["reason_pose"]) == (1, 2, 1, 1)


def test_outputs_are_normalised_and_masks_match(local_run):
    root, cfg, _, table = local_run
    row = table.loc["head_4"]
    info = probe(root / row["video_path"])
    assert (info.width, info.height, info.fps) == (cfg.video.width, cfg.video.height, 25.0)
    assert (info.sample_rate, info.channels, info.audio_codec) == (16000, 1, "aac")
    mask = np.load(root / row["mask_path"])
    assert len(mask) == row["num_frames"] and set(np.unique(mask)) <= {-1, 0, 1}
    assert row["speaking_ratio"] == pytest.approx((mask[mask >= 0] == 1).mean())
    for name in ("histograms.png", "asd_frames.png", "metrics.json"):
        assert (root / cfg.curate.report_dir / name).stat().st_size > 0


def test_resume_skips_finished_clips_and_redoes_lost_outputs(local_run):
    root, cfg, _, table = local_run
    again = run_curate(cfg, root, progress=False)
    assert again.metrics["clips_processed"] == 1  # only the failed clip is retried
    (root / table.loc["head_4", "video_path"]).unlink()
    third = run_curate(cfg, root, progress=False)
    assert third.metrics["clips_processed"] == 2  # the clip whose output vanished, and the failed one
    assert (root / table.loc["head_4", "video_path"]).is_file()


def test_masks_and_pose_against_the_corpus_ground_truth(tmp_path):
    root = tmp_path
    sets = ["corpus.num_conversations=2", "corpus.duration_s=8", "corpus.big_turn_prob=0", "corpus.workers=2"]
    cfg = _cfg(root, *sets)
    run_corpus(cfg, root, progress=False)
    result = run_curate(cfg, root, progress=False)
    assert result.metrics["clips_ok"] == 4
    table = pd.read_parquet(root / cfg.curate.manifest)
    preds, truths, yaw_err = [], [], []
    for row in table.itertuples():
        gt = json.loads((root / "data/raw/synthetic/gt" / f"{row.clip_id}.json").read_text())
        mask = np.load(root / row.mask_path)
        preds.append(mask)
        truths.append(np.array(gt["speaking"])[: len(mask)])
        pose = clip_pose(read_frames(root / row.source_path), stride=2)
        found = ~np.isnan(pose[:, 0])
        yaw_err.append(np.abs(pose[found, 0] - np.array(gt["yaw"])[: len(pose)][found]))
    f1 = frame_f1(np.concatenate(preds), np.concatenate(truths))
    assert f1["f1"] >= 0.9, f1
    assert np.concatenate(yaw_err).mean() <= 5.0
