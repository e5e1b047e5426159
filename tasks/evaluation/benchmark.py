"""Stage `benchmark` (`streamavatar bench`): is the streaming student real time, and where does the time go?

The paper's appendix 7 measures the DiT and the VAE decoder separately (Real Time Factor = compute time /
audio duration of the chunk; First Frame Delay = time to the first chunk) and runs them pipelined on two GPUs:
while the VAE decodes chunk k, the DiT already denoises chunk k+1. This stage measures, on the trained
student (or the seeded random one: speed does not depend on the weights' values):

* ``sequential``: DiT then VAE for every chunk on one device (what a naive loop does);
* ``pipelined``: the VAE decode of chunk k overlaps the DiT of chunk k+1, in a worker thread (on GPU with
  ``benchmark.vae_device`` = a second device, the paper's setting) or a worker process (CPU);

and reports per module and end to end: RTF, first-frame delay, per-chunk latency p50/p95/p99, the
throughput speed-up of pipelining, peak memory and the hardware, next to the paper's Table 5.

Definitions (all times wall clock, device synchronised):
* chunk_s: audio seconds per chunk = 4C frames / fps (0.48 s at the paper's C = 3, 25 fps).
* module RTF: median per-chunk time of the module / chunk_s (sequential mode, each module alone).
* module FFD: the module's time for the first chunk after start(); end-to-end FFD = DiT FFD + VAE FFD (the
  first frames cannot appear before both ran once); latency = FFD + chunk_s, as the paper adds them.
* setup_s: start(reference) once per conversation (reference encode, sink fill), reported apart.
* live: the pipelined mode paced like a conversation (chunk k's audio is complete at (k+1) chunk_s); its
  per-chunk latency runs from the audio's arrival to the end of the decode: what a user waits.
* per-chunk latency (sequential, pipelined): from the start of the chunk's DiT to the end of its decode. The pipeline double-buffers
  (one chunk may wait for the VAE while the next is denoised; the DiT then waits), so a fast DiT cannot run
  ahead of a slow VAE and inflate the latency with an ever longer queue; output interval: time between consecutive decoded chunks; end-to-end RTF: wall time of the
  measured chunks / their audio duration; speed-up: sequential wall / pipelined wall.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.streaming import StreamingGenerator
from tasks.common.stage import StageResult, write_json_atomic
from tasks.common.student import RANDOM, build_stream, default_checkpoint  # noqa: F401  (build_stream re-exported)
from tasks.config import Config, ConfigError, resolve_path
from tasks.evaluation.model_bench import _pct, _test_audio, hardware

log = logging.getLogger(__name__)

# Table 5 of the paper: 928x704, DiT and VAE on two H800 GPUs, chunk 0.48 s.
PAPER = {"resolution": "928x704", "hardware": "2x NVIDIA H800 (DiT and VAE on separate GPUs)", "chunk_s": 0.48,
         "dit": {"rtf": 0.69, "ffd_s": 0.33}, "vae": {"rtf": 0.82, "ffd_s": 0.39}, "latency_s": 1.20}  # fmt: skip


def _sync(*devices: torch.device) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _sync_own_stream(device: torch.device) -> None:
    """Wait for the work THIS thread queued on ``device`` (its current stream), not for another thread's
    stream: in the one-GPU pipelined mode a device-wide synchronize made the DiT wait for the VAE's kernels
    (measured on an H200: no overlap at all, 0.99x)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_ms": 1e3 * _pct(values, 50), "p95_ms": 1e3 * _pct(values, 95), "p99_ms": 1e3 * _pct(values, 99),
            "mean_ms": 1e3 * statistics.fmean(values), "max_ms": 1e3 * max(values)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ models
def resolve_student(cfg: Config, root: Path, choice: str) -> str | Path | None:
    """``choice`` "auto" -> the trained student if one exists, else "random"; else as given (path/"random")."""
    if choice == "auto":
        return default_checkpoint(cfg, root) or RANDOM
    return RANDOM if choice == RANDOM else resolve_path(choice, root)


