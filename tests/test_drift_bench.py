"""`bench --drift`: the paper's Table 1 in miniature (rolling / + reference sink / + sink + RAPR with the
distilled student, + GAN with the refined one).

The bench only means something if the settings really are the same stream up to what the ablation changes:
the first chunk (whose cache is the reference alone in every layout) must be bit-identical across the
layouts, the baseline must part from the sink settings once its rolling window has evicted the reference,
and + GAN must stream other weights. The face metrics must be the evaluate stage's own.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from flows.cli import build_parser
from flows.cli import main as cli_main
from tasks.common.media import read_frames
from tasks.common.models import build_audio, build_dit
from tasks.config import ConfigError, load_config
from tasks.evaluation import metrics
from tasks.evaluation.drift_bench import (
    BASELINE,
    GAN,
    LEGACY,
    METRICS,
    SETTINGS,
    SINK,
    SINK_RAPR,
    drift_inputs,
    drift_layouts,
    face_landmarks,
    face_measures,
    format_report,
    run_drift_bench,
    same_indices,
)
from tests.conftest import REPO, shared_path

FRAMES, WINDOW_S = 60, 0.5
# a random VAE: no trained weights needed; the paper's sink (reference + first chunk), so that the legacy and the
# ordered RAPR rules differ
TINY = ["tracking.enabled=false", "vae.pretrained_path=null", "student.sink_frames=4"]


def save_student(cfg, path, perturb: float = 0.0, step: int = 7):
    """A seeded random student saved as a training checkpoint; ``perturb`` moves every weight a little."""
    dit = build_dit(cfg, build_audio(cfg).token_dim, pretrained=False)
    g = torch.Generator().manual_seed(1)
    state = {k: v + perturb * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in dit.state_dict().items()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "step": step}, path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run on the demo profile, random distilled student, a perturbed random '+ GAN' student, in an
    empty root (no data/latents: a fallback source)."""
    root = tmp_path_factory.mktemp("drift")
    cfg = load_config(sets=TINY, root=REPO)
    gan = save_student(cfg, root / "gan.pt", perturb=0.05)
    streams: dict[str, torch.Tensor] = {}
    report = run_drift_bench(cfg, root, frames=FRAMES, checkpoint="random", window_s=WINDOW_S, progress=False,
                             streams_out=streams, gan_checkpoint=gan)  # fmt: skip
    return cfg, report, streams


def test_report_has_five_settings_with_finite_series(bench):
    cfg, report, _ = bench
    json.loads(json.dumps(report))  # plain JSON
    keys = ("frames", "window_s", "windows", "window_edges_s", "students", "reference_source", "audio_source",
            "reference_face_found", "hardware", "settings", "wall_s", "interpretation", "feature_space",
            "flat_grey_frame")  # fmt: skip
    for key in keys:
        assert key in report, key
    names = ("baseline rolling cache", "+ reference sink", "+ sink + RAPR", "+ sink + RAPR (legacy)", "+ GAN")
    assert tuple(report["settings"]) == SETTINGS == names
    assert set(METRICS) >= {"identity_dist", "face_rate", "latent_cosine", "latent_rel_l2", "pixel_mad"}
    windows = math.ceil(FRAMES / (WINDOW_S * cfg.video.fps))
    assert report["windows"] == windows == len(report["window_edges_s"])
    assert "random" in report["students"]["distill"]["label"] and report["trained_student"] is False
    assert report["students"]["refine"]["label"].endswith("gan.pt")
    assert [report["settings"][n]["student"] for n in SETTINGS] == ["distill"] * 4 + ["refine"]
    assert "data/latents" not in report["reference_source"]  # the tmp root has none: a fixture or synthetic
    for name, row in report["settings"].items():
        assert "skipped" not in row and row["seconds"] > 0, name
        for metric in METRICS:
            m = row["metrics"][metric]
            assert len(m["series"]) == windows, (name, metric)
            values = [*m["series"], m["first"], m["last"], m["slope_per_min"]]
            assert all(math.isfinite(v) for v in values), (name, metric, m)
            assert m["first"] == m["series"][0] and m["last"] == m["series"][-1]
        assert all(0 <= v <= 1 for v in row["metrics"]["face_rate"]["series"]), name
        assert all(0 <= v <= 2 for v in row["metrics"]["identity_dist"]["series"]), name
    assert report["flat_grey_frame"]["identity_dist"] == 1.0  # a constant frame is uncorrelated: NCC 0
    assert "RANDOMLY INITIALISED" in report["interpretation"]
    text = format_report(report)
    assert all(name in text for name in SETTINGS) and "identity distance" in text and "face rate" in text


