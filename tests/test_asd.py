"""Light-ASD: our implementation loads the released weights and behaves like an active speaker detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.asd.light_asd import LightASD, load_light_asd
from tasks.curation.asd import (
    SPEAKING,
    UNKNOWN,
    asd_scores,
    clip_threshold,
    detect_faces,
    face_crops,
    frame_f1,
    mfcc_100hz,
    smooth,
    speaking_mask,
    two_class_split,
)
from tests.conftest import shared_path


@pytest.mark.parametrize("name", ["finetuning_TalkSet.model", "pretrain_AVA_CVPR.model"])
def test_released_checkpoints_load_strictly(name):
    model = load_light_asd(shared_path("models", "light-asd", name))
    assert sum(p.numel() for p in model.parameters()) == 1_021_636
    assert not model.training
    out = model(torch.randn(2, 4 * 30, 13), torch.rand(2, 30, 112, 112) * 255)
    assert out.shape == (2, 30) and torch.isfinite(out).all()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="curate.asd_weights"):
        load_light_asd(tmp_path / "missing.model")
    bad = tmp_path / "other.model"
    torch.save({"encoder.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="encoder.weight"):
        load_light_asd(bad)


def test_frame_f1_and_smoothing_numbers():
    pred = np.array([1, 1, 0, 0, UNKNOWN, 1], dtype=np.int8)
    truth = np.array([1, 0, 0, 1, 1, 1])
    r = frame_f1(pred, truth)  # unknown frame excluded: tp=2 (0, 5), fp=1 (1), fn=1 (3)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["frames"] == 5 and r["unknown"] == 1
    assert smooth(np.array([0.0, 0, 5, 0, 0])).tolist() == pytest.approx([5 / 3, 1.25, 1.0, 1.25, 5 / 3])


def test_no_face_means_unknown_never_guessed():
    frames = np.full((30, 96, 96, 3), 128, dtype=np.uint8)  # no face anywhere
    result = speaking_mask(LightASD().eval(), frames, np.zeros(16000 * 30 // 25, dtype=np.float32), [1])
    assert (result.mask == UNKNOWN).all() and np.isnan(result.score).all()


@pytest.fixture(scope="module")
def talking_clip():
    from tasks.common.media import read_audio, read_frames

    video = shared_path("fixtures", "speakervid", "head_4.mp4")
    frames, audio = read_frames(video)[:250], read_audio(video, 16000)[: 250 * 640]
    return frames, audio


def test_real_talking_clip_is_detected_as_speaking(talking_clip):
    frames, audio = talking_clip
    model = load_light_asd(shared_path("models", "light-asd", "finetuning_TalkSet.model"))
    track = detect_faces(frames)
    assert track.found.mean() >= 0.95
    crops = face_crops(frames, track)
    assert crops.shape == (250, 112, 112) and crops.dtype == np.uint8
    real = smooth(asd_scores(model, mfcc_100hz(audio), crops, [1, 2]))
    assert (real >= 0).mean() >= 0.9  # the person talks throughout
    # evidence that both streams matter: a frozen face is called silent, silent audio lowers the score
    frozen = smooth(asd_scores(model, mfcc_100hz(audio), np.repeat(crops[:1], len(crops), 0), [1, 2]))
    mute = smooth(asd_scores(model, mfcc_100hz(audio * 0), crops, [1, 2]))
    assert frozen.mean() < 0 < real.mean()
    assert mute.mean() < real.mean()


def test_two_class_split_and_per_clip_threshold():
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(1.0, 0.3, 120), rng.normal(5.0, 0.3, 80)])
    th, gap = two_class_split(bimodal)
    assert 1.5 < th < 4.5 and gap == pytest.approx(4.0, abs=0.2)
    assert clip_threshold(bimodal, "per_clip", 0.0, 2.0, 0.1) == th  # synthetic-style clip: split between groups
    assert clip_threshold(bimodal, "fixed", 0.0, 2.0, 0.1) == 0.0
    talking_throughout = rng.normal(4.0, 0.5, 200)  # one behaviour: keep the detector's own zero
    assert clip_threshold(talking_throughout, "per_clip", 0.0, 2.0, 0.1) == 0.0
    few_outliers = np.concatenate([rng.normal(4.0, 0.2, 195), rng.normal(-3.0, 0.2, 5)])  # 2.5 % < min_share
    assert clip_threshold(few_outliers, "per_clip", 0.0, 2.0, 0.1) == 0.0
    with pytest.raises(ValueError, match="calibration"):
        clip_threshold(bimodal, "magic", 0.0, 2.0, 0.1)


def test_per_clip_calibration_leaves_a_one_behaviour_real_clip_alone(talking_clip):
    frames, audio = talking_clip
    model = load_light_asd(shared_path("models", "light-asd", "finetuning_TalkSet.model"))
    result = speaking_mask(model, frames, audio, [1, 2, 4, 6], calibration="per_clip")
    assert result.threshold == 0.0  # 10 s of talking: no second group far enough apart to split off
    assert (result.mask >= 0).all()  # every frame scored, the last one included
    assert (result.mask == 1).mean() >= 0.9


def _visual_3d(enc, x: torch.Tensor) -> torch.Tensor:
    """The visual encoder as published: the blocks' 3D convolutions and batch norms as modules, 3D pooling."""
    import torch.nn.functional as F

    def block(b, y):
        return F.relu(b.bn_last(b.last(b._path(y, 3) + b._path(y, 5))))

    pool = dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    y = F.max_pool3d(block(enc.block1, x), **pool)
    y = F.max_pool3d(block(enc.block2, y), **pool)
    return block(enc.block3, y).amax(dim=(3, 4)).transpose(1, 2)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_visual_encoder_as_2d_convolutions_equals_the_3d_form(mode):
    torch.manual_seed(0)
    model = LightASD()
    for m in model.modules():  # batch norms with statistics of their own, so that folding them is exercised
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train(mode == "train").double()  # float64: the training-mode gradients pass three batch norms
    x = torch.randn(2, 1, 12, 112, 112, dtype=torch.float64)
    reference = _visual_3d(model.visual, x)
    ours = model.visual(x)
    assert ours.shape == (2, 12, 128)
    assert torch.allclose(ours, reference, atol=1e-9, rtol=1e-9), (ours - reference).abs().max()
    if mode == "train":  # the gradient reaches every conv the same way
        ours.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.visual.named_parameters()}
        model.zero_grad()
        _visual_3d(model.visual, x).square().mean().backward()
        for n, p in model.visual.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-9, rtol=1e-7), n