# ------------------------------------------------------------------------------------------------ workers
class _ThreadDecoder:
    """Decodes chunks in a worker thread, in order, with its own streaming VAE state (on ``device``)."""

    def __init__(self, gen: StreamingGenerator, device: torch.device, keep: bool = False) -> None:
        self.device, self.keep, self.kept = device, keep, []
        # on a GPU the decoder runs on its own CUDA stream, so that on the DiT's GPU the two can overlap (on one
        # stream the GPU runs their kernels one after the other)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if device == gen.device:
            self.vae = gen.vae
        else:  # the paper's second GPU: a copy of the decoder lives there
            self.vae = copy.deepcopy(gen.vae).to(device)
        self.decoder = self.vae.stream_decoder()
        with torch.no_grad():
            self.decoder.decode(gen.ref_latent.to(device))  # prime the causal cache, as start() does
        _sync(device)
        self.jobs: queue.Queue = queue.Queue(maxsize=1)  # double buffering: the DiT waits rather than run ahead
        self.done: dict[int, float] = {}
        self.frames = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="vae-decode", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            k, latents = job
            try:
                with torch.no_grad(), torch.cuda.stream(self.stream):  # stream None: the current one (CPU)
                    video = self.decoder.decode(latents.to(self.device, non_blocking=True))
                    _sync_own_stream(self.device)  # before `latents` is released: its memory is safe to reuse
                self.frames += video.shape[2]
                if self.keep:
                    self.kept.append(video.float().cpu())
                self.done[k] = time.perf_counter()
            except BaseException as exc:  # surfaced in finish()
                self.error = exc
                return

    def submit(self, k: int, latents: torch.Tensor) -> None:
        self.jobs.put((k, latents))

    def finish(self) -> dict[int, float]:
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"the VAE worker failed: {self.error}") from self.error
        return self.done


def _process_worker(vae, threads: int, jobs, results) -> None:
    """Worker process of the CPU pipelined mode: a copy of the generator's VAE (trained weights and latent
    statistics included), decodes in order."""
    if threads:
        torch.set_num_threads(threads)
    vae = vae.eval()
    decoder = vae.stream_decoder()
    with torch.no_grad():
        while True:
            job = jobs.get()
            if job is None:
                results.put(None)
                return
            k, latents = job
            if k < 0:  # the reference latent primes the causal cache
                decoder.decode(latents)
                results.put((k, time.perf_counter(), 0))
                continue
            video = decoder.decode(latents)
            results.put((k, time.perf_counter(), int(video.shape[2])))


class _ProcessDecoder:
    def __init__(self, gen: StreamingGenerator, cfg: Config, threads: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.jobs, self.results = ctx.Queue(maxsize=1), ctx.Queue()
        vae = copy.deepcopy(gen.vae).cpu()
        self.proc = ctx.Process(target=_process_worker, args=(vae, threads, self.jobs, self.results), daemon=True)
        self.proc.start()
        self.jobs.put((-1, gen.ref_latent.cpu()))
        self._get()  # the worker is up and primed before timing starts
        self.done: dict[int, float] = {}
        self.frames = 0

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=5)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the VAE worker process died (exit code {self.proc.exitcode})") from None

    def submit(self, k: int, latents: torch.Tensor) -> None:
        self.jobs.put((k, latents.cpu()))

    def finish(self) -> dict[int, float]:
        self.jobs.put(None)
        while (item := self._get()) is not None:
            k, t, n = item
            self.done[k] = t
            self.frames += n
        self.proc.join(timeout=30)
        return self.done


# ------------------------------------------------------------------------------------------------ modes
def _inputs(gen: StreamingGenerator, cfg: Config, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.project.seed)
    avatar, other = _test_audio(chunks * gen.samples_per_chunk, gen.samples_per_chunk, g)
    ref = torch.rand(3, cfg.video.height, cfg.video.width, generator=g) * 2 - 1
    return ref, avatar, other


def _piece(gen: StreamingGenerator, k: int) -> slice:
    return slice(k * gen.samples_per_chunk, (k + 1) * gen.samples_per_chunk)


def _warmup(gen: StreamingGenerator, ref, avatar, other, n: int) -> None:
    if n:
        gen.start(ref)
        for k in range(n):
            gen.step(avatar[_piece(gen, k)], other[_piece(gen, k)])
        _sync(gen.device)


