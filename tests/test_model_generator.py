"""StreamingGenerator at demo size, built from the typed config like every stage builds it."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main as cli_main
from tasks.common.models import build_generator
from tasks.config import ConfigError, load_config


def _generator(root, *sets: str):
    return build_generator(load_config([], ["vae.pretrained_path=null", *sets], root=root))  # a random VAE


def _chunk_audio(gen, seed: int, speaking: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    voice = torch.randn(gen.samples_per_chunk, generator=g) * 0.1
    return (voice, torch.zeros_like(voice)) if speaking else (torch.zeros_like(voice), voice)


def _reference(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_step_turns_0_48_s_of_audio_into_12_frames(repo_root):
    gen = _generator(repo_root)
    assert gen.chunk_video_frames == 12 and gen.samples_per_chunk == 7680  # C=3 latent frames, 25 fps, 16 kHz
    gen.start(_reference())
    frames = gen.step(*_chunk_audio(gen, 1))
    assert frames.shape == (1, 3, 12, 64, 64)
    assert torch.isfinite(frames).all() and frames.min() >= -1 and frames.max() <= 1
    assert gen.next_frame == 1 + 3


def test_state_is_bounded_however_long_it_runs(repo_root):
    gen = _generator(repo_root, "student.sink_frames=4", "student.window_frames=3")
    gen.start(_reference())
    sizes = []
    for i in range(40):
        gen.denoise(*_chunk_audio(gen, i, speaking=i % 4 < 2))  # DiT only: the VAE cache is fixed-size
        sizes.append(gen.state_nbytes())
        assert len(gen.cache) <= gen.layout.sink_frames + gen.layout.window_frames
    assert sizes[10] == sizes[-1]
    assert gen.cache.frames == [0, 1, 2, 3] + list(range(1 + 3 * 40 - 3, 1 + 3 * 40))


def test_same_seed_same_frames_and_context_modes_differ(repo_root):
    def run(*sets):
        gen = _generator(repo_root, *sets)
        gen.start(_reference())
        return torch.cat([gen.step(*_chunk_audio(gen, i)) for i in range(3)], dim=2)

    noisy_a, noisy_b = run(), run()
    assert torch.equal(noisy_a, noisy_b)
    clean = run("student.context=clean")
    # the first chunk sees only the sink, so it is the same; later chunks see different context K/V
    assert torch.equal(noisy_a[:, :, :12], clean[:, :, :12])
    assert (noisy_a[:, :, 12:] - clean[:, :, 12:]).abs().max() > 1e-4
    assert not torch.equal(run("project.seed=1"), noisy_a)


def test_generator_errors_are_clear(repo_root):
    gen = _generator(repo_root)
    with pytest.raises(RuntimeError, match="start"):
        gen.step(*_chunk_audio(gen, 0))
    gen.start(_reference())
    with pytest.raises(ValueError, match="7680 samples"):
        gen.step(torch.zeros(1000), torch.zeros(1000))
    with pytest.raises(ConfigError, match="student.sink_frames"):
        load_config([], ["student.sink_frames=3"], root=repo_root)
    with pytest.raises(ConfigError, match="wav2vec2_path"):
        _generator(repo_root, "audio.features=wav2vec2")


def test_model_bench_flat_cost_pairs_early_and_late_chunks(repo_root, tmp_path):
    """The flat-cost figure times an early and a late stream alternately (100 chunks in), median of the pair
    ratios with quartiles: on one machine the same code reads close to 1."""
    from tasks.config import load_config
    from tasks.evaluation.model_bench import run_model_bench

    cfg = load_config(sets=["vae.pretrained_path=null"], root=repo_root)
    flat = run_model_bench(cfg, chunks=100, vae_chunks=2, teacher_chunks=1, teacher_steps=1, progress=False)["dit"]["flat_cost"]
    assert flat["late_chunks"] == "101-150" and flat["early_chunks"] == "1-50"
    assert flat["ratio_p25"] <= flat["ratio_median"] <= flat["ratio_p75"]
    assert 0.5 < flat["ratio_median"] < 2.0, flat  # a cached chunk costs about the same wherever it is
    assert flat["early_p50_ms"] > 0 and flat["late_p50_ms"] > 0


def test_model_bench_reports_every_field(repo_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--model-only", "--json", "--chunks", "4", "--vae-chunks", "2", "--teacher-steps", "2",
                     "--out", str(out), "--set", "vae.pretrained_path=null"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    for part in ("dit", "vae"):
        for key in ("p50_ms", "p95_ms", "p99_ms", "rtf", "first_chunk_ms", "chunks"):
            assert report[part][key] > 0, (part, key)
    assert report["dit"]["chunks"] == 4 and report["vae"]["chunks"] == 2
    assert report["dit"]["flat_cost"] is None  # too few chunks for a late stream: said, not faked
    assert report["end_to_end_sequential"]["first_frame_delay_ms"] > 0
    tv = report["teacher_vs_student"]
    assert tv["teacher_s"] > 0 and tv["student_s"] > 0 and tv["clip_latent_frames"] == 31
    assert report["hardware"]["device"] == "cpu" and report["peak_memory_bytes"]
    with pytest.raises(SystemExit):  # one mode at a time (no mode: the benchmark stage, tests/test_benchmark.py)
        cli_main(["bench", "--model-only", "--drift"])


def test_lsvm_cost_compares_the_same_student_with_and_without_memory(repo_root, tmp_path, capsys):
    """bench --lsvm-cost: both streams have the same weights (the memory at its zero-gate init), so they generate
    the same latents; only the memory's state and time differ, and both are reported."""
    out = tmp_path / "lsvm.json"
    code = cli_main(["bench", "--lsvm-cost", "--chunks", "6", "--memory-slots", "2", "--json", "--out", str(out),
                     "--set", "vae.pretrained_path=null"])  # fmt: skip
    assert code == 0
    r = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == r
    assert r["max_abs_latent_diff"] == 0.0 and r["chunks"] == 6 and r["profile"]["memory_slots"] == 2
    assert r["profile"]["memory_params_m"] > 0
    assert r["state_bytes"]["plain_after_chunk_6"]["memory"] == 0 and r["state_bytes"]["lsvm_after_chunk_6"]["memory"] > 0
    assert r["ratio_p25"] <= r["ratio_median"] <= r["ratio_p75"] and r["plain"]["p50_ms"] > 0 and r["lsvm"]["p50_ms"] > 0
    assert cli_main(["bench", "--lsvm-cost", "--memory-slots", "0", "--set", "vae.pretrained_path=null"]) == 2
    assert "--memory-slots at least 1" in capsys.readouterr().err


