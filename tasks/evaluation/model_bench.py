"""Model-only benchmark: per-chunk DiT and VAE latency of the streaming student, flat cost over a long
stream, state and peak memory, first-chunk delay, and the teacher/student DiT cost for one clip.

Prints figures; asserts nothing (speed targets live here, not in tests). Weights are random unless the
config points at pretrained ones: speed does not depend on the values.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Any

import psutil
import torch
from tqdm import tqdm

from model.attention import KVCache
from model.sampling import NUM_TRAIN_TIMESTEPS, cfg_velocity
from model.streaming import StreamingGenerator
from tasks.common.models import build_generator, device_of
from tasks.config import Config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": 1e3 * _pct(values, 50), "p95_ms": 1e3 * _pct(values, 95), "p99_ms": 1e3 * _pct(values, 99),
            "mean_ms": 1e3 * statistics.fmean(values)}  # fmt: skip


def _window_ratio(values: list[float], early: tuple[int, int], late: tuple[int, int]) -> float | None:
    """median(late chunks) / median(early chunks); chunk numbers are 1-based and inclusive."""
    if len(values) < late[1]:
        return None
    return statistics.median(values[late[0] - 1 : late[1]]) / statistics.median(values[early[0] - 1 : early[1]])


def hardware(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _test_audio(samples: int, chunk: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two alternating 'voices' (noise bursts), so that both talking and listening paths run."""
    t = torch.arange(samples)
    turn = ((t // (chunk * 2)) % 2 == 0).float()
    voice = torch.randn(samples, generator=generator) * 0.1
    return voice * turn, voice.roll(7) * (1 - turn)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)  # CPU: resident set size now (torch's allocator has no peak)


FLAT_PAIRS = 50  # early/late chunk pairs of the flat-cost figure
FLAT_MIN_LATE = 100  # the late stream must be at least this many chunks in for the figure to mean something


def _interleaved_flat_cost(gen, cfg: Config, ref: torch.Tensor, avatar: torch.Tensor, other: torch.Tensor,
                           late_from: int, pairs: int) -> dict[str, Any]:  # fmt: skip
    """Does a chunk cost the same far into a stream as at its start? ``gen`` has streamed ``late_from``
    chunks; a second generator (same weights) starts fresh. Their next ``pairs`` chunks are timed alternately,
    early then late, so a change of machine load hits both sides of every pair: the figure is the median of the
    per-pair ratios late / early, with its quartiles as the spread."""
    device = gen.device
    early = StreamingGenerator(gen.dit, gen.vae, gen.audio, gen._text, gen.settings)
    early.start(ref)
    spc = gen.samples_per_chunk
    silence = torch.zeros(spc)
    ratios, e_s, l_s = [], [], []
    for k in range(pairs):
        piece = slice(k * spc, (k + 1) * spc)
        a, o = (avatar[piece], other[piece]) if avatar.numel() >= (k + 1) * spc else (silence, silence)
        t0 = time.perf_counter()
        early.denoise(a, o)
        _sync(device)
        t1 = time.perf_counter()
        gen.denoise(a, o)
        _sync(device)
        t2 = time.perf_counter()
        e_s.append(t1 - t0)
        l_s.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    q = statistics.quantiles(ratios, n=4)
    return {"late_chunks": f"{late_from + 1}-{late_from + pairs}", "early_chunks": f"1-{pairs}",
            "ratio_median": statistics.median(ratios), "ratio_p25": q[0], "ratio_p75": q[2],
            "early_p50_ms": 1e3 * statistics.median(e_s), "late_p50_ms": 1e3 * statistics.median(l_s),
            "method": "pairs timed alternately (early, late), median of late/early per pair, quartiles as spread"}


def run_model_bench(
    cfg: Config, chunks: int = 500, vae_chunks: int = 60, teacher_chunks: int = 10, teacher_steps: int = 50,
    teacher_cfg_scale: float = 4.5, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    device = device_of(cfg)
    gen = build_generator(cfg)
    settings = gen.settings
    c = settings.layout.chunk_frames
    chunk_s = gen.chunk_video_frames / cfg.video.fps
    g = torch.Generator().manual_seed(0)
    vae_chunks = min(vae_chunks, chunks)
    total = chunks
    avatar, other = _test_audio(total * gen.samples_per_chunk, gen.samples_per_chunk, g)
    ref = torch.rand(3, cfg.video.height, cfg.video.width, generator=g) * 2 - 1

    # warm-up stream (kernels, allocator), then the measured stream from a fresh start()
    gen.start(ref)
    for i in range(3):
        piece = slice(i * gen.samples_per_chunk, (i + 1) * gen.samples_per_chunk)
        gen.step(avatar[piece], other[piece])
    _sync(device)

    _peak_reset(device)
    t0 = time.perf_counter()
    gen.start(ref)
    _sync(device)
    start_s = time.perf_counter() - t0
    dit_s: list[float] = []
    vae_s: list[float] = []
    state: dict[int, dict[str, int]] = {}
    peaks: dict[str, int] = {}
    kept: list[torch.Tensor] = []
    # DiT alone over the whole stream (the VAE is timed on its own below, so neither pollutes the other)
    for i in tqdm(range(chunks), desc="DiT, streaming chunks", unit="chunk", disable=not progress):
        piece = slice(i * gen.samples_per_chunk, (i + 1) * gen.samples_per_chunk)
        t0 = time.perf_counter()
        latents = gen.denoise(avatar[piece], other[piece])
        _sync(device)
        dit_s.append(time.perf_counter() - t0)
        if i < vae_chunks:
            kept.append(latents)
        n = i + 1
        if n in (50, chunks):
            state[n] = gen.state_nbytes()
            peaks[f"dit_after_chunk_{n}"] = _peak(device)
    # VAE alone: decode the kept chunks in order with a fresh streaming decoder primed on the reference
    gen.decoder = gen.vae.stream_decoder()
    gen.decoder.decode(gen.ref_latent)
    _peak_reset(device)
    for latents in (tqdm(kept, desc="VAE, streaming chunks", unit="chunk", disable=not progress)):
        t0 = time.perf_counter()
        gen.decode(latents)
        _sync(device)
        vae_s.append(time.perf_counter() - t0)
    peaks[f"vae_after_chunk_{len(kept)}"] = _peak(device)
    kept.clear()

    flat = _interleaved_flat_cost(gen, cfg, ref, avatar, other, late_from=chunks, pairs=FLAT_PAIRS) \
        if chunks >= FLAT_MIN_LATE else None  # fmt: skip
    half = vae_chunks // 2
    vae_late = (half + 1, 2 * half)
    vae_ratio = _window_ratio(vae_s, (1, half), vae_late) if vae_chunks >= 20 else None

    teacher = _teacher_vs_student(gen, cfg, teacher_chunks, teacher_steps, teacher_cfg_scale, device)
    report = {
        "profile": {"video": f"{cfg.video.width}x{cfg.video.height}@{cfg.video.fps}", "backbone": cfg.model.backbone,
                    "dit_params_m": round(sum(p.numel() for p in gen.dit.parameters()) / 1e6, 3),
                    "vae_params_m": round(sum(p.numel() for p in gen.vae.parameters()) / 1e6, 3),
                    "dtype": cfg.project.dtype, "steps": settings.steps, "chunk_latent_frames": c,
                    "chunk_video_frames": gen.chunk_video_frames, "chunk_seconds": chunk_s,
                    "sink_frames": settings.layout.sink_frames, "window_frames": settings.layout.window_frames,
                    "rapr": settings.layout.rapr, "context": settings.context, "weights": "pretrained"
                    if cfg.model.pretrained_path else "random"},  # fmt: skip
        "hardware": hardware(device),
        "start_ms": 1e3 * start_s,
        "dit": {**_summary(dit_s), "chunks": len(dit_s), "rtf": statistics.median(dit_s) / chunk_s,
                "first_chunk_ms": 1e3 * dit_s[0], "flat_cost": flat},  # fmt: skip
        "vae": {**_summary(vae_s), "chunks": len(vae_s), "rtf": statistics.median(vae_s) / chunk_s,
                "first_chunk_ms": 1e3 * vae_s[0],
                f"flat_ratio_{vae_late[0]}_{vae_late[1]}_vs_1_{half}": vae_ratio},  # fmt: skip
        "end_to_end_sequential": {"rtf": (statistics.median(dit_s) + statistics.median(vae_s)) / chunk_s,
                                  "first_frame_delay_ms": 1e3 * (dit_s[0] + vae_s[0])},  # fmt: skip
        "state_bytes": {str(k): v for k, v in state.items()},
        "peak_memory_bytes": peaks,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS (CPU)",
        "teacher_vs_student": teacher,
    }
    return report


@torch.no_grad()
def _teacher_vs_student(gen, cfg: Config, n_chunks: int, steps: int, scale: float, device: torch.device) -> dict:
    """DiT time for one clip of ``n_chunks`` chunks: the teacher (``steps`` bidirectional Euler steps, each
    with a conditional and an unconditional pass for CFG) vs the student (N cached steps per chunk)."""
    dit, layout = gen.dit, gen.layout
    c = layout.chunk_frames
    frames = 1 + n_chunks * c
    _, z, _, h, w = gen.ref_latent.shape
    dtype = dit.dtype
    x = torch.randn(1, z, frames, h, w, device=device, dtype=dtype)
    talk = torch.randn(1, frames, gen.audio.tokens_per_latent, gen.audio.token_dim, device=device, dtype=dtype)
    silent = torch.zeros_like(talk)
    ctx = gen.context

    def teacher_step() -> None:
        t = torch.full((1, frames), 500.0, device=device)
        t[:, 0] = 0
        cond = dit(x, t, ctx, talk, silent)
        uncond = dit(x, t, ctx, silent, silent)
        cfg_velocity(cond, uncond, scale)

    teacher_step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        teacher_step()
    _sync(device)
    teacher_s = time.perf_counter() - t0

    def student_clip() -> None:
        cache = KVCache(layout, len(dit.blocks))
        dit(x[:, :, :1], torch.zeros(1, 1, device=device), ctx, silent[:, :1], silent[:, :1], attention="streaming",
            layout=layout, cache=cache, frame_start=0, write_cache=True)  # fmt: skip
        for start in range(1, frames, c):
            for s in range(gen.settings.steps):
                t = torch.full((1, c), NUM_TRAIN_TIMESTEPS * gen.sigmas[s], device=device)
                dit(x[:, :, start : start + c], t, ctx, talk[:, start : start + c], silent[:, start : start + c],
                    attention="streaming", layout=layout, cache=cache, frame_start=start,
                    write_cache=s == gen.settings.steps - 1)  # fmt: skip

    student_clip()
    _sync(device)
    t0 = time.perf_counter()
    student_clip()
    _sync(device)
    student_s = time.perf_counter() - t0
    flops = _analytic_flops(gen, n_chunks, steps)
    return {
        "analytic_flops_teacher": flops["teacher"], "analytic_flops_student": flops["student"],
        "analytic_flops_student_over_teacher": flops["student"] / flops["teacher"],
        "clip_latent_frames": frames, "clip_video_frames": 1 + 4 * (frames - 1) if gen.vae.temporal == 4 else None,
        "teacher_steps": steps, "teacher_cfg_passes": 2, "teacher_s": teacher_s,
        "student_steps": gen.settings.steps, "student_s": student_s,
        "student_over_teacher": student_s / teacher_s, "paper_claim_student_over_teacher": 1 / 40,
    }  # fmt: skip


def dit_forward_flops(spec, q_tokens: int, k_tokens: int, audio_tokens: int) -> float:
    """Multiply-adds x 2 of one AudioDiT forward: ``q_tokens`` new tokens attending to ``k_tokens`` keys
    (text K/V prepared once, as both the teacher and the student run it here)."""
    d, ffn, layers = spec.dim, spec.ffn_dim, spec.num_layers
    per_layer = (
        4 * 2 * q_tokens * d * d  # self-attention q, k, v, out
        + 2 * 2 * q_tokens * k_tokens * d  # scores and weighted sum
        + 2 * 2 * q_tokens * d * d  # text cross-attention q, out (K/V cached)
        + 2 * 2 * q_tokens * d * ffn  # feed-forward
    )
    if spec.audio_dim:
        per_layer += 2 * (2 * 2 * q_tokens * d * d + 2 * 2 * audio_tokens * d * d)  # two audio attentions
    return float(layers * per_layer)


def _analytic_flops(gen, n_chunks: int, teacher_steps: int) -> dict[str, float]:
    spec, layout = gen.dit.spec, gen.layout
    _, _, _, h, w = gen.ref_latent.shape
    tpf = (h // spec.patch_size[1]) * (w // spec.patch_size[2])
    a = gen.audio.tokens_per_latent
    c = layout.chunk_frames
    frames = 1 + n_chunks * c
    teacher = 2 * teacher_steps * dit_forward_flops(spec, frames * tpf, frames * tpf, frames * a)
    student = dit_forward_flops(spec, tpf, tpf, a)  # reference pass
    for start in range(1, frames, c):
        visible = len(layout.visible(start, start + c))
        student += gen.settings.steps * dit_forward_flops(spec, c * tpf, visible * tpf, c * a)
    return {"teacher": teacher, "student": student}


def _flat(f: dict | None) -> str:
    if f is None:
        return f"late/early: n/a (fewer than {FLAT_MIN_LATE} chunks streamed)"
    return (f"chunks {f['late_chunks']} / chunks {f['early_chunks']} = {f['ratio_median']:.3f} "
            f"(quartiles {f['ratio_p25']:.3f}-{f['ratio_p75']:.3f}, timed alternately)")


def format_report(r: dict) -> str:
    d, v, e = r["dit"], r["vae"], r["end_to_end_sequential"]
    tv = r["teacher_vs_student"]
    lines = [
        f"model benchmark  {r['profile']['video']}  {r['profile']['backbone']} ({r['profile']['weights']} weights, "
        f"{r['profile']['dtype']})  on {r['hardware'].get('gpu', r['hardware']['cpu'])}",
        f"  chunk = {r['profile']['chunk_video_frames']} frames = {r['profile']['chunk_seconds']:.2f} s of audio",
        f"  DiT  per chunk p50 {d['p50_ms']:.1f} ms  p95 {d['p95_ms']:.1f} ms  RTF {d['rtf']:.3f}  "
        f"first chunk {d['first_chunk_ms']:.1f} ms  {_flat(d['flat_cost'])}",
        f"  VAE  per chunk p50 {v['p50_ms']:.1f} ms  p95 {v['p95_ms']:.1f} ms  RTF {v['rtf']:.3f}  first chunk "
        f"{v['first_chunk_ms']:.1f} ms  late/early = {_fmt(next(x for k, x in v.items() if k.startswith('flat_ratio')))}",
        f"  end to end (sequential)  RTF {e['rtf']:.3f}  first-frame delay {e['first_frame_delay_ms']:.1f} ms",
        "  state held between steps: " + ", ".join(f"after chunk {k}: {sum(s.values()) / 2**20:.2f} MiB"
                                                    for k, s in r["state_bytes"].items()),  # fmt: skip
        f"  peak memory ({r['peak_memory_kind']}): " + ", ".join(f"{k} {b / 2**20:.0f} MiB"
                                                                 for k, b in r["peak_memory_bytes"].items()),  # fmt: skip
        f"  teacher ({tv['teacher_steps']} steps x 2 CFG passes, bidirectional, {tv['clip_latent_frames']} latent frames) "
        f"{tv['teacher_s']:.2f} s vs student ({tv['student_steps']} cached steps per chunk) {tv['student_s']:.3f} s: "
        f"student/teacher = {tv['student_over_teacher']:.4f} = 1/{1 / tv['student_over_teacher']:.1f} (paper: 1/40); "
        f"by FLOPs at these sizes 1/{1 / tv['analytic_flops_student_over_teacher']:.1f}",
    ]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------------- the memory's cost
LSVM_WINDOW = 100  # chunks per end of the stream compared for flatness


@torch.no_grad()
def run_lsvm_cost(cfg: Config, chunks: int = 1000, slots: int = 4, progress: bool = True,
                  kind: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What the Long-Short Visual Memory ([10], ``model.memory_slots``) costs per chunk: two streaming students
    with the same weights, one with ``slots`` memory slots per layer (its memory modules at their init: the
    gates at zero, so both streams must generate the same latents, which is checked and reported), stream the
    same audio for ``chunks`` chunks, timed alternately chunk by chunk (the order swapped every chunk), so a
    change of machine load hits both. Reported: the median per-chunk ratio LSVM / plain with quartiles, that
    ratio over the first and the last ``LSVM_WINDOW`` chunks (flat: the memory does not grow), the state held
    between chunks and the memory's share of it, the process's peak memory. Weights are random unless the
    profile names pretrained ones: cost does not depend on the values. ``kind``: the memory's kind (default
    ``model.memory_kind``)."""
    if slots < 1:
        raise ValueError("--memory-slots must be at least 1")
    device = device_of(cfg)
    plain_cfg, mem_cfg = cfg.model_copy(deep=True), cfg.model_copy(deep=True)
    plain_cfg.model = plain_cfg.model.model_copy(update={"memory_slots": 0})
    need = cfg.student.window_frames // cfg.student.chunk_frames + 2  # what the config asks of a memory (training)
    mem_cfg.train = mem_cfg.train.model_copy(update={"window_chunks": max(cfg.train.window_chunks, need)})
    kind = kind or cfg.model.memory_kind
    mem_cfg.model = mem_cfg.model.model_copy(update={"memory_slots": slots, "memory_kind": kind})
    plain, mem = build_generator(plain_cfg), build_generator(mem_cfg)
    missing, unexpected = mem.dit.load_state_dict(plain.dit.state_dict(), strict=False)
    if unexpected or any("memory" not in k for k in missing):
        raise RuntimeError(f"the two students differ beyond the memory: missing {missing}, unexpected {unexpected}")
    g = torch.Generator().manual_seed(0)
    spc = plain.samples_per_chunk
    avatar, other = _test_audio(chunks * spc, spc, g)
    ref = torch.rand(3, cfg.video.height, cfg.video.width, generator=g) * 2 - 1
    for gen in (plain, mem):  # warm-up, then fresh streams
        gen.start(ref)
        for i in range(2):
            gen.denoise(avatar[i * spc : (i + 1) * spc], other[i * spc : (i + 1) * spc])
        gen.start(ref)
    _sync(device)
    times: dict[str, list[float]] = {"plain": [], "lsvm": []}
    state: dict[str, dict[str, int]] = {}
    diff = 0.0
    for i in tqdm(range(chunks), desc="LSVM vs plain, streaming chunks", unit="chunk", disable=not progress):
        a, o = avatar[i * spc : (i + 1) * spc], other[i * spc : (i + 1) * spc]
        out = {}
        for name in (("plain", "lsvm") if i % 2 == 0 else ("lsvm", "plain")):
            gen = plain if name == "plain" else mem
            t0 = time.perf_counter()
            out[name] = gen.denoise(a, o)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        diff = max(diff, float((out["plain"].float() - out["lsvm"].float()).abs().max()))
        if i + 1 in (LSVM_WINDOW // 2, chunks):
            for name, gen in (("plain", plain), ("lsvm", mem)):
                memory = sum(m.nbytes() for m in gen.cache.memory if m is not None)
                state[f"{name}_after_chunk_{i + 1}"] = {**gen.state_nbytes(), "memory": memory}
    ratios = [b / a for a, b in zip(times["plain"], times["lsvm"], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    w = min(LSVM_WINDOW, max(1, chunks // 2))
    return {
        "profile": {"video": f"{cfg.video.width}x{cfg.video.height}@{cfg.video.fps}", "backbone": cfg.model.backbone,
                    "memory_slots": slots, "memory_kind": kind, "memory_read": cfg.model.memory_read,
                    "layers": len(mem.dit.blocks),
                    "steps": plain.settings.steps,
                    "sink_frames": plain.settings.layout.sink_frames,
                    "window_frames": plain.settings.layout.window_frames,
                    "chunk_latent_frames": plain.settings.layout.chunk_frames,
                    "chunk_seconds": plain.chunk_video_frames / cfg.video.fps,
                    "dit_params_m": round(sum(p.numel() for p in plain.dit.parameters()) / 1e6, 3),
                    "memory_params_m": round((sum(p.numel() for p in mem.dit.parameters())
                                              - sum(p.numel() for p in plain.dit.parameters())) / 1e6, 4),
                    "weights": "pretrained" if cfg.model.pretrained_path else "random"},  # fmt: skip
        "hardware": hardware(device),
        "chunks": chunks,
        "plain": _summary(times["plain"]),
        "lsvm": _summary(times["lsvm"]),
        "ratio_median": statistics.median(ratios), "ratio_p25": q[0], "ratio_p75": q[2],
        f"ratio_first_{w}": statistics.median(ratios[:w]), f"ratio_last_{w}": statistics.median(ratios[-w:]),
        "lsvm_last_over_first": statistics.median(times["lsvm"][-w:]) / statistics.median(times["lsvm"][:w]),
        "max_abs_latent_diff": diff,
        "state_bytes": state,
        "peak_memory_bytes": _peak(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS (CPU, both streams)",
        "method": "the same chunk timed on both streams alternately (order swapped each chunk); ratios per chunk",
        "target": "LSVM <= 1.15x per chunk, flat over >= 1000 chunks (issue [10])",
    }


def format_lsvm_report(r: dict) -> str:
    p, w = r["profile"], next(k for k in r if k.startswith("ratio_first_")).rsplit("_", 1)[1]
    end = [k for k in r["state_bytes"] if k.startswith("lsvm_after_chunk_")]
    first, last = r["state_bytes"][end[0]], r["state_bytes"][end[-1]]
    plain_last = r["state_bytes"][end[-1].replace("lsvm", "plain")]
    return "\n".join([
        f"LSVM cost  {p['video']}  {p['backbone']} ({p['weights']} weights), {p['memory_slots']} "
        f"{p.get('memory_kind', 'global')} ({p.get('memory_read', 'gated')} read) memory slots x "
        f"{p['layers']} layers (+{p['memory_params_m']} M parameters), {r['chunks']} chunks of {p['chunk_seconds']:.2f} s, "
        f"on {r['hardware'].get('gpu', r['hardware']['cpu'])}",
        f"  per chunk p50: plain {r['plain']['p50_ms']:.1f} ms, LSVM {r['lsvm']['p50_ms']:.1f} ms; LSVM / plain "
        f"{r['ratio_median']:.3f} (quartiles {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}); first {w} chunks "
        f"{r[f'ratio_first_{w}']:.3f}, last {w} {r[f'ratio_last_{w}']:.3f}; LSVM last/first {r['lsvm_last_over_first']:.3f}",
        f"  state between chunks: plain {sum(v for k, v in plain_last.items() if k != 'memory') / 2**20:.3f} MiB, "
        f"LSVM {sum(v for k, v in last.items() if k != 'memory') / 2**20:.3f} MiB of which memory "
        f"{last['memory'] / 2**10:.1f} KiB" + (f" ({end[0].rsplit('_', 1)[1]} chunks in: {first['memory'] / 2**10:.1f} KiB)"
                                                if len(end) > 1 else ""),  # fmt: skip
        (f"  same latents (memory gates at their init): max |diff| {r['max_abs_latent_diff']:.2e}"
         if p.get("memory_read", "gated") == "gated" else
         f"  latents differ (joint read: the memory is attended from the start): max |diff| "
         f"{r['max_abs_latent_diff']:.2e}") + f";  target: {r['target']}",
    ])