@torch.no_grad()
def run_sequential(gen: StreamingGenerator, ref, avatar, other, chunks: int, warmup: int, progress: bool) -> dict:
    """DiT then VAE per chunk, on one device: module times and per-chunk latency."""
    _warmup(gen, ref, avatar, other, warmup)
    dev = gen.device
    t0 = time.perf_counter()
    gen.start(ref)
    _sync(dev)
    setup_s = time.perf_counter() - t0
    dit_s, vae_s, done = [], [], []
    begin = time.perf_counter()
    for k in tqdm(range(chunks), desc="sequential (DiT then VAE)", unit="chunk", disable=not progress, leave=False):
        t0 = time.perf_counter()
        latents = gen.denoise(avatar[_piece(gen, k)], other[_piece(gen, k)])
        _sync(dev)
        t1 = time.perf_counter()
        gen.decode(latents)
        _sync(dev)
        t2 = time.perf_counter()
        dit_s.append(t1 - t0)
        vae_s.append(t2 - t1)
        done.append(t2)
    wall = done[-1] - begin
    return {"setup_s": setup_s, "dit_s": dit_s, "vae_s": vae_s, "latency_s": [d + v for d, v in zip(dit_s, vae_s, strict=False)],
            "done": done, "begin": begin, "wall_s": wall}  # fmt: skip


@torch.no_grad()
def run_pipelined(gen: StreamingGenerator, cfg: Config, ref, avatar, other, chunks: int, warmup: int,
                  progress: bool, keep_frames: bool = False, paced: bool = False) -> dict:  # fmt: skip
    """The DiT streams chunk after chunk; a worker decodes chunk k while the DiT runs chunk k+1.

    Unpaced: as fast as possible (throughput; a chunk may queue behind the slower module). ``paced``: chunk
    k's audio arrives at (k + 1) * chunk_s as in a live conversation, the DiT waits for it, and latency is
    measured from the arrival. ``keep_frames`` (thread worker): also return the decoded video."""
    b = cfg.benchmark
    _warmup(gen, ref, avatar, other, warmup)
    dev = gen.device
    vae_dev = torch.device(b.vae_device) if b.vae_device else dev
    if b.pipeline == "process" and (dev.type != "cpu" or vae_dev.type != "cpu"):
        raise ConfigError("benchmark.pipeline 'process' is the CPU mode; on GPU use 'thread' with "
                          "benchmark.vae_device set to the second GPU (e.g. cuda:1)")  # fmt: skip
    threads_before = torch.get_num_threads()
    if b.dit_threads:
        torch.set_num_threads(b.dit_threads)
    try:
        gen.start(ref)
        _sync(dev)
        if b.pipeline == "process":
            worker = _ProcessDecoder(gen, cfg, b.vae_threads)
        else:
            worker = _ThreadDecoder(gen, vae_dev, keep=keep_frames)
        starts, dit_done, arrivals = [], [], []
        chunk_s = gen.chunk_video_frames / cfg.video.fps
        begin = time.perf_counter()
        desc = f"pipelined{', paced' if paced else ''} (VAE in a worker {b.pipeline})"
        for k in tqdm(range(chunks), desc=desc, unit="chunk", disable=not progress, leave=False):
            if paced:  # the chunk's audio is complete at (k + 1) * chunk_s after the stream began
                arrival = begin + (k + 1) * chunk_s
                time.sleep(max(0.0, arrival - time.perf_counter()))
                arrivals.append(arrival)
            starts.append(time.perf_counter())
            latents = gen.denoise(avatar[_piece(gen, k)], other[_piece(gen, k)])
            _sync_own_stream(dev)  # the DiT's own work only (the VAE may be running on its stream meanwhile)
            dit_done.append(time.perf_counter())
            worker.submit(k, latents)
        finished = worker.finish()
    finally:
        torch.set_num_threads(threads_before)
    done = [finished[k] for k in range(chunks)]
    origin = arrivals if paced else starts
    return {"dit_s": [d - s for s, d in zip(starts, dit_done, strict=True)],
            "latency_s": [d - s for s, d in zip(origin, done, strict=True)],
            "done": done, "begin": begin, "wall_s": done[-1] - begin, "frames": worker.frames,
            "vae_device": str(vae_dev), "worker": b.pipeline,
            "video": torch.cat(worker.kept, dim=2) if keep_frames and b.pipeline == "thread" else None}  # fmt: skip


