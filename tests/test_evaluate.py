"""The evaluate stage and the re-evaluation flow on a tiny trained project: the table has every system and
metric, per-window values agree with the metric functions, FID/FVD say why they are skipped (never a number
without weights), and re-evaluation appends to a history with a plot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.config import Config, ConfigError
from tests.training_data import make_project, tiny_config


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tasks.training.teacher import run_teacher

    root = make_project(tmp_path_factory.mktemp("eval"))
    cfg = tiny_config(root)
    cfg.teacher.iterations = 1
    run_teacher(cfg, root, progress=False)  # data/latents (with a val window) + the teacher checkpoint
    return root


def _cfg(root):
    cfg = tiny_config(root)
    cfg.evaluate.checkpoint = "random"  # the seeded untrained student: the wiring, not the quality
    cfg.teacher_sampler.steps = 4
    cfg.evaluate.seeds, cfg.evaluate.workers = Config().evaluate.seeds, Config().evaluate.workers  # the demo's
    return cfg


@pytest.fixture(scope="module")
def evaluated(project):
    from tasks.evaluation.evaluate import run_evaluate

    cfg = _cfg(project)
    result = run_evaluate(cfg, project, progress=False)
    return cfg, result, json.loads((project / cfg.evaluate.report).read_text())


def test_report_table_has_every_system_and_metric(evaluated, project):
    from tasks.evaluation.evaluate import DEFINITIONS, SCALARS

    cfg, result, report = evaluated
    order = ["ground_truth", "autoencoder", "teacher", "student_untrained", "student_ode_init", "student_sid", "student"]
    assert list(report["systems"]) == order  # the chain table: each training step's student, then the product's
    assert [r["system"] for r in report["table"]] == order
    # this project has a teacher but no distill stage: the chain says which checkpoints are missing
    for name in ("student_ode_init", "student_sid"):
        assert report["systems"][name]["status"].startswith("skipped: no checkpoint at")
    ok = [r for r in report["table"] if r["status"] == "ok"]
    assert [r["system"] for r in ok] == ["ground_truth", "autoencoder", "teacher", "student_untrained", "student"]
    for row in ok:
        for key in (*SCALARS, "fid", "fvd"):
            assert key in row, key
    for key in ("hkv", "lbkv", "lhkv", "lfkv", "lip_corr", "sync_c", "identity_dist", "flicker", "fid", "fvd"):
        assert key in DEFINITIONS
    # no weights configured: FID / FVD / SyncNet say so and give no number
    for system in ("teacher", "student"):
        entry = report["systems"][system]
        assert entry["fid"]["status"].startswith("skipped") and "value" not in entry["fid"]
        assert entry["fvd"]["status"].startswith("skipped") and "value" not in entry["fvd"]
        assert all(it["sync_c"] is None and it["sync_status"].startswith("skipped") for it in entry["items"])
    assert result.tables["metrics_table.json"] == report["table"]
    out = project / cfg.evaluate.out_dir
    assert (out / "table.csv").is_file() and (out / "table.md").is_file()
    assert pd.read_csv(out / "table.csv").system.tolist() == order
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == len(report["eval_set"]["items"]) >= 1
    assert json.loads((out / "eval_set.json").read_text())["digest"] == report["eval_set"]["digest"]


def test_per_window_values_are_the_metric_functions(evaluated, project):
    from tasks.evaluation import metrics
    from tasks.evaluation.evaluate import evaluation_set

    cfg, _, report = evaluated
    items, eval_set = evaluation_set(cfg, project)
    assert eval_set["digest"] == report["eval_set"]["digest"]  # a fixed set: the same windows every time
    item = items[0]
    assert item.frames.shape[0] == item.mask.shape[0] - 1  # the frames after the reference
    gt = report["systems"]["ground_truth"]["items"][0]
    direct = metrics.flicker(item.frames)
    assert gt["flicker"] == pytest.approx(direct["flicker"]) and gt["mean_abs_diff"] == pytest.approx(
        direct["mean_abs_diff"])
    ident = metrics.identity_over_time(item.frames, item.reference, cfg.video.fps, cfg.evaluate.identity_window_s)
    assert len(gt["identity_by_window"]) == len(ident["distance"])
    # the student really streamed: its frames differ from the ground truth's
    st = report["systems"]["student"]["items"][0]
    assert st["flicker"] != pytest.approx(gt["flicker"])
    # the untrained student of the chain streams the teacher's weights, not the random student evaluated here
    before = report["systems"]["student_untrained"]["items"][0]
    assert before["flicker"] != pytest.approx(st["flicker"]) and before["flicker"] != pytest.approx(gt["flicker"])
    # the autoencoder row is the window's own latents decoded: close to the ground truth, not equal to it
    from tasks.common.models import build_vae
    from tasks.evaluation.evaluate import autoencoder_frames

    ae_frames = autoencoder_frames(build_vae(cfg, root=project), item)
    assert ae_frames.shape == item.frames.shape
    ae_row = report["systems"]["autoencoder"]["items"][0]
    assert ae_row["flicker"] == pytest.approx(metrics.flicker(ae_frames)["flicker"])
    assert ae_row["flicker"] != pytest.approx(gt["flicker"])
    agg = report["systems"]["student"]["aggregate"]
    assert agg["flicker"] == pytest.approx(np.mean([it["flicker"] for it in report["systems"]["student"]["items"]]))


def test_further_seeds_pool_the_face_figures(evaluated, project):
    """evaluate.seeds: each generated system's face figures are measured again on every further noise seed
    (other frames), and its face rate, identity and pooled lip r count every seed's windows; the other figures
    (flicker, body motion) are the first seed's alone. The ground truth has one seed."""
    from tasks.evaluation import metrics
    from tasks.evaluation.benchmark import build_stream, resolve_student
    from tasks.evaluation.evaluate import (
        _lip_series,
        _load_teacher,
        evaluation_set,
        student_frames,
        student_frames_batch,
        teacher_frames,
        teacher_frames_batch,
    )

    cfg, _, report = evaluated
    assert cfg.evaluate.seeds == 3
    n = len(report["eval_set"]["items"])
    for name in ("teacher", "student", "student_untrained"):
        entry = report["systems"][name]
        more, first = entry["seed_items"], entry["items"]
        assert sorted(r["seed"] for r in more) == sorted([cfg.project.seed + 1, cfg.project.seed + 2] * n)
        agg = entry["aggregate"]
        assert agg["seeds"] == 3
        assert agg["identity_dist"] == pytest.approx(np.mean([r["identity_dist"] for r in first + more]))
        assert agg["face_rate"] == pytest.approx(np.mean([r["face_rate"] for r in first + more]))
        assert agg["flicker"] == pytest.approx(np.mean([r["flicker"] for r in first]))
        # another seed, other frames: identity differs window by window
        assert [r["identity_dist"] for r in more if r["seed"] == 1] != pytest.approx([r["identity_dist"] for r in first])
    # the chain rows measure the face alone (evaluate.chain_body false): body and hand figures n/a, said so
    assert not cfg.evaluate.chain_body
    chain_row, product_row = report["systems"]["student_untrained"]["items"][0], report["systems"]["student"]["items"][0]
    assert chain_row["body_rate"] is None and chain_row["hand_rate"] is None and chain_row["lbkv"] is None
    assert any("keypoints measured: face" in n for n in chain_row["notes"])
    assert product_row["body_rate"] is not None and product_row["hand_rate"] is not None
    assert report["systems"]["ground_truth"]["seed_items"] == []
    assert "seeds" not in report["systems"]["ground_truth"]["aggregate"]
    # the pooled lip r is over every seed's series (the teacher sees faces in this project's real frames)
    teacher = report["systems"]["teacher"]
    series = _lip_series(teacher["items"] + teacher["seed_items"])
    pooled = metrics.pooled_lagged_correlation(series, cfg.evaluate.max_lag_frames)["best_corr"]
    assert teacher["aggregate"]["lip_corr"] == (pytest.approx(pooled) if pooled is not None else None)
    # the seeds reach the generators: the student's stream and the teacher's sampler draw other noise
    items, _ = evaluation_set(cfg, project)
    gen, _ = build_stream(cfg, project, resolve_student(cfg, project, "random"))
    a, b = student_frames(cfg, gen, items[0]), student_frames(cfg, gen, items[0], seed=cfg.project.seed + 1)
    assert not np.array_equal(a, b) and np.array_equal(a, student_frames(cfg, gen, items[0]))
    assert gen.settings.seed == cfg.project.seed
    rows = student_frames_batch(cfg, gen, items[0], cfg.project.seed + 1, 2)  # the further seeds: one batch
    assert len(rows) == 2 and rows[0].shape == a.shape and not np.array_equal(rows[0], rows[1])
    assert np.array_equal(student_frames_batch(cfg, gen, items[0], cfg.project.seed, 1)[0], a)
    t, _ = _load_teacher(cfg, project, gen.audio, gen.device)
    ta = teacher_frames(cfg, t, gen.vae, gen._text, items[0])
    assert not np.array_equal(ta, teacher_frames(cfg, t, gen.vae, gen._text, items[0], seed=cfg.project.seed + 1))
    assert np.array_equal(ta, teacher_frames(cfg, t, gen.vae, gen._text, items[0], seed=cfg.project.seed))
    rows = teacher_frames_batch(cfg, t, gen.vae, gen._text, items[0], cfg.project.seed + 1, 2)
    assert len(rows) == 2 and rows[0].shape == ta.shape and not np.array_equal(rows[0], rows[1])


