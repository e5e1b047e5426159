"""The curate flow on a local Dask cluster (prefect-dask, 2 worker processes) gives the manifest the local
process pool gives."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from flows.curate import build_task_runner
from tasks.config import ConfigError, load_config
from tasks.curation.build import run_curate
from tests.conftest import REPO, shared_path, tool_env

pytestmark = pytest.mark.slow


def _clips(folder, n=3):
    from tasks.common.media import ffmpeg_exe

    folder.mkdir(parents=True)
    for i, name in enumerate(("head_4", "half_body_1", "side_2")[:n]):
        src = shared_path("fixtures", "speakervid", f"{name}.mp4")
        subprocess.run([ffmpeg_exe(), "-v", "error", "-ss", str(i), "-i", str(src), "-t", "3", "-c:v", "libx264",
                        "-c:a", "aac", str(folder / f"{name}.mp4")], check=True)  # fmt: skip
    return folder


def test_dask_runner_gives_the_same_manifest(tmp_path):
    clips = _clips(tmp_path / "clips")
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    sets = ["tracking.enabled=false", "curate.sources=[local]", f"curate.local_dirs=[{clips}]", "curate.pose_stride=3",
            f"curate.asd_weights={weights}", "curate.min_duration_s=1.5", "curate.workers=2"]  # fmt: skip

    dask_root = tmp_path / "dask"
    dask_root.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, dask_root / name)
    args = [a for s in [*sets, "curate.runner=dask"] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--stages", "curate", *args], cwd=REPO,
                          env=tool_env(dask_root), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "DaskTaskRunner" in log or "dask" in log.lower()
    assert "curate-head_4" in log  # one Prefect task per clip

    local_root = tmp_path / "local"
    local_root.mkdir()
    cfg = load_config(sets=sets, root=local_root)
    run_curate(cfg, local_root, progress=False)

    on_dask = pd.read_parquet(dask_root / cfg.curate.manifest)
    local = pd.read_parquet(local_root / cfg.curate.manifest)
    assert len(local) == 3 and set(local["status"]) <= {"ok", "rejected"}
    pd.testing.assert_frame_equal(on_dask, local, check_exact=False, rtol=1e-6)


def test_runner_choice_and_errors(tmp_path):
    from prefect_dask import DaskTaskRunner

    cfg = load_config(sets=["curate.runner=dask", "curate.workers=3"], root=tmp_path)
    runner = build_task_runner(cfg.curate)
    assert isinstance(runner, DaskTaskRunner) and runner.cluster_kwargs["n_workers"] == 3
    cfg = load_config(sets=["curate.runner=dask", "curate.runner_address=tcp://10.0.0.5:8786"], root=tmp_path)
    assert build_task_runner(cfg.curate).address == "tcp://10.0.0.5:8786"
    assert build_task_runner(load_config(root=tmp_path).curate) is None
    with pytest.raises(ConfigError, match="curate.runner"):
        load_config(sets=["curate.runner=spark"], root=tmp_path)
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="prefect-ray"):
            build_task_runner(load_config(sets=["curate.runner=ray"], root=tmp_path).curate)
