"""`streamavatar bench --train-step`: one teacher training step at the profile's shapes, timed, against the
capacity planner (tasks/planning.py).

Random weights at the profile's shapes (no checkpoint is loaded: the speed does not depend on the values), on
``project.device``, float32 master weights with ``project.dtype`` autocast and ``train.activation_checkpointing``
as the stage runs them; ``train.micro_batch_size`` samples (1 when 0) of the teacher's flow-matching loss,
forward and backward (the optimizer step is left out: its time is memory-bound and small, and AdamW's state
would double the memory of a one-GPU check). Reports the median step time, the FLOPs the planner counts for it,
the achieved TFLOP/s and MFU against ``--peak-tflops``, and the peak memory against the planner's prediction
(parameters + gradients + activations; CUDA only -- on CPU the process RSS).

Under torchrun, one process per GPU with its own micro batch: ``train.parallel=fsdp`` shards the model with
FSDP2 as the stages do (per block, bf16 all-gathers, float32 master weights and gradient reductions), ``ddp``
replicates it and all-reduces the gradients once; the step time is the slowest process's, the FLOPs, MFU and
memory are per process (per GPU), and the first process writes the report.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch
import torch.distributed as tdist

from tasks.common.models import build_dit, device_of
from tasks.config import Config, ConfigError
from tasks.planning import activation_bytes, audio_dim, forward_flops, shapes
from tasks.training.engine import init_dist, shard_model, sharded
from tasks.training.teacher import teacher_loss

GIB = 1024**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_train_step_bench(cfg: Config, steps: int = 5, peak_tflops: float = 989.0) -> dict[str, Any]:
    if steps < 2:
        raise ConfigError("--steps: at least 2 (the first step is warm-up)")
    dist = init_dist(device_of(cfg))  # under torchrun: one process per GPU (NCCL; gloo on CPU)
    device = dist.device
    s = shapes(cfg)
    dtype = "bfloat16" if cfg.project.dtype in ("bfloat16", "float16") else "float32"
    micro = cfg.train.micro_batch_size or 1
    fsdp = sharded(cfg.train.parallel, dist)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_dit(cfg, audio_dim(cfg), pretrained=False, dtype=torch.float32).to(device).train()
    if fsdp:  # FSDP2 as the stages shard it: per block, bf16 all-gathers, float32 master weights and reductions
        shard_model(model, dist, "fsdp", torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    z, f = cfg.vae.z_dim, s.latent_frames
    h, w = cfg.video.height // cfg.vae.spatial_compression, cfg.video.width // cfg.vae.spatial_compression
    g = torch.Generator().manual_seed(dist.rank)  # each process its own micro batch
    x0 = torch.randn(micro, z, f, h, w, generator=g).to(device)
    noise = torch.randn(micro, z, f, h, w, generator=g).to(device)
    audio = torch.randn(micro, f, s.audio_tokens, audio_dim(cfg), generator=g).to(device)
    text = torch.randn(micro, cfg.model.text_len, cfg.model.text_dim, generator=g).to(device)
    sigma = torch.full((micro,), 0.5, device=device)
    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with amp():
            loss = teacher_loss(model, x0, sigma, noise, text, audio, audio)
        loss.backward()
        if not fsdp:
            dist.average_gradients(model.parameters())  # the replicated path's one all-reduce (none alone)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if dist.world > 1:  # the slowest process bounds the step
        slowest = torch.tensor(times, dtype=torch.float64, device=device)
        tdist.all_reduce(slowest, op=tdist.ReduceOp.MAX)
        times = slowest.tolist()
    step = statistics.median(times[1:])
    ck = cfg.train.activation_checkpointing
    flops = micro * (4 if ck else 3) * forward_flops(s, s.tokens, s.tokens)  # per process (GPU)
    # fp32 weights + gradients (sharded over the processes under FSDP2, plus the gathered block in use and the
    # prefetched one, as the planner counts them) + this process's activations
    shard = dist.world if fsdp else 1
    gathered = 2 * s.block_params * 4 if fsdp else 0
    predicted = 8 * s.dit_params / shard + gathered + micro * activation_bytes(s, s.tokens, dtype, ck)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        import resource

        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (CPU)"
    tflops = flops / step / 1e12
    return {"profile": {"video": f"{cfg.video.width}x{cfg.video.height}", "dtype": cfg.project.dtype,
                        "device": str(device), "params_b": s.dit_params / 1e9, "tokens_per_sample": s.tokens,
                        "micro_batch_size": micro, "activation_checkpointing": ck,
                        "processes": dist.world, "parallel": "fsdp" if model.sharded else ("ddp" if dist.world > 1 else "one")},
            "step_s": {"median": step, "all": times}, "tflops_per_step": flops / 1e12, "achieved_tflops": tflops,
            "peak_tflops": peak_tflops, "mfu": tflops / peak_tflops,
            "memory": {"peak_gib": peak / GIB, "kind": kind, "planner_gib": predicted / GIB}}  # fmt: skip


def format_report(r: dict) -> str:
    p, m = r["profile"], r["memory"]
    return "\n".join([
        f"train step (teacher loss, forward + backward) at {p['video']}, {p['dtype']} on {p['device']}: "
        f"{p['params_b']:.3f} B parameters, {p['tokens_per_sample']} tokens x micro batch {p['micro_batch_size']}, "
        f"activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}, "
        f"{p.get('processes', 1)} process(es) ({p.get('parallel', 'one')}; figures per process)",
        f"  median step {r['step_s']['median']:.3f} s; {r['tflops_per_step']:.2f} TFLOP per step -> "
        f"{r['achieved_tflops']:.2f} TFLOP/s, MFU {100 * r['mfu']:.1f} % of {r['peak_tflops']:g}",
        f"  peak memory {m['peak_gib']:.2f} GiB ({m['kind']}); the planner predicts {m['planner_gib']:.2f} GiB",
    ])  # fmt: skip