def test_measuring_in_worker_processes_changes_no_figure(evaluated, project):
    """evaluate.workers: the report's figures (made with the default, 2 spawned measuring processes) are those
    measured in the main process, row by row and in the same order."""
    from tasks.evaluation.evaluate import _json_default, evaluate_systems

    cfg, _, report = evaluated
    assert cfg.evaluate.workers == 2
    cfg.evaluate.workers = 0
    here = evaluate_systems(cfg, project, systems=("ground_truth", "student"), progress=False)
    def same(a, b) -> bool:  # equal structure and strings, numbers within float64 summation order
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, float) and isinstance(b, float):
            return (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-15)
        return a == b

    for name in ("ground_truth", "student"):
        for key in ("items", "seed_items", "aggregate"):
            mine = json.loads(json.dumps(here["systems"][name][key], default=_json_default))
            assert same(mine, report["systems"][name][key]), (name, key)
    assert len(report["systems"]["student"]["seed_items"]) == 2 * len(report["eval_set"]["items"])


def test_reevaluation_appends_history_and_plots(project):
    from tasks.evaluation.reevaluate import run_reevaluation

    cfg = _cfg(project)
    first = run_reevaluation(cfg, project, progress=False)
    second = run_reevaluation(cfg, project, progress=False)
    history = pd.read_parquet(first["history"])
    assert len(history) == second["rows"] == 2
    assert history.eval_set_digest.nunique() == 1
    assert history.checkpoint.str.contains("random").all() and (history.checkpoint_sha256 == "none").all()
    assert np.allclose(history.flicker, history.flicker.iloc[0])  # same student, same set: same numbers
    assert history.fid.isna().all() and history.fid_status.str.startswith("skipped").all()
    png = project / cfg.evaluate.history_dir / "history.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    # the CSV dvc.yaml's "re-evaluation history" plot draws: one row per run, the plotted figures
    table = pd.read_csv(project / cfg.evaluate.history_dir / "history.csv")
    assert list(table.run) == [1, 2] and {"lip_corr", "identity_dist", "flicker"} <= set(table.columns)
    assert np.allclose(table.flicker, history.flicker)


