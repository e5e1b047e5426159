"""The MLflow model registry: the promotion rule on numbers, then on a tiny project: students registered as
versions with the alias `candidate`, re-evaluation making the first one champion, comparing the next on the
fixed set, recording why, and never promoting a candidate that is not better (the champion's own weights)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tasks.common.model_registry import CANDIDATE, CHAMPION, TAG, decide
from tests.training_data import make_project, tiny_config

RULES = {"lip_corr": "max", "flicker": "min", "sync_c": "max"}


def test_decide_promotes_only_better_and_never_worse():
    champ = {"lip_corr": 0.30, "flicker": 10.0, "sync_c": None}
    better = decide({"lip_corr": 0.40, "flicker": 10.0, "sync_c": None}, champ, RULES, 0.01, "champion v1")
    assert better.promote and better.better == ["lip_corr"] and better.ties == ["flicker"]
    assert better.skipped == ["sync_c"] and "lip_corr 0.4 vs 0.3" in better.reason and "sync_c" in better.reason
    mixed = decide({"lip_corr": 0.40, "flicker": 12.0}, champ, RULES, 0.01, "champion v1")
    assert not mixed.promote and mixed.worse == ["flicker"] and mixed.reason.startswith("kept champion v1")
    assert "worse on flicker 12 vs 10" in mixed.reason and "better on lip_corr" in mixed.reason
    # inside the tolerance is a tie, on every metric: not promoted
    tie = decide({"lip_corr": 0.301, "flicker": 9.95}, champ, RULES, 0.01)
    assert not tie.promote and tie.ties == ["lip_corr", "flicker"] and "no metric better" in tie.reason
    # a lower flicker is better
    assert decide({"lip_corr": 0.30, "flicker": 5.0}, champ, RULES, 0.01).promote
    # nothing comparable (NaN / missing): keep the champion and say why
    none = decide({"lip_corr": math.nan}, champ, {"lip_corr": "max", "fid": "min"}, 0.01)
    assert not none.promote and none.skipped == ["lip_corr", "fid"] and "no compared metric" in none.reason
    first = decide({"lip_corr": 0.1}, None, RULES, 0.01)
    assert first.promote and "no champion yet" in first.reason


def test_unknown_compare_metric_is_a_config_error(tmp_path):
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="registry.compare.*unknown metric"):
        load_config(sets=["registry.compare.accuracy=max"], root=tmp_path)


def test_compare_metrics_are_the_evaluation_metrics():
    from tasks.config import RegistryConfig
    from tasks.evaluation.evaluate import SCALARS

    cfg = RegistryConfig(compare={k: "max" for k in (*SCALARS, "fid", "fvd")})  # every metric is accepted
    assert set(cfg.compare) == {*SCALARS, "fid", "fvd"}


# ------------------------------------------------------------------------------------ on a tiny project
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tasks.training.teacher import run_teacher

    root = make_project(tmp_path_factory.mktemp("registry"))
    cfg = tiny_config(root)
    cfg.teacher.iterations = 1
    run_teacher(cfg, root, progress=False)  # data/latents with a validation window: the fixed set
    return root


def _cfg(root):
    cfg = tiny_config(root)
    cfg.tracking.enabled = True
    cfg.evaluate.teacher = False
    return cfg


def _student_checkpoint(cfg, path, seed: int):
    """A student checkpoint as the distill/refine stages write it, with seeded random weights."""
    from tasks.common.models import build_audio, build_dit

    torch.manual_seed(seed)
    dit = build_dit(cfg, build_audio(cfg).token_dim, pretrained=False)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": dit.state_dict(), "step": seed}, path)
    return path


def _register(cfg, root, path):
    from tasks.common import tracking
    from tasks.common.model_registry import register_student

    with tracking.stage_run(cfg, root, "refine", {}):
        return register_student(cfg, root, path, stage="refine")


def test_registry_versions_aliases_and_promotion(project):
    import mlflow
    from mlflow import MlflowClient

    from tasks.common import tracking
    from tasks.evaluation.reevaluate import run_reevaluation

    cfg = _cfg(project)
    name = cfg.registry.model_name
    a = _student_checkpoint(cfg, project / "ckpt" / "a.pt", seed=1)
    b = _student_checkpoint(cfg, project / "ckpt" / "b.pt", seed=2)
    v1 = _register(cfg, project, a)
    tracking.setup(cfg, project)
    client = MlflowClient()
    assert v1["version"] == "1" and str(client.get_model_version_by_alias(name, CANDIDATE).version) == "1"
    mv = client.get_model_version(name, "1")
    assert mv.tags[TAG + "stage"] == "refine" and len(mv.tags[TAG + "checkpoint_sha256"]) == 64

    # no champion yet: the first candidate becomes champion, and the reason says so
    first = run_reevaluation(cfg, project, progress=False)
    assert first["decision"]["promote"] and "no champion yet" in first["decision"]["reason"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert client.get_model_version(name, "1").tags[TAG + "decision"] == "promoted"

    # a second student: champion and candidate are measured on the same fixed set and compared
    v2 = _register(cfg, project, b)
    assert v2["version"] == "2" and str(client.get_model_version_by_alias(name, CANDIDATE).version) == "2"
    second = run_reevaluation(cfg, project, progress=False)
    rows = second["rows_added"]
    assert [r["alias"] for r in rows] == [CHAMPION, CANDIDATE]
    assert rows[0]["eval_set_digest"] == rows[1]["eval_set_digest"]
    assert rows[0]["checkpoint_sha256"] != rows[1]["checkpoint_sha256"]
    expected = decide(rows[1], rows[0], cfg.registry.compare, cfg.registry.tolerance, "champion v1")
    assert second["decision"]["promote"] == expected.promote and second["decision"]["reason"] == expected.reason
    tags = client.get_model_version(name, "2").tags
    assert tags[TAG + "decision"] == ("promoted" if expected.promote else "kept-champion")
    assert tags[TAG + "decision_reason"] == expected.reason and tags[TAG + "compared_to"] == "v1"
    assert "Re-evaluation: " + expected.reason in client.get_model_version(name, "2").description
    champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
    assert champion == ("2" if expected.promote else "1")

    # the champion's own weights registered again: every metric ties, so it is NOT promoted
    same = _register(cfg, project, project / "ckpt" / ("b.pt" if champion == "2" else "a.pt"))
    third = run_reevaluation(cfg, project, progress=False)
    assert not third["decision"]["promote"], third["decision"]["reason"]
    assert "no metric better" in third["decision"]["reason"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion
    assert client.get_model_version(name, same["version"]).tags[TAG + "decision"] == "kept-champion"

    # the same candidate is not compared again with the same champion on the same set
    fourth = run_reevaluation(cfg, project, progress=False)
    assert [r["alias"] for r in fourth["rows_added"]] == [CHAMPION] and fourth["decision"] is None

    history = pd.read_parquet(fourth["history"])
    assert len(history) == 1 + 2 + 2 + 1
    assert history.decision.tolist()[:3] == ["promoted", "", second["rows_added"][1]["decision"]]
    assert (project / cfg.evaluate.history_dir / "history.png").stat().st_size > 10_000
    # the re-evaluation runs are in MLflow with the decision
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`streamavatar.kind` = 'reevaluation'")
    assert len(runs) == 4
    decided = [r for r in runs if "streamavatar.decision" in r.data.tags]
    assert len(decided) == 3 and {"champion/flicker", "candidate/flicker"} <= set(
        next(r for r in runs if "candidate/flicker" in r.data.metrics).data.metrics)


def test_registered_model_makes_a_video(project, tmp_path, monkeypatch):
    """The registered version is a working MLflow model: load it by alias, predict a video."""
    import mlflow

    from tasks.common import tracking
    from tests.conftest import shared_path

    monkeypatch.setenv("STREAMAVATAR_ROOT", str(project))  # where the model's relative paths resolve
    cfg = _cfg(project)
    reference = shared_path("fixtures", "avatars")
    image = sorted(reference.glob("*.jpg"))[0]
    audio = sorted(reference.glob("*.wav"))[0]
    _register(cfg, project, _student_checkpoint(cfg, project / "ckpt" / "c.pt", seed=3))
    tracking.setup(cfg, project)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@{CANDIDATE}")
    out = tmp_path / "avatar.mp4"
    pred = model.predict(pd.DataFrame([{"reference": str(image), "audio": str(audio), "out": str(out),
                                        "seconds": 1.0}]))  # fmt: skip
    assert out.is_file() and out.stat().st_size > 1000
    assert int(pred.frames.iloc[0]) == math.ceil(1.0 * cfg.video.fps)


@pytest.mark.slow
def test_registered_model_is_self_contained_in_a_fresh_venv(project, tmp_path):
    """The registered model carries its code (code_paths), its weights (checkpoint + VAE) and pinned
    requirements: a fresh venv with ONLY those requirements (no streamavatar, no checkout, another cwd) loads it
    with mlflow.pyfunc.load_model and makes the same video the project's own environment makes."""
    import os
    import subprocess
    import sys

    import mlflow

    from tasks.common import tracking
    from tasks.common.media import read_frames
    from tasks.common.models import build_causal_ae, causal_ae_spec
    from tests.conftest import shared_path

    cfg = _cfg(project)
    torch.manual_seed(7)  # a VAE weights file, so the model has one to bundle
    ae = build_causal_ae(cfg)
    vae_file = project / "weights" / "tiny_vae.pt"
    vae_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": ae.state_dict(), "latents_mean": [0.0] * cfg.vae.z_dim,
                "latents_std": [1.0] * cfg.vae.z_dim, "spec": causal_ae_spec(cfg)}, vae_file)  # fmt: skip
    cfg.vae.pretrained_path = "weights/tiny_vae.pt"  # relative: resolved against the project at registration
    cfg.audio.vad = "energy"  # (silero-vad would be one more requirement; the demo's own setting is covered above)
    version = _register(cfg, project, _student_checkpoint(cfg, project / "ckpt" / "fresh.pt", seed=4))
    tracking.setup(cfg, project)
    model_dir = Path(mlflow.artifacts.download_artifacts(version["model_uri"], dst_path=str(tmp_path / "dl")))
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert "streamavatar" not in " ".join(reqs) and all("==" in r for r in reqs), reqs
    assert {"model", "tasks"} <= {p.name for p in (model_dir / "code").iterdir()}
    assert any((model_dir / "artifacts").rglob("tiny_vae.pt"))  # the VAE weights travel with the model

    avatars = shared_path("fixtures", "avatars")
    image, audio = sorted(avatars.glob("*.jpg"))[0], sorted(avatars.glob("*.wav"))[0]
    script = (
        "import sys, pandas as pd, mlflow.pyfunc\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "print(m.predict(pd.DataFrame([{'reference': sys.argv[2], 'audio': sys.argv[3], 'out': sys.argv[4],"
        " 'seconds': 1.0}])).to_json())\n"
    )
    (tmp_path / "run.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMAVATAR", "PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # --no-compile: byte-compiling every installed file (torch's thousands) took half of pip's 76 s; the few
    # modules the model imports are compiled when it loads
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", "-r",
                              str(model_dir / "requirements.txt")], env=env, capture_output=True, text=True)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    missing = subprocess.run([py, "-c", "import tasks"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode != 0  # the project is not importable there: only the model's own code is
    fresh = tmp_path / "fresh.mp4"
    run = subprocess.run([py, str(tmp_path / "run.py"), str(model_dir), str(image), str(audio), str(fresh)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"frames":{"0":' + str(math.ceil(cfg.video.fps)) in run.stdout.replace(" ", "")
    # the same video as the project's environment makes with the same registered model
    here = tmp_path / "here.mp4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame([{"reference": str(image), "audio": str(audio),
                                                                        "out": str(here), "seconds": 1.0}]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    a, b = read_frames(fresh).astype(float), read_frames(here).astype(float)
    assert a.shape == b.shape and abs(a - b).mean() < 1.0