def test_chunked_clip_encoding_and_shared_scores_equal_one_pass():
    torch.manual_seed(0)
    model = LightASD().eval()
    faces = torch.rand(1, 70, 112, 112) * 255
    mfcc = torch.randn(1, 280, 13)
    with torch.no_grad():
        whole = model.frame_embeddings(mfcc, faces)
        for chunk in (16, 25, 69):  # chunks with VISUAL_REACH frames of context: the same features
            assert torch.allclose(model.frame_embeddings(mfcc, faces, chunk=chunk), whole, atol=1e-5)
        # one window over the whole clip: the shared-encoder scores are the detector's own forward
        direct = model(mfcc, faces)[0].numpy()
    scores = asd_scores(model, mfcc[0].numpy(), faces[0].numpy().astype(np.uint8), [70 / 25])
    with torch.no_grad():
        direct = model(mfcc, torch.from_numpy(faces[0].numpy().astype(np.uint8))[None])[0].numpy()
    assert np.allclose(scores, direct, atol=1e-5)


def test_face_tracks_follow_one_person_across_frames():
    from tasks.curation.asd import box_iou, link_tracks

    a = np.array([[10, 10, 50, 60]], dtype=float)  # the person, in every frame
    b = np.array([[200, 20, 300, 140]], dtype=float)  # someone bigger walking through frames 4-6 only
    frames = list(range(0, 40, 2))
    dets = [np.concatenate([a + i, b + 3 * i]) if 4 <= f <= 6 else a + i for i, f in enumerate(frames)]
    dets[7] = np.array([[400, 300, 430, 330]], dtype=float)  # the person lost (a turn), someone else elsewhere
    main = link_tracks(frames, dets, 0.3)
    assert sorted(main) == [f for f in frames if f != 14]
    assert all(np.array_equal(main[f], a[0] + frames.index(f)) for f in main)  # the person's own boxes
    assert box_iou(a, b)[0, 0] == 0.0 and box_iou(a, a)[0, 0] == pytest.approx(1.0)
    assert link_tracks([0, 1], [np.zeros((0, 4)), np.zeros((0, 4))], 0.3) == {}