def test_bf16_generator_runs_with_fp32_parts(repo_root):
    gen = _generator(repo_root, "project.dtype=bfloat16")
    assert gen.dtype == torch.bfloat16 and gen.dit.scale_shift_table.dtype == torch.float32
    gen.start(_reference())
    frames = gen.step(*_chunk_audio(gen, 1))
    assert frames.shape == (1, 3, 12, 64, 64) and torch.isfinite(frames).all()


def test_compiled_blocks_stream_the_same_frames_without_recompiling(repo_root):
    """AudioDiT.compile_blocks (regional torch.compile, what `bench --set benchmark.compile=true` uses): the
    stream's latents equal the eager ones, and once the first chunk has run no cache state (window filling,
    eviction, write passes) compiles another graph: a whole-forward compile recompiled at every new cache state."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(compiled: bool, chunks: int = 8) -> tuple[list[torch.Tensor], list[int]]:
        gen = _generator(repo_root, "student.sink_frames=4", "student.window_frames=3")
        if compiled:
            gen.dit.compile_blocks("aot_eager")
        gen.start(_reference())
        latents, graphs = [], []
        for i in range(chunks):
            latents.append(gen.denoise(*_chunk_audio(gen, i, speaking=i % 4 < 2)))
            graphs.append(counters["stats"]["unique_graphs"])
        return latents, graphs

    torch._dynamo.reset()
    counters.clear()
    eager, _ = run(False)
    compiled, graphs = run(True)
    assert max((a - b).abs().max().item() for a, b in zip(eager, compiled, strict=True)) < 1e-5
    # head + tail for the reference frame (F=1) and for chunks (F=3): 4 graphs, none after the first chunk
    assert graphs[0] <= 4 and graphs[-1] == graphs[0], graphs


def test_observe_writes_what_the_stream_would_have_written(repo_root):
    """Context injection (`observe`, the memory test's way to show the stream a real clip): given the latents a
    clean-context stream generated, observing them leaves every cached K/V, the frame counter and the audio
    history exactly as generating them did; with noisy context it writes K/V at the last step's noise level;
    a wrong shape is a clear error."""
    sets = ("student.sink_frames=1", "student.window_frames=3", "student.context=clean")
    made, seen = _generator(repo_root, *sets), _generator(repo_root, *sets)
    made.start(_reference())
    seen.start(_reference())
    for i in range(3):  # past the window: evictions included
        audio = _chunk_audio(made, i, speaking=i != 1)
        x0 = made.denoise(*audio)
        assert torch.equal(seen.observe(x0, *audio), x0)
    assert seen.next_frame == made.next_frame == 1 + 3 * 3
    assert seen.cache.frames == made.cache.frames
    for layer in range(len(made.dit.blocks)):
        for a, b in zip(made.cache.keys(layer), seen.cache.keys(layer), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(made.stream._avatar, seen.stream._avatar)
    # and the next generated chunk is the same
    audio = _chunk_audio(made, 9)
    seen.noise.set_state(made.noise.get_state())
    assert torch.equal(made.denoise(*audio), seen.denoise(*audio))

    noisy = _generator(repo_root, "student.sink_frames=1", "student.window_frames=3")
    noisy.start(_reference())
    noisy.observe(x0, *_chunk_audio(noisy, 0))
    assert noisy.next_frame == 4 and noisy.cache.frames == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="observe takes one chunk"):
        noisy.observe(x0[:, :, :2], *_chunk_audio(noisy, 1))