def _peak_memory(devices: list[torch.device]) -> dict[str, Any]:
    out: dict[str, Any] = {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    for d in devices:
        if d.type == "cuda":
            out[f"{d}_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(d))
    return out


# ------------------------------------------------------------------------------------------------ report
def run_benchmark(cfg: Config, root: Path, progress: bool = True) -> dict[str, Any]:
    b = cfg.benchmark
    gen, student = build_stream(cfg, root, resolve_student(cfg, root, b.checkpoint))
    if b.compile:  # the module stays itself (its cache, blocks, dtype); each block's tensor-only parts compiled
        gen.dit.compile_blocks(b.compile_backend)
    chunk_s = gen.chunk_video_frames / cfg.video.fps
    ref, avatar, other = _inputs(gen, cfg, max(b.chunks, b.warmup_chunks))
    devices = [gen.device] + ([torch.device(b.vae_device)] if b.vae_device else [])
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)

    seq = run_sequential(gen, ref, avatar, other, b.chunks, b.warmup_chunks, progress)
    pipe = run_pipelined(gen, cfg, ref, avatar, other, b.chunks, b.warmup_chunks, progress)
    live = run_pipelined(gen, cfg, ref, avatar, other, b.chunks, b.warmup_chunks, progress, paced=True)
    audio_s = b.chunks * chunk_s
    dit_rtf = statistics.median(seq["dit_s"]) / chunk_s
    vae_rtf = statistics.median(seq["vae_s"]) / chunk_s
    ffd = seq["dit_s"][0] + seq["vae_s"][0]
    pipe_ffd = pipe["latency_s"][0]
    intervals = [b2 - a for a, b2 in zip(pipe["done"], pipe["done"][1:], strict=False)]
    report = {
        "profile": {
            "video": f"{cfg.video.width}x{cfg.video.height}@{cfg.video.fps}", "backbone": cfg.model.backbone,
            "dtype": cfg.project.dtype, "steps": gen.settings.steps, "chunk_latent_frames": gen.layout.chunk_frames,
            "chunk_video_frames": gen.chunk_video_frames, "chunk_s": chunk_s, "chunks_measured": b.chunks,
            "warmup_chunks": b.warmup_chunks, "sink_frames": gen.layout.sink_frames,
            "window_frames": gen.layout.window_frames, "rapr": gen.layout.rapr,
            "dit_params_m": round(sum(p.numel() for p in gen.dit.parameters()) / 1e6, 3),
            "vae_params_m": round(sum(p.numel() for p in gen.vae.parameters()) / 1e6, 3),
        },  # fmt: skip
        "student": student["label"],
        "compiled": b.compile, "compile_backend": b.compile_backend if b.compile else None,
        "hardware": hardware(gen.device),
        "setup_s": seq["setup_s"],
        "dit": {"rtf": dit_rtf, "ffd_s": seq["dit_s"][0], **_stats(seq["dit_s"])},
        "vae": {"rtf": vae_rtf, "ffd_s": seq["vae_s"][0], **_stats(seq["vae_s"])},
        "sequential": {"rtf": seq["wall_s"] / audio_s, "wall_s": seq["wall_s"], "first_frame_delay_s": ffd,
                       "latency_s": ffd + chunk_s, "chunk_latency": _stats(seq["latency_s"]),
                       "real_time": seq["wall_s"] / audio_s < 1},  # fmt: skip
        "pipelined": {"rtf": pipe["wall_s"] / audio_s, "wall_s": pipe["wall_s"], "first_frame_delay_s": pipe_ffd,
                      "latency_s": pipe_ffd + chunk_s, "chunk_latency": _stats(pipe["latency_s"]),
                      "output_interval": _stats(intervals), "dit_while_overlapped": _stats(pipe["dit_s"]),
                      "worker": pipe["worker"], "vae_device": pipe["vae_device"],
                      "speedup_vs_sequential": seq["wall_s"] / pipe["wall_s"],
                      "bound_by": "vae" if vae_rtf > dit_rtf else "dit",
                      "ideal_speedup": (dit_rtf + vae_rtf) / max(dit_rtf, vae_rtf),
                      "real_time": pipe["wall_s"] / audio_s < 1},  # fmt: skip
        "live": {"first_frame_delay_s": live["latency_s"][0], "latency_s": live["latency_s"][0] + chunk_s,
                 "chunk_latency": _stats(live["latency_s"]),
                 "keeps_up": max(live["latency_s"]) < 2 * max(chunk_s, live["latency_s"][0])},  # fmt: skip
        "peak_memory": _peak_memory(devices),
        "paper_table5": PAPER,
        "per_chunk_latency_s": {"sequential": seq["latency_s"], "pipelined": pipe["latency_s"],
                                "live": live["latency_s"]},  # fmt: skip
    }
    if pipe["frames"] != b.chunks * gen.chunk_video_frames:
        raise RuntimeError(f"the pipelined worker decoded {pipe['frames']} frames, expected "
                           f"{b.chunks * gen.chunk_video_frames}")  # fmt: skip
    return report


def format_report(r: dict) -> str:
    p, d, v, s, q = r["profile"], r["dit"], r["vae"], r["sequential"], r["pipelined"]
    hw = r["hardware"].get("gpu") or f"{r['hardware']['cpu']} ({r['hardware']['cpu_threads']} threads)"
    paper = r["paper_table5"]
    lines = [
        f"benchmark  {p['video']}  {p['backbone']}  {p['steps']} steps  chunk {p['chunk_video_frames']} frames = "
        f"{p['chunk_s']:.2f} s  on {hw}  student: {r['student']}",
        f"  {'':22s}{'RTF':>8s}{'FFD s':>9s}{'p50 ms':>9s}{'p95 ms':>9s}{'p99 ms':>9s}   paper (928x704, 2x H800)",
        f"  {'DiT':22s}{d['rtf']:8.3f}{d['ffd_s']:9.3f}{d['p50_ms']:9.1f}{d['p95_ms']:9.1f}{d['p99_ms']:9.1f}"
        f"   RTF {paper['dit']['rtf']}  FFD {paper['dit']['ffd_s']} s",
        f"  {'VAE decode':22s}{v['rtf']:8.3f}{v['ffd_s']:9.3f}{v['p50_ms']:9.1f}{v['p95_ms']:9.1f}{v['p99_ms']:9.1f}"
        f"   RTF {paper['vae']['rtf']}  FFD {paper['vae']['ffd_s']} s",
    ]
    for name, m in (("end to end, sequential", s), ("end to end, pipelined", q)):
        c = m["chunk_latency"]
        lines.append(f"  {name:22s}{m['rtf']:8.3f}{m['first_frame_delay_s']:9.3f}{c['p50_ms']:9.1f}{c['p95_ms']:9.1f}"
                     f"{c['p99_ms']:9.1f}   latency FFD + chunk = {m['latency_s']:.2f} s (paper {paper['latency_s']} s)")
    lv = r["live"]
    c = lv["chunk_latency"]
    lines.append(f"  {'live (paced), pipelined':22s}{'':8s}{lv['first_frame_delay_s']:9.3f}{c['p50_ms']:9.1f}"
                 f"{c['p95_ms']:9.1f}{c['p99_ms']:9.1f}   audio arrives in real time; latency from its arrival")
    lines += [
        f"  pipelining ({q['worker']}, VAE on {q['vae_device']}): {q['speedup_vs_sequential']:.2f}x faster than "
        f"sequential (ideal {q['ideal_speedup']:.2f}x: bound by the {q['bound_by'].upper()}); output every "
        f"{q['output_interval']['p50_ms']:.1f} ms (p50)",
        f"  setup (reference encode + sink) {r['setup_s']:.3f} s; peak memory: "
        + ", ".join(f"{k.removesuffix('_bytes')} {x / 2**20:.0f} MiB" for k, x in r["peak_memory"].items()),
        f"  real time: sequential {'yes' if s['real_time'] else 'no'}, pipelined {'yes' if q['real_time'] else 'no'} "
        f"(RTF < 1)",
    ]
    return "\n".join(lines)


def _flat_metrics(r: dict) -> dict[str, float]:
    out = {"dit_rtf": r["dit"]["rtf"], "dit_ffd_s": r["dit"]["ffd_s"], "vae_rtf": r["vae"]["rtf"],
           "vae_ffd_s": r["vae"]["ffd_s"], "setup_s": r["setup_s"]}  # fmt: skip
    for mode in ("sequential", "pipelined"):
        m = r[mode]
        out.update({f"{mode}_rtf": m["rtf"], f"{mode}_ffd_s": m["first_frame_delay_s"],
                    f"{mode}_latency_p50_ms": m["chunk_latency"]["p50_ms"],
                    f"{mode}_latency_p95_ms": m["chunk_latency"]["p95_ms"],
                    f"{mode}_latency_p99_ms": m["chunk_latency"]["p99_ms"]})  # fmt: skip
    out["pipeline_speedup"] = r["pipelined"]["speedup_vs_sequential"]
    out.update(live_latency_p50_ms=r["live"]["chunk_latency"]["p50_ms"],
               live_latency_p99_ms=r["live"]["chunk_latency"]["p99_ms"])
    out["peak_rss_mib"] = r["peak_memory"]["process_peak_rss_bytes"] / 2**20
    return {k: float(v) for k, v in out.items()}


def run_benchmark_stage(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    import json

    if cfg.benchmark.chunks < 2:
        raise ConfigError("benchmark.chunks must be at least 2")
    report = run_benchmark(cfg, root, progress=progress)
    out = resolve_path(cfg.benchmark.report, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    flat = _flat_metrics(report)
    metrics = write_json_atomic(resolve_path(cfg.benchmark.metrics, root), flat)
    latency = _latency_csv(report, resolve_path(cfg.benchmark.latency, root))
    q = report["pipelined"]
    summary = (f"benchmark: DiT RTF {report['dit']['rtf']:.3f}, VAE RTF {report['vae']['rtf']:.3f}, end to end "
               f"{report['sequential']['rtf']:.3f} sequential / {q['rtf']:.3f} pipelined "
               f"({q['speedup_vs_sequential']:.2f}x), first-frame delay {report['sequential']['first_frame_delay_s']:.3f} s")
    return StageResult("benchmark", metrics=flat, artifacts=[out, metrics, latency], outputs=[out, metrics, latency],
                       summary=summary,
                       tables={"benchmark_table.json": _table(report)})  # fmt: skip


def _latency_csv(r: dict, path: Path) -> Path:
    """One row per measured chunk: its latency in ms in each mode (sequential, pipelined, live)."""
    per = r["per_chunk_latency_s"]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["chunk,sequential_ms,pipelined_ms,live_ms"]
    for k, vals in enumerate(zip(per["sequential"], per["pipelined"], per["live"], strict=True)):
        lines.append(f"{k}," + ",".join(f"{1e3 * v:.3f}" for v in vals))
    tmp = path.with_suffix(".partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _table(r: dict) -> list[dict]:
    rows = []
    for name, key in (("DiT", "dit"), ("VAE decode", "vae")):
        m = r[key]
        rows.append({"module": name, "rtf": m["rtf"], "ffd_s": m["ffd_s"], "p50_ms": m["p50_ms"],
                     "p95_ms": m["p95_ms"], "p99_ms": m["p99_ms"], "paper_rtf": PAPER[key]["rtf"],
                     "paper_ffd_s": PAPER[key]["ffd_s"]})  # fmt: skip
    for name in ("sequential", "pipelined"):
        m = r[name]
        c = m["chunk_latency"]
        rows.append({"module": f"end to end, {name}", "rtf": m["rtf"], "ffd_s": m["first_frame_delay_s"],
                     "p50_ms": c["p50_ms"], "p95_ms": c["p95_ms"], "p99_ms": c["p99_ms"], "paper_rtf": math.nan,
                     "paper_ffd_s": PAPER["dit"]["ffd_s"] + PAPER["vae"]["ffd_s"]})  # fmt: skip
    return rows
