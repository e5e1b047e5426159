"""Stage `curate` on real SpeakerVid fixtures (local source), on the demo corpus (synthetic source), and on both
in one run: honest splits and head crops."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from tasks.common.media import ffmpeg_exe, probe, read_audio, read_frames
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
    cfg = _cfg(root, "curate.sources=[local]", f"curate.local_dirs=[{clips}]")
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
    sets = ["corpus.num_conversations=2", "corpus.duration_s=8", "corpus.big_turn_prob=0", "corpus.workers=2",
            "corpus.extra_faces_dirs=[]", "curate.sources=[synthetic]"]  # the bundled faces, as measured
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


def _audio_corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _face_width_share(frames: np.ndarray) -> float:
    from tasks.curation.asd import detect_faces

    track = detect_faces(np.stack([np.asarray(f) for f in frames]))
    boxes = track.boxes[track.found]
    return float(np.median(boxes[:, 2] - boxes[:, 0]) / frames.shape[2]) if len(boxes) else 0.0


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """The demo corpus (4 conversations, faces: the bundled photos and the shared avatars) and real clips (a
    missing folder too) curated in one run."""
    root = tmp_path_factory.mktemp("two_sources")
    local = root / "local"
    local.mkdir()
    for name in ("head_1", "multiturn_1"):
        shutil.copy(shared_path("fixtures", "speakervid", f"{name}.mp4"), local / f"{name}.mp4")
    for side in ("pair_a", "pair_b"):  # one conversation whose names do not say so: curate.local_groups does
        shutil.copy(shared_path("fixtures", "speakervid", "half_body_1.mp4"), local / f"{side}.mp4")
    avatars = shared_path("fixtures", "avatars")
    cfg = _cfg(root, "corpus.num_conversations=4", "corpus.duration_s=3", "corpus.big_turn_prob=0",
               f"corpus.extra_faces_dirs=[{avatars}]", "curate.sources=[synthetic, local]",
               f"curate.local_dirs=[{local}, {root / 'absent'}]", "curate.local_groups={pair_a: pair, pair_b: pair}",
               "curate.max_duration_s=4", "curate.val_min_conversations=1", "curate.val_fraction=0",
               "curate.unseen_identities=[fashion_blogger]")  # fmt: skip
    run_corpus(cfg, root, progress=False)
    result = run_curate(cfg, root, progress=False)
    return root, cfg, result, pd.read_parquet(root / cfg.curate.manifest)


def test_two_sources_in_one_run_split_by_conversation(two_sources):
    root, cfg, result, table = two_sources
    m = result.metrics
    assert set(table.source) == {"synthetic", "local"} and len(table) == 8 + 4
    assert m["local_dirs_skipped"] == 1 and f"{root / 'absent'} is absent" in result.summary
    ok = table[table.status == "ok"]
    assert len(ok) >= 10, table[["clip_id", "status", "reason"]]
    # a conversation (and the audio its clips share) is never split
    assert (table.groupby("group")["split"].nunique() == 1).all()
    assert table.set_index("clip_id").loc[["pair_a", "pair_b"], "group"].tolist() == ["pair", "pair"]
    # the unseen identity is held out whole, and only it and its partner are in `unseen`
    assert set(ok.loc[ok.identity == "fashion_blogger", "split"]) == {"unseen"}
    assert set(ok.loc[ok.split == "unseen", "identity"]) == {"fashion_blogger", "boy"}
    # each source keeps its minimum of held-out conversations, and training keeps some of each
    for source in ("synthetic", "local"):
        part = ok[ok.source == source]
        assert part.loc[part.split == "val", "group"].nunique() >= 1, source
        assert (part.split == "train").any(), source
    # the synthetic val conversation shows people seen in training (held out by conversation, not by person)
    synth_val = ok[(ok.source == "synthetic") & (ok.split == "val")]
    assert set(synth_val.identity) <= set(ok.loc[ok.split == "train", "identity"])
    # only training clips are selected, and the small corpus keeps at least balance_min_keep of them
    assert not table.loc[table.split != "train", "selected"].any()
    train_ok = ok[ok.split == "train"]
    assert train_ok.selected.sum() >= np.ceil(cfg.curate.balance_min_keep * len(train_ok)) - 1e-9
    for s in ("train", "val", "unseen"):
        assert m[f"split_{s}_clips"] == (ok.split == s).sum()
        assert m[f"split_{s}_conversations"] == ok.loc[ok.split == s, "group"].nunique()
    splits = json.loads((root / cfg.curate.report_dir / "splits.json").read_text())
    assert splits["unseen_identities"] == ["fashion_blogger"] and splits["balance"]
    assert (root / cfg.curate.report_dir / "curated_frames.png").stat().st_size > 10_000


def test_no_audio_is_shared_between_training_and_held_out_clips(two_sources):
    """Partners (and the two copies of one real clip) carry the same audio, and share a split; no held-out
    clip's audio matches a training clip's."""
    root, cfg, _, table = two_sources
    ok = table[table.status == "ok"]
    audio = {r.clip_id: read_audio(root / r.video_path, 16000, duration=2.5) for r in ok.itertuples()}
    split = dict(zip(ok.clip_id, ok.split, strict=True))
    same = [(a, b) for a in audio for b in audio if a < b and _audio_corr(audio[a], audio[b]) > 0.9]
    assert same and all(split[a] == split[b] for a, b in same), same
    for held in ok.loc[ok.split != "train", "clip_id"]:
        for train in ok.loc[ok.split == "train", "clip_id"]:
            assert abs(_audio_corr(audio[held], audio[train])) < 0.5, (held, train)


def test_real_clips_without_a_box_are_cropped_around_the_head(two_sources):
    root, cfg, _, table = two_sources
    rows = table[(table.source == "local") & (table.status == "ok")].set_index("clip_id")
    for clip in ("head_1", "multiturn_1"):  # a head shot (1440x1080) and a wide interview frame (1920x1080)
        src = read_frames(shared_path("fixtures", "speakervid", f"{clip}.mp4"), width=256, duration=1.0)
        out = read_frames(root / rows.loc[clip, "video_path"], duration=1.0)
        assert out.shape[1:3] == (cfg.video.height, cfg.video.width) and rows.loc[clip, "crop_box"]
        # the face fills most of the frame (the face box over the frame width), whatever the source's framing
        share, before = _face_width_share(np.stack([_up(f) for f in out])), _face_width_share(src)
        assert share >= 0.45, (clip, share, before)
        if clip == "multiturn_1":  # the face was a fifth of the wide frame
            assert before < 0.3 and share > 2 * before, (share, before)


def _up(frame: np.ndarray, factor: int = 3) -> np.ndarray:
    import cv2

    return cv2.resize(frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)  # mediapipe wants pixels
