"""The benchmark stage: every field of its report, and the pipelined mode decodes exactly what the sequential
loop does (the overlap changes when work happens, never what it computes)."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main as cli_main
from tasks.config import ConfigError, load_config
from tasks.evaluation.benchmark import build_stream, run_pipelined, run_sequential
from tests.conftest import REPO

TINY = ["tracking.enabled=false", "vae.pretrained_path=null", "benchmark.checkpoint=random", "benchmark.chunks=3", "benchmark.warmup_chunks=1"]


def _sets(*extra: str) -> list[str]:
    return [a for s in (*TINY, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    files = {"report": d / "benchmark.json", "metrics": d / "metrics.json", "latency": d / "latency.csv"}
    assert cli_main(["bench", "--json", *_sets(*(f"benchmark.{k}={v}" for k, v in files.items()))]) == 0
    return files


@pytest.fixture(scope="module")
def report(outputs):
    return json.loads(outputs["report"].read_text())


def test_dvc_files_hold_numbers_and_each_chunk(outputs, report):
    """benchmark_metrics.json (what `dvc metrics` reads): the report's figures as a flat object of numbers, equal
    to the report's; benchmark_latency.csv (a `dvc plots` plot): one row per measured chunk, in ms."""
    m = json.loads(outputs["metrics"].read_text())
    assert all(type(v) is float for v in m.values()) and len(m) >= 15
    assert m["dit_rtf"] == report["dit"]["rtf"] and m["pipelined_rtf"] == report["pipelined"]["rtf"]
    lines = outputs["latency"].read_text().splitlines()
    assert lines[0] == "chunk,sequential_ms,pipelined_ms,live_ms" and len(lines) == 1 + 3
    per = report["per_chunk_latency_s"]
    for k, line in enumerate(lines[1:]):
        cells = [float(c) for c in line.split(",")]
        assert cells[0] == k
        assert cells[1:] == pytest.approx([1e3 * per[mode][k] for mode in ("sequential", "pipelined", "live")], abs=1e-3)
    assert max(per["pipelined"]) * 1e3 >= report["pipelined"]["chunk_latency"]["p99_ms"] - 1e-6


def test_metrics_files_refuse_text(tmp_path):
    from tasks.common.stage import write_json_atomic

    with pytest.raises(ValueError, match="finite numbers"):
        write_json_atomic(tmp_path / "m.json", {"rtf": 0.5, "device": "cpu"})
    with pytest.raises(ValueError, match="finite numbers"):
        write_json_atomic(tmp_path / "m.json", {"rtf": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_report_has_every_field(report):
    for key in ("profile", "student", "hardware", "setup_s", "dit", "vae", "sequential", "pipelined", "live",
                "peak_memory", "paper_table5"):
        assert key in report, key
    for module in ("dit", "vae"):
        m = report[module]
        for key in ("rtf", "ffd_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"):
            assert m[key] > 0, (module, key)
        assert m["p50_ms"] <= m["p95_ms"] <= m["p99_ms"] <= m["max_ms"]
    chunk_s = report["profile"]["chunk_s"]
    assert chunk_s == pytest.approx(12 / 25)
    d, v = report["dit"], report["vae"]
    seq, pipe = report["sequential"], report["pipelined"]
    # definitions: module FFD is its first chunk; end-to-end FFD adds the two; latency adds the chunk
    assert seq["first_frame_delay_s"] == pytest.approx(d["ffd_s"] + v["ffd_s"])
    assert seq["latency_s"] == pytest.approx(seq["first_frame_delay_s"] + chunk_s)
    for mode in (seq, pipe):
        for key in ("rtf", "wall_s", "first_frame_delay_s", "latency_s"):
            assert mode[key] > 0, key
        assert set(mode["chunk_latency"]) >= {"p50_ms", "p95_ms", "p99_ms"}
        assert mode["real_time"] == (mode["rtf"] < 1)
        assert mode["rtf"] == pytest.approx(mode["wall_s"] / (3 * chunk_s))
    assert pipe["speedup_vs_sequential"] == pytest.approx(seq["wall_s"] / pipe["wall_s"])
    assert pipe["worker"] == "thread" and pipe["vae_device"] == "cpu"
    assert pipe["bound_by"] in ("dit", "vae") and pipe["ideal_speedup"] >= 1
    live = report["live"]
    assert live["first_frame_delay_s"] > 0 and live["chunk_latency"]["p50_ms"] > 0 and "keeps_up" in live
    assert live["latency_s"] == pytest.approx(live["first_frame_delay_s"] + chunk_s)
    assert report["peak_memory"]["process_peak_rss_bytes"] > 50 * 2**20
    hw = report["hardware"]
    assert hw["device"] == "cpu" and hw["cpu_count"] >= 1 and hw["torch"]
    assert report["paper_table5"]["dit"] == {"rtf": 0.69, "ffd_s": 0.33}
    assert "random" in report["student"]


@torch.no_grad()
def test_pipelined_decodes_what_sequential_decodes():
    cfg = load_config(sets=TINY, root=REPO)
    gen, _ = build_stream(cfg, REPO, "random")
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, cfg.video.height, cfg.video.width, generator=g) * 2 - 1
    avatar = torch.randn(4 * gen.samples_per_chunk, generator=g) * 0.1
    other = avatar.roll(11)
    gen.start(ref)
    step = gen.samples_per_chunk
    expected = torch.cat([gen.step(avatar[k * step:(k + 1) * step], other[k * step:(k + 1) * step])
                          for k in range(4)], dim=2)  # fmt: skip
    pipe = run_pipelined(gen, cfg, ref, avatar, other, chunks=4, warmup=0, progress=False, keep_frames=True)
    assert pipe["frames"] == 4 * gen.chunk_video_frames
    torch.testing.assert_close(pipe["video"], expected, rtol=0, atol=0)
    seq = run_sequential(gen, ref, avatar, other, chunks=4, warmup=1, progress=False)
    assert len(seq["dit_s"]) == len(seq["vae_s"]) == 4


def test_process_worker_and_bad_settings(tmp_path):
    cfg = load_config(sets=[*TINY, "benchmark.pipeline=process", "benchmark.vae_threads=1"], root=REPO)
    gen, _ = build_stream(cfg, REPO, "random")
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, cfg.video.height, cfg.video.width, generator=g) * 2 - 1
    wave = torch.randn(2 * gen.samples_per_chunk, generator=g) * 0.1
    pipe = run_pipelined(gen, cfg, ref, wave, wave.roll(5), chunks=2, warmup=0, progress=False)
    assert pipe["worker"] == "process" and pipe["frames"] == 2 * gen.chunk_video_frames
    assert all(lat > 0 for lat in pipe["latency_s"])
    with pytest.raises(ConfigError, match="benchmark.chunks"):
        load_config(sets=["benchmark.chunks=1"], root=REPO)
    bad = load_config(sets=[*TINY, "benchmark.pipeline=process", "benchmark.vae_device=cuda:1"], root=REPO)
    with pytest.raises(ConfigError, match="'process' is the CPU mode"):
        run_pipelined(gen, bad, ref, wave, wave, chunks=2, warmup=0, progress=False)