def test_face_detection_on_every_fifth_frame_keeps_the_track(talking_clip):
    frames, _ = talking_clip
    every = detect_faces(frames[:100])
    fifth = detect_faces(frames[:100], stride=5)
    assert fifth.found.mean() >= 0.95 and every.found.mean() >= 0.95
    ious = np.diag(_ious(every.boxes, fifth.boxes))
    assert np.median(ious) > 0.9 and ious.min() > 0.7


def _ious(a, b):
    from tasks.curation.asd import box_iou

    return box_iou(a, b)


REAL_TRUTH = Path(__file__).parent / "data" / "asd_real_truth.json"


def _stage_inputs(name: str):
    """What the curate stage gives the detector for a shared SpeakerVid clip: its analysis frames (at the
    detector's scale), its audio, its face track."""
    from tasks.common.media import probe, read_audio
    from tasks.curation.clip import analysis_frames, detector_scale

    clip = shared_path("fixtures", "speakervid", f"{name}.mp4")
    info = probe(clip)
    frames = analysis_frames(clip, info, 480, 25, None).copy()
    audio = read_audio(clip, 16000)
    n = min(len(frames), len(audio) // 640)
    frames, audio = frames[:n], audio[: n * 640]
    track = detect_faces(frames, stride=5)
    frames, track = detector_scale(clip, info, frames, track, 25, None)
    return frames, audio, track


def _stage_mask(name: str, calibration: str):
    """The curate stage's mask of a shared SpeakerVid clip (its ``score`` and ``threshold`` too)."""
    frames, audio, track = _stage_inputs(name)
    model = load_light_asd(shared_path("models", "light-asd", "finetuning_TalkSet.model"))
    return speaking_mask(model, frames, audio, [2.0, 6.0], calibration=calibration, track=track)


def _recalibrated(m, calibration: str) -> np.ndarray:
    """The mask ``m`` (a ClipMask) would have with another calibration: the same scores, the stage's rule."""
    from tasks.curation.asd import UNKNOWN, clip_threshold

    known = ~np.isnan(m.score)
    mask = np.full(len(m.mask), UNKNOWN, dtype=np.int8)
    mask[known] = (m.score[known] >= clip_threshold(m.score[known], calibration, 0.0, 2.0, 0.1)).astype(np.int8)
    return mask


@pytest.fixture(scope="module")
def real_masks():
    import json

    truth = json.loads(REAL_TRUTH.read_text())["clips"]
    masks = {}
    for n in truth:  # the detector once per clip; each calibration thresholds its scores
        m = _stage_mask(n, "fixed")
        masks[n, "fixed"], masks[n, "per_clip"] = m.mask, _recalibrated(m, "per_clip")
    return truth, masks


def test_mask_against_the_hand_checked_seconds_of_real_clips(real_masks):
    truth, masks = real_masks
    scores = {}
    for cal in ("per_clip", "fixed"):
        preds, gts = [], []
        for name, t in truth.items():
            mask = masks[name, cal]
            for s, label in enumerate(t["seconds"]):
                frames = mask[s * 25 : (s + 1) * 25]
                if label is None or not len(frames) or (frames < 0).all():
                    continue
                preds.append(int((frames[frames >= 0] == SPEAKING).mean() >= 0.5))
                gts.append(label)
        scores[cal] = frame_f1(np.array(preds, dtype=np.int8), np.array(gts))
    print("hand-checked seconds of real clips:", scores)
    # the silent tail of half_body_2 is called not speaking in both modes
    for cal in ("per_clip", "fixed"):
        tail = masks["half_body_2", cal][7 * 25 :]
        assert (tail[tail >= 0] == SPEAKING).mean() < 0.1
    # the detector's own threshold (the default on real clips) is right on every settled second; per_clip splits
    # multiturn_1's talking (one voice, pauses between phrases) into "listening" and its first seconds go wrong
    assert scores["fixed"]["f1"] >= 0.98 and scores["fixed"]["frames"] >= 45, scores
    assert 0.85 <= scores["per_clip"]["f1"] < scores["fixed"]["f1"], scores


def test_the_detector_hears_the_clips_audio_but_does_not_check_its_sync():
    """What the mask on real clips rests on (docs/data.md, "What the detector goes by on real clips"): with
    either released weights, the same voice half a clip out of step, or another person's voice, scores about as high as the face's own:
    on these clips Light-ASD tells a talking face from a still one, not who speaks. The AVA weights need a
    voice (silence scores far below zero: the audio path is alive, MFCC layout and int16 scale); the TalkSet
    weights, the default, call a talking face speaking even in silence."""
    from tasks.common.media import read_audio

    talkset = load_light_asd(shared_path("models", "light-asd", "finetuning_TalkSet.model"))
    ava = load_light_asd(shared_path("models", "light-asd", "pretrain_AVA_CVPR.model"))
    frames, own, track = _stage_inputs("head_4")
    crops = face_crops(frames, track)
    other = read_audio(shared_path("fixtures", "speakervid", "half_body_1.mp4"), 16000)[: len(own)]
    audios = {"own": own, "silence": np.zeros_like(own), "shifted": np.roll(own, len(own) // 2),
              "other voice": np.pad(other, (0, len(own) - len(other)))}  # fmt: skip
    for name, model in (("TalkSet", talkset), ("AVA", ava)):
        mean = {k: float(asd_scores(model, mfcc_100hz(a), crops, [2.0]).mean()) for k, a in audios.items()}
        print(f"head_4's mean logit by audio, {name} weights:", {k: round(v, 2) for k, v in mean.items()})
        assert abs(mean["shifted"] - mean["own"]) < 0.5 and abs(mean["other voice"] - mean["own"]) < 0.5, mean
        if name == "AVA":  # trained on conversations with voices off screen: silence is not speaking
            assert mean["own"] > 0 > mean["silence"] + 3, mean
        else:  # the default weights: a talking face with no voice at all still scores high
            assert mean["silence"] > 3 and mean["own"] - mean["silence"] < 1.0, mean


def test_auto_calibration_is_per_clip_on_renders_and_the_detectors_own_on_real_video():
    from tasks.curation.clip import calibration_for

    assert calibration_for("auto", "synthetic") == "per_clip"
    assert calibration_for("auto", "local") == calibration_for("auto", "speakervid") == "fixed"
    assert calibration_for("per_clip", "local") == "per_clip" and calibration_for("fixed", "synthetic") == "fixed"


def test_batched_windows_equal_one_window_at_a_time_and_the_device_setting():
    from tasks.curation.asd import asd_device, load_detector

    torch.manual_seed(0)
    model = LightASD().eval()
    faces = (torch.rand(1, 57, 112, 112) * 255).to(torch.uint8)
    mfcc = torch.randn(1, 4 * 57, 13)
    scores = asd_scores(model, mfcc[0].numpy(), faces[0].numpy(), [0.8, 2.0])  # windows of 20 and 50 frames
    with torch.no_grad():
        emb = model.frame_embeddings(mfcc, faces)
        runs = [torch.cat([model.classify(emb[:, s : s + w])[0] for s in range(0, 57, w)]) for w in (20, 50)]
    assert np.allclose(scores, torch.stack(runs).mean(0).numpy(), atol=1e-5)
    assert asd_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="curate.asd_device"):
            load_detector("light-asd", shared_path("models", "light-asd", "finetuning_TalkSet.model"), "cuda")