def test_no_validation_windows_is_a_clear_error(tmp_path):
    from tasks.evaluation.evaluate import evaluation_set

    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="no training windows"):
        evaluation_set(cfg, tmp_path)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fid_fvd_with_weight_files_give_numbers(project, tmp_path):
    """With (tiny, TorchScript) feature nets at the configured paths, FID/FVD are computed from the frames:
    the ground truth is the reference set and each system's value equals the distance computed directly."""
    from tasks.evaluation import fidelity
    from tasks.evaluation.evaluate import evaluate_systems, evaluation_set
    from tests.test_fidelity import ImageNet, VideoNet, script

    cfg = _cfg(project)
    cfg.evaluate.windows_per_clip = 2  # two clips: FVD needs a covariance
    cfg.evaluate.fvd_clip_frames = 8
    cfg.evaluate.inception_path = str(script(ImageNet(), tmp_path / "inception.pt"))
    cfg.evaluate.i3d_path = str(script(VideoNet(), tmp_path / "i3d.pt"))
    report = evaluate_systems(cfg, project, systems=("ground_truth", "student"), progress=False)
    st = report["systems"]["student"]
    assert st["fid"]["status"] == "ok" and st["fvd"]["status"] == "ok", (st["fid"], st["fvd"])
    items, _ = evaluation_set(cfg, project)
    assert st["fid"]["n_real"] == sum(len(it.frames) for it in items) == st["fid"]["n_fake"]
    assert st["fvd"]["n_real"] == len(items) == 2
    assert st["fid"]["value"] > 0
    assert report["systems"]["ground_truth"]["fid"] == {"status": "reference set"}
    gt = np.concatenate([it.frames for it in items])
    again = fidelity.fid(gt, gt, cfg.evaluate.inception_path)
    assert again["value"] == pytest.approx(0, abs=1e-3)