def test_settings_differ_only_where_the_ablation_differs(bench):
    cfg, report, streams = bench
    chunk = 4 * cfg.student.chunk_frames
    assert {k: v.shape for k, v in streams.items()} == {k: (FRAMES, 3, cfg.video.height, cfg.video.width)
                                                        for k in SETTINGS}  # fmt: skip
    # chunk 1 attends to the reference only, at the same RoPE index, in every layout: bit-identical
    for name in (SINK, SINK_RAPR):
        assert torch.equal(streams[BASELINE][:chunk], streams[name][:chunk]), name
    # the baseline's rolling window drops frame 0 (at chunk 3 in the demo profile); the sink keeps it
    layouts, c = drift_layouts(cfg), cfg.student.chunk_frames
    evicted = next(k for k in range(1, 20) if 0 not in layouts[BASELINE].visible(1 + k * c, 1 + (k + 1) * c))
    assert report["settings"][SINK]["first_chunk_differing_from_baseline"] == evicted + 1
    after = slice(evicted * chunk, None)
    assert (streams[BASELINE][after] - streams[SINK][after]).abs().max() > 1e-4
    # RAPR re-encodes from the chunk whose end passes D + 1 latent frames; before that the two sinks agree
    rapr_from = next(k for k in range(20) if layouts[SINK_RAPR].shift(1 + (k + 1) * c) > 0)
    assert rapr_from * chunk < FRAMES
    assert torch.equal(streams[SINK][: rapr_from * chunk], streams[SINK_RAPR][: rapr_from * chunk])
    assert (streams[SINK][rapr_from * chunk :] - streams[SINK_RAPR][rapr_from * chunk :]).abs().max() > 1e-4
    # legacy RAPR order: it re-encodes from the chunk whose end passes D + 1 (the ordered rule waits until
    # the window fits above the sink); from there on the two streams part, and not before
    legacy_from = next(k for k in range(20) if layouts[LEGACY].shift(1 + (k + 1) * c) > 0)
    assert legacy_from < rapr_from
    assert report["settings"][LEGACY]["first_chunk_differing_from_sink_rapr"] == legacy_from + 1
    assert torch.equal(streams[LEGACY][: legacy_from * chunk], streams[SINK_RAPR][: legacy_from * chunk])
    assert "RAPR's sink order" in report["interpretation"]
    # + GAN: the sink + RAPR layout with other weights, so it differs from the first chunk on
    assert layouts[GAN] == layouts[SINK_RAPR]
    assert report["settings"][GAN]["first_chunk_differing_from_sink_rapr"] == 1


def test_the_legacy_setting_runs_only_where_the_rules_differ():
    cfg = load_config(sets=["student.sink_frames=1"], root=REPO)  # the demo: the reference alone
    layouts = drift_layouts(cfg)
    assert same_indices(layouts[SINK_RAPR], layouts[LEGACY], 500)
    cfg = load_config(sets=["student.sink_frames=4"], root=REPO)  # reference + first chunk
    layouts = drift_layouts(cfg)
    assert not same_indices(layouts[SINK_RAPR], layouts[LEGACY], 500)


def test_face_landmarks_are_the_evaluate_stages(bench):
    """The bench's FaceMesh pass gives exactly extract_keypoints' face points (which evaluate uses)."""
    cfg = bench[0]
    e = cfg.evaluate
    face = read_frames(shared_path("fixtures", "avatars", "fashion_blogger.jpg"), cfg.video.width,
                       cfg.video.height)[0]  # fmt: skip
    noise = np.random.default_rng(0).integers(0, 256, face.shape, dtype=np.uint8)
    frames = np.stack([face, noise, face[:, ::-1]])
    ours = face_landmarks(frames, e.keypoint_norm_height, e.keypoint_min_side)
    theirs = metrics.extract_keypoints(frames, e.keypoint_norm_height, e.keypoint_min_side).face
    assert np.isfinite(ours[0]).all() and np.isnan(ours[1]).all()
    np.testing.assert_array_equal(ours, theirs)


