"""Bad input never stops a curation batch, and a run killed halfway resumes without redoing or losing clips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.media import ffmpeg_exe, probe
from tasks.config import load_config
from tasks.curation.build import run_curate
from tests.conftest import REPO, shared_path, tool_env

pytestmark = pytest.mark.slow
FAST = ["tracking.enabled=false", "curate.pose_stride=3", "curate.analysis_width=320", "curate.min_duration_s=1.5",
        "curate.asd_durations=[1.0,2.0]"]  # fmt: skip


def _ff(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def _cfg(root, clips, *sets):
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    return load_config(sets=[*FAST, f"curate.asd_weights={weights}", "curate.sources=[local]",
                             f"curate.local_dirs=[{clips}]", *sets], root=root)  # fmt: skip


@pytest.fixture(scope="module")
def bad_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    clips = root / "clips"
    clips.mkdir()
    src = shared_path("fixtures", "speakervid", "head_4.mp4")
    _ff("-i", str(src), "-t", "3", "-c", "copy", str(clips / "good.mp4"))
    _ff("-i", str(src), "-t", "3", "-c:v", "copy", "-ar", "8000", "-ac", "2", "-c:a", "aac", str(clips / "stereo_8k.mp4"))
    _ff("-i", str(src), "-t", "3", "-c", "copy", "-an", str(clips / "no_audio.mp4"))
    _ff("-i", str(src), "-t", "3", "-vn", "-c:a", "aac", str(clips / "no_video.mp4"))
    _ff("-i", str(src), "-t", "0", "-c", "copy", str(clips / "zero.mp4"))
    _ff("-f", "lavfi", "-i", "mandelbrot=size=320x320:rate=25", "-i", str(src), "-map", "0:v", "-map", "1:a",
        "-t", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(clips / "no_face.mp4"))  # fmt: skip
    data = (clips / "good.mp4").read_bytes()
    (clips / "truncated.mp4").write_bytes(data[: len(data) // 3])
    shutil.copy(clips / "good.mp4", clips / "odd name; $(reboot).mp4")
    cfg = _cfg(root, clips)
    result = run_curate(cfg, root, progress=False)
    table = pd.read_parquet(root / cfg.curate.manifest).set_index("clip_id")
    return root, cfg, result, table


def test_every_bad_clip_is_a_row_with_a_reason(bad_batch):
    root, cfg, result, table = bad_batch
    assert len(table) == 8 and table.index.is_unique
    assert table.loc["good", "status"] == "ok"
    assert table.loc["no_audio", "status"] == "failed" and "no audio stream" in table.loc["no_audio", "reason"]
    assert table.loc["no_video", "status"] == "failed" and "no video stream" in table.loc["no_video", "reason"]
    assert table.loc["zero", "status"] in ("failed", "rejected") and table.loc["zero", "reason"]
    assert table.loc["truncated", "status"] == "failed" and "truncated.mp4" in table.loc["truncated", "reason"]
    assert table.loc["no_face", "status"] == "rejected" and "face found in" in table.loc["no_face", "reason"]
    # a clip the filters reject is not scored by the (costly) speaker detector: no mask, no ratio guessed
    assert pd.isna(table.loc["no_face", "mask_path"]) and pd.isna(table.loc["no_face", "listen_ratio"])
    assert not (root / cfg.curate.out_dir / "masks" / "no_face.npy").exists()
    for reason in table.loc[table["status"] != "ok", "reason"]:
        assert reason and len(reason) < 400
    assert set(result.failures) == set(table.index[table["status"] == "failed"])


def test_odd_audio_and_odd_names_are_normalised(bad_batch):
    root, cfg, _, table = bad_batch
    row = table.loc["stereo_8k"]
    assert row["status"] == "ok", row["reason"]
    info = probe(root / row["video_path"])
    assert (info.sample_rate, info.channels) == (16000, 1)
    odd = [cid for cid in table.index if cid.startswith("odd_name")]
    assert odd == ["odd_name_reboot"] and table.loc[odd[0], "status"] == "ok"
    assert (root / table.loc[odd[0], "video_path"]).parent == root / cfg.curate.out_dir / "clips"


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """cut(start_s): a 2.5 s cut of a real clip from ``start_s``, encoded once per module (the tests copy it)."""
    where, made = tmp_path_factory.mktemp("cuts"), {}

    def get(start_s: int) -> Path:
        if start_s not in made:
            made[start_s] = where / f"cut_{start_s}.mp4"
            _ff("-ss", str(start_s), "-i", str(shared_path("fixtures", "speakervid", "head_4.mp4")), "-t", "2.5",
                "-c:v", "libx264", "-c:a", "aac", str(made[start_s]))  # fmt: skip
        return made[start_s]

    return get


def _curate_command(root, n: int, workers: int, cut) -> tuple[list[str], object]:
    """``n`` 2.5 s cuts of a real clip under root/clips, a project at root, and the `streamavatar curate`
    command line over them (plus its config)."""
    clips = root / "clips"
    clips.mkdir()
    for i in range(n):
        shutil.copy(cut(i % 5), clips / f"part_{i}.mp4")
    weights = shared_path("models", "light-asd", "finetuning_TalkSet.model")
    sets = [*FAST, f"curate.asd_weights={weights}", "curate.sources=[local]", f"curate.local_dirs=[{clips}]",
            f"curate.workers={workers}"]  # fmt: skip
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    cmd = [sys.executable, "-m", "flows.cli", "curate", *[a for s in sets for a in ("--set", s)]]
    return cmd, _cfg(root, clips, f"curate.workers={workers}")


def test_killed_run_resumes_without_redoing_or_duplicating(tmp_path, cut):
    root = tmp_path
    cmd, cfg = _curate_command(root, 5, workers=1, cut=cut)
    proc = subprocess.Popen(cmd, cwd=REPO, env=tool_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    journal = root / cfg.curate.out_dir / "rows"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(journal.glob("*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.stem for p in journal.glob("*.json"))
    assert 2 <= len(done) < 5, done
    assert not (root / cfg.curate.manifest).exists()  # it died before writing the manifest

    result = run_curate(cfg, root, progress=False)
    assert result.metrics["clips_processed"] == 5 - len(done)  # finished clips are not redone
    table = pd.read_parquet(root / cfg.curate.manifest)
    assert sorted(table["clip_id"]) == [f"part_{i}" for i in range(5)]  # nothing lost, nothing twice
    assert (table["status"] == "ok").all(), table[["clip_id", "reason"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_main_process_stops_curate_and_its_workers(tmp_path, sig, cut):
    """SIGTERM (a Prefect cancellation, a scheduler) or SIGINT sent to `streamavatar curate` alone: the main
    process exits within seconds, its two pool workers end with it (no orphans curating on), the clips it
    finished stay, and the manifest is not written half-done."""
    import psutil

    root = tmp_path
    cmd, _ = _curate_command(root, 16, workers=2, cut=cut)  # ~45 s of work left when the signal comes: a run that waits is caught
    proc = subprocess.Popen(cmd, cwd=REPO, env=tool_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []  # stderr read from the start: a full pipe must never be what holds the run up
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    journal = root / "data/curated/rows"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(journal.glob("*.json")):
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers  # the spawn pool is running
    os.kill(proc.pid, sig)  # the main process only, not its group
    try:
        proc.wait(timeout=20)  # the workers get 5 s after SIGTERM before SIGKILL, then the interpreter exits
    except subprocess.TimeoutExpired:
        stacks = {p.pid: p.status() for p in [psutil.Process(proc.pid), *workers] if p.is_running()}
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"curate still running 20 s after {sig.name}; process states {stacks}; stderr tail: "
                    f"{''.join(lines)[-1500:]}")  # fmt: skip
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-2000:]
    assert "finished work is kept" in err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers still running: {alive}"
    done = list(journal.glob("*.json"))
    assert 1 <= len(done) < 16, done  # finished clips kept, the rest not curated after the signal
    assert not (root / "data/manifests/curated.parquet").exists()