def test_syncnet_runs_on_face_crops_of_a_real_clip(tmp_path):
    """A SyncNet weights file (random init, syncnet_v2 key names) at evaluate.syncnet_path: the stage cuts
    face-centred crops from FaceMesh boxes and searches the 31 offsets; without a face it says why."""
    import torch

    from model.syncnet import SyncNet
    from tasks.common.media import read_audio, read_frames
    from tasks.config import Config
    from tasks.evaluation import metrics
    from tasks.evaluation.evaluate import _sync, face_boxes
    from tests.conftest import shared_path

    clip = sorted(shared_path("fixtures", "speakervid").glob("*.mp4"))[0]
    frames = read_frames(clip, width=256, fps=25, duration=1.6)
    wave = read_audio(clip, 16000, duration=1.6)
    kp = metrics.extract_keypoints(frames)
    boxes = face_boxes(kp.face, frames.shape[1], 512)
    seen = np.isfinite(boxes).all(axis=1)
    assert seen.mean() > 0.5
    assert (boxes[seen, 2] > boxes[seen, 0]).all() and (boxes[seen, 3] <= frames.shape[1] + 1).all()
    cfg = Config()
    assert _sync(cfg, frames, kp, wave)["status"] == "skipped: evaluate.syncnet_path is not set"
    cfg.evaluate.syncnet_path = str(tmp_path / "nothing.model")
    assert _sync(cfg, frames, kp, wave)["status"] == f"skipped: no weights at {tmp_path / 'nothing.model'}"
    torch.manual_seed(0)
    path = tmp_path / "syncnet_v2.model"
    torch.save({f"__S__.{k}": v for k, v in SyncNet().state_dict().items()}, path)
    cfg.evaluate.syncnet_path = str(path)
    out = _sync(cfg, frames, kp, wave)
    assert out["status"] == "ok", out
    assert len(out["dists_by_offset"]) == 31 and out["sync_d"] == pytest.approx(min(out["dists_by_offset"]))
    assert out["sync_c"] >= 0
    blank = metrics.Keypoints(kp.body * np.nan, kp.left_hand, kp.right_hand, kp.face * np.nan)
    assert _sync(cfg, frames, blank, wave)["status"] == "skipped: no face detected for the SyncNet crops"