def test_face_measures_per_window(bench):
    """The reference itself for the first window, noise for the second: identity 0 -> ~1, face rate 1 -> 0."""
    cfg = bench[0]
    fps = cfg.video.fps
    face = read_frames(shared_path("fixtures", "avatars", "fashion_blogger.jpg"), cfg.video.width,
                       cfg.video.height)[0]  # fmt: skip
    per = round(WINDOW_S * fps)  # 12.5 frames at 25 fps: 13 frames in window 0, 12 in window 1
    noise = np.random.default_rng(0).integers(0, 256, (per, *face.shape), dtype=np.uint8)
    frames = np.concatenate([np.stack([face] * 13), noise])
    out = face_measures(cfg, frames, face, WINDOW_S)
    assert out["face_rate"] == [1.0, 0.0]
    assert out["identity_dist"][0] == pytest.approx(0.0, abs=1e-9)
    assert abs(out["identity_dist"][1] - 1.0) < 0.1
    assert out["face_box_frames"] == 13


def test_cli_skips_a_missing_student_and_draws_the_plot(tmp_path, monkeypatch, capsys):
    """Only distill/final.pt exists: '+ GAN' is skipped with the reason; the report lists its plot."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    cfg = load_config(sets=TINY, root=tmp_path)
    save_student(cfg, tmp_path / cfg.train.checkpoint_dir / "distill" / "final.pt")
    monkeypatch.setenv("STREAMAVATAR_ROOT", str(tmp_path))
    sets = [a for s in TINY for a in ("--set", s)]
    assert cli_main(["bench", "--drift", "--frames", "24", "--window-s", "0.4", *sets]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "data/reports/drift_bench.json").read_text())
    gan = report["settings"][GAN]
    assert set(gan) == {"student", "skipped"} and gan["student"] == "refine"
    assert "refine/final.pt" in gan["skipped"] and "refine/final.pt" in report["students"]["refine"]["skipped"]
    assert all("skipped" not in report["settings"][n] for n in (BASELINE, SINK, SINK_RAPR))
    assert report["students"]["distill"]["trained"] is True and report["students"]["distill"]["step"] == 7
    assert "'+ GAN' was skipped" in report["interpretation"] and "skipped" in out
    assert report["plot"] == "data/reports/drift_bench.png"
    png = (tmp_path / report["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    args = build_parser().parse_args(["bench", "--drift"])
    assert (args.frames, args.window_s, args.checkpoint, args.gan_checkpoint) == (1500, 10.0, None, None)


def test_without_latents_or_fixtures_the_inputs_are_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMAVATAR_SHARED", str(tmp_path / "no-shared"))
    cfg = load_config(sets=["tracking.enabled=false"], root=REPO)
    inputs = drift_inputs(cfg, tmp_path, samples=48_000)
    assert inputs.reference.shape == (3, cfg.video.height, cfg.video.width)
    assert inputs.reference.abs().max() <= 1 and inputs.reference.std() > 0
    assert inputs.avatar.shape == inputs.other.shape == (48_000,)
    assert inputs.avatar.abs().sum() > 0 and inputs.other.abs().sum() > 0  # both talking and listening turns
    assert "synthetic" in inputs.reference_source and "synthetic" in inputs.audio_source


def test_missing_checkpoint_is_refused_with_the_way_out(tmp_path, monkeypatch, capsys):
    cfg = load_config(sets=["tracking.enabled=false"], root=REPO)
    with pytest.raises(ConfigError, match="make demo"):
        run_drift_bench(cfg, tmp_path, frames=12, progress=False)
    with pytest.raises(ConfigError, match="no such file"):
        run_drift_bench(cfg, tmp_path, frames=12, progress=False, checkpoint="random", gan_checkpoint="nope.pt")
    monkeypatch.setenv("STREAMAVATAR_ROOT", str(tmp_path))
    assert cli_main(["bench", "--drift", "--frames", "12"]) == 2
    assert "make demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--drift", "--model-only"])  # one benchmark at a time
