"""`streamavatar plan`: what each training stage needs per GPU, before a cluster is booked.

For a profile (``--config configs/paper.yaml``), ``--gpus`` and ``--gpu-memory-gib``, per training stage
(teacher, ode_init, distill = SiD, refine = GAN): the models it trains and keeps frozen (parameters counted on
the real classes, built on the meta device), the bytes per GPU of parameters, gradients and AdamW state
(float32 master weights; FSDP shards them over the GPUs, DDP replicates), the activations autograd keeps for
one micro batch, the tokens per sample, the FLOPs per optimizer step and the step time at a stated MFU. Then
which (micro batch, activation checkpointing) settings fit.

Activations: per token and transformer block autograd keeps ``a * dim + b * ffn_dim + c`` bytes, with (a, b, c)
measured on this code with torch's saved-tensor hooks (float32 and bfloat16 autocast; tests/test_plan.py
re-measures a model of another shape against :func:`activation_bytes`). With activation checkpointing a block
keeps only its input (``dim`` values per token) plus, while one block is recomputed, that block's activations.
Forward passes that write the student's KV cache (the rollout of SiD / GAN) are not checkpointed by the model
(model/dit.py), so they always keep everything.

FLOPs: 2 per multiply-add of every matmul (linear layers on each token, attention over the keys each query
sees, the text and audio cross-attentions); a training forward+backward is 3 forwards, 4 with checkpointing; a
frozen network that only passes gradients to its input costs 2 forwards. tests/test_plan.py checks the teacher
stage's figure against torch's FlopCounterMode.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from model.dit import AudioDiT
from tasks.common.models import dit_spec
from tasks.config import Config, ConfigError

GIB = 1024**3
# bytes autograd keeps per token per transformer block: a * dim + b * ffn_dim + c, measured on this code
# (AudioDiT blocks with both audio attentions, flash SDPA; see the module docstring)
ACT_COEF = {"float32": (191.9, 10.0, -2499.0), "bfloat16": (137.2, 5.0, -1217.0)}
# outside the blocks (patch embedding, time modulation, output head, loss): a * dim + c bytes per token
ACT_BASE = {"float32": (41.8, -740.0), "bfloat16": (25.0, -208.0)}
CHECKPOINT_KEEP = {"float32": 4.0, "bfloat16": 2.0}  # bytes per value of a checkpointed block's input


@dataclass
class Shapes:
    dim: int
    ffn_dim: int
    layers: int
    heads: int
    dit_params: int
    block_params: int
    disc_params: int  # the discriminator: the backbone (a copy of the teacher) + its Q-Former heads
    latent_frames: int  # 1 + F (the reference first)
    tokens_per_frame: int
    text_len: int
    audio_tokens: int  # per latent frame
    chunk_frames: int
    context_frames: int  # sink + window: what a streaming chunk attends to besides itself
    steps: int  # the student's denoising steps

    @property
    def tokens(self) -> int:
        return self.latent_frames * self.tokens_per_frame


def audio_dim(cfg: Config) -> int:
    a = cfg.audio
    if a.features == "logmel":
        return a.n_mels * 4  # LogMelFeatures: 4 sub-frames per video frame
    hidden = 768  # wav2vec2-base; read from the checkpoint's config when it is here
    if a.wav2vec2_path:
        from pathlib import Path

        path = Path(a.wav2vec2_path).expanduser() / "config.json"
        if path.is_file():
            hidden = int(json.loads(path.read_text()).get("hidden_size", hidden))
    return hidden * len(a.wav2vec2_layers)


def shapes(cfg: Config) -> Shapes:
    from model.discriminator import ConsistencyAwareDiscriminator

    spec = dit_spec(cfg, audio_dim(cfg))
    with torch.device("meta"):
        dit = AudioDiT(spec)
        r = cfg.refine
        frames = 1 + cfg.train.window_chunks * cfg.student.chunk_frames
        disc = ConsistencyAwareDiscriminator(dit, r.num_qformers, r.qformer_queries, r.qformer_layers, r.qformer_dim,
                                             max_frames=frames)  # fmt: skip
    v, p = cfg.video, spec.patch_size
    sc = cfg.vae.spatial_compression
    if v.height % (sc * p[1]) or v.width % (sc * p[2]):
        raise ConfigError(f"video {v.width}x{v.height} does not split into {sc}x spatial compression x patch {p}")
    return Shapes(dim=spec.dim, ffn_dim=spec.ffn_dim, layers=spec.num_layers, heads=spec.num_attention_heads,
                  dit_params=sum(t.numel() for t in dit.parameters()),
                  block_params=sum(t.numel() for t in dit.blocks[0].parameters()),
                  disc_params=sum(t.numel() for t in disc.parameters()), latent_frames=frames,
                  tokens_per_frame=(v.height // (sc * p[1])) * (v.width // (sc * p[2])), text_len=cfg.model.text_len,
                  audio_tokens=cfg.vae.temporal_compression * (2 * cfg.audio.window_frames + 1),
                  chunk_frames=cfg.student.chunk_frames,
                  context_frames=cfg.student.sink_frames + cfg.student.window_frames, steps=cfg.student.steps)  # fmt: skip


def activation_bytes(s: Shapes, tokens: int, dtype: str, checkpointing: bool) -> float:
    """Bytes autograd keeps for one sample's forward over ``tokens`` tokens through all blocks."""
    a, b, c = ACT_COEF[dtype]
    per_block = max(a * s.dim + b * s.ffn_dim + c, 0.0) * tokens
    base = max(ACT_BASE[dtype][0] * s.dim + ACT_BASE[dtype][1], 0.0) * tokens
    if not checkpointing:
        return base + per_block * s.layers
    return base + CHECKPOINT_KEEP[dtype] * s.dim * tokens * s.layers + per_block


def forward_flops(s: Shapes, queries: int, keys_per_query: float) -> float:
    """FLOPs of one forward of ``queries`` tokens whose self-attention reads ``keys_per_query`` keys each."""
    d, f = s.dim, s.ffn_dim
    frames = queries / s.tokens_per_frame
    # per video token: self-attention q, k, v, out (4 d^2), the text attention's q, out (2 d^2), both audio
    # attentions' q, out (4 d^2), the FFN (2 d f); the text's and the audio tokens' own k, v projections
    linear = 2.0 * (10 * d * d + 2 * d * f) * queries + 2.0 * 2 * d * d * s.text_len \
        + 2.0 * 4 * d * d * s.audio_tokens * frames
    attn = 4.0 * queries * keys_per_query * d  # QK^T and AV
    cross = 4.0 * queries * (s.text_len + 2 * s.audio_tokens) * d
    return (linear + attn + cross) * s.layers


@dataclass
class StagePlan:
    stage: str
    trained_params_m: float
    frozen_params_m: float
    tokens_per_sample: int
    state_gib: float  # parameters + gradients + optimizer state (+ frozen weights, + gathered blocks) per GPU
    activations_gib_per_sample: float
    activations_checkpointed_gib_per_sample: float
    tflops_per_sample: float
    tflops_per_sample_checkpointed: float
    batch_size: int
    per_gpu_batch: int
    fits: list[dict]  # settings (micro batch, checkpointing) with their memory, the ones that fit
    step_seconds: float | None  # at the chosen setting (the largest micro batch that fits, checkpointing if needed)
    chosen: dict | None


def stage_plans(cfg: Config, gpus: int, gpu_memory_gib: float, mfu: float, peak_tflops: float,
                parallel: str | None = None) -> tuple[Shapes, list[StagePlan]]:  # fmt: skip
    if gpus < 1 or gpu_memory_gib <= 0 or not 0 < mfu <= 1 or peak_tflops <= 0:
        raise ConfigError("plan: --gpus >= 1, --gpu-memory-gib > 0, 0 < --mfu <= 1 and --peak-tflops > 0")
    s = shapes(cfg)
    dtype = "bfloat16" if cfg.project.dtype in ("bfloat16", "float16") else "float32"
    cbytes = 2 if dtype == "bfloat16" else 4
    parallel = parallel or cfg.train.parallel
    shard = gpus if parallel == "fsdp" and gpus > 1 else 1
    L, P, D = s.tokens, s.dit_params, s.disc_params
    chunk_tokens = L - s.tokens_per_frame  # the generated frames (the reference is given)
    keys_stream = (s.context_frames + s.chunk_frames) * s.tokens_per_frame
    keys_causal = (s.latent_frames / 2 + s.chunk_frames) * s.tokens_per_frame  # block-causal, on average
    bidir = forward_flops(s, L, L)
    causal = forward_flops(s, L, keys_causal)
    rollout = forward_flops(s, chunk_tokens, keys_stream)  # one denoising step of every chunk
    guided = 2 if cfg.distill.real_guidance != 1.0 else 1
    act = {ck: activation_bytes(s, L, dtype, ck) for ck in (False, True)}
    roll_act = activation_bytes(s, chunk_tokens, dtype, False)  # cached forwards: never checkpointed
    # per stage: (trained params, frozen params, activations per sample {ckpt: bytes}, flops per sample {ckpt})
    specs = {
        "teacher": (P, 0, act, {False: 3 * bidir, True: 4 * bidir}, cfg.teacher.batch_size),
        "ode_init": (P, 0, act, {False: 3 * causal, True: 4 * causal}, cfg.ode_init.batch_size),
        # SiD generator step: the rollout (N steps, the exit one with autograd) + the guided teacher and the fake
        # score passing gradients to their input; then the fake score's own training step
        "distill": (2 * P, P, {ck: roll_act + (guided + 1) * act[ck] for ck in (False, True)},
                    {ck: (s.steps + 2) * rollout + 2 * (guided + 1) * bidir + (4 if ck else 3) * bidir
                     for ck in (False, True)}, cfg.distill.batch_size),  # fmt: skip
        # GAN: the rollout + D on real (no grad) and generated (grad to the student); D's step on real, generated
        # and the two finite-difference penalties (4 more forwards)
        "refine": (P + D, 0, {ck: roll_act + 6 * act[ck] for ck in (False, True)},
                   {ck: (s.steps + 2) * rollout + 3 * bidir + 6 * (4 if ck else 3) * bidir for ck in (False, True)},
                   cfg.refine.batch_size),  # fmt: skip
    }
    out = []
    for stage, (trained, frozen, acts, flops, batch) in specs.items():
        if batch % gpus:
            raise ConfigError(f"{stage}.batch_size {batch} does not split evenly over {gpus} GPUs")
        per_gpu = batch // gpus
        gathered = 2 * s.block_params * 4 if shard > 1 else 0  # the unsharded block in use + the prefetched one
        # train.ema_decay: a float32 average of the trained network (the teacher's DiT, the student generator;
        # not the fake score nor the discriminator), sharded like its parameters
        averaged = P if cfg.train.ema_decay else 0
        state = (16 * trained + cbytes * frozen + 4 * averaged) / shard + gathered
        fits = []
        for ck in (False, True):
            for micro in sorted({1, 2, 4, 8, 16, per_gpu} & set(range(1, per_gpu + 1))):
                total = state + micro * acts[ck]
                fits.append({"micro_batch_size": micro, "activation_checkpointing": ck,
                             "memory_gib": round(total / GIB, 2), "fits": total <= 0.9 * gpu_memory_gib * GIB})  # fmt: skip
        ok = [f for f in fits if f["fits"]]
        chosen = None
        if ok:  # the fastest: no checkpointing if anything fits without it, then the largest micro batch
            chosen = max(ok, key=lambda f: (not f["activation_checkpointing"], f["micro_batch_size"]))
        ck = bool(chosen and chosen["activation_checkpointing"])
        seconds = batch * flops[ck] / (gpus * peak_tflops * 1e12 * mfu)
        out.append(StagePlan(stage, trained / 1e6, frozen / 1e6, L, state / GIB, acts[False] / GIB, acts[True] / GIB,
                             flops[False] / 1e12, flops[True] / 1e12, batch, per_gpu, fits,
                             seconds if chosen else None, chosen))  # fmt: skip
    return s, out


def render(s: Shapes, plans: list[StagePlan], gpus: int, gpu_memory_gib: float, mfu: float, peak: float) -> str:
    lines = [f"model: {s.dit_params / 1e9:.3f} B parameters ({s.layers} blocks of {s.block_params / 1e6:.1f} M, "
             f"dim {s.dim}, ffn {s.ffn_dim}); a sample = {s.latent_frames} latent frames x {s.tokens_per_frame} "
             f"tokens = {s.tokens} tokens; {gpus} GPUs x {gpu_memory_gib:g} GiB, MFU {mfu:g} of {peak:g} TFLOPs",
             "",
             f"{'stage':9s} {'trained':>8s} {'frozen':>7s} {'state/GPU':>10s} {'act/sample':>11s} {'(ckpt)':>8s} "
             f"{'TFLOP/sample':>13s} {'batch':>6s} {'setting that fits':>26s} {'step':>9s}"]  # fmt: skip
    for p in plans:
        c = p.chosen
        setting = (f"micro {c['micro_batch_size']}{', ckpt' if c['activation_checkpointing'] else ''} "
                   f"({c['memory_gib']:.1f} GiB)") if c else "none fits"  # fmt: skip
        step = f"{p.step_seconds:.2f} s" if p.step_seconds is not None else "-"
        lines.append(f"{p.stage:9s} {p.trained_params_m:7.0f}M {p.frozen_params_m:6.0f}M {p.state_gib:8.2f}G "
                     f"{p.activations_gib_per_sample:10.2f}G {p.activations_checkpointed_gib_per_sample:7.2f}G "
                     f"{p.tflops_per_sample:13.1f} {p.batch_size:6d} {setting:>26s} {step:>9s}")  # fmt: skip
    lines.append("")
    lines.append("state: fp32 master weights + gradients + AdamW (16 bytes/parameter; FSDP shards it over the GPUs),")
    lines.append("frozen networks in the compute dtype, the gathered blocks, the weight average (train.ema_decay,")
    lines.append("4 bytes/parameter of the trained DiT); act: what autograd keeps per micro-batch")
    lines.append("sample, without and with activation checkpointing (the student's cached rollout is never")
    lines.append("checkpointed); a setting fits within 90% of the GPU's memory.")
    return "\n".join(lines)


def plan(cfg: Config, gpus: int, gpu_memory_gib: float, mfu: float = 0.35, peak_tflops: float = 989.0,
         as_json: bool = False) -> str:  # fmt: skip
    s, plans = stage_plans(cfg, gpus, gpu_memory_gib, mfu, peak_tflops)
    if as_json:
        return json.dumps({"shapes": asdict(s) | {"tokens": s.tokens}, "gpus": gpus, "gpu_memory_gib": gpu_memory_gib,
                           "mfu": mfu, "peak_tflops": peak_tflops, "stages": [asdict(p) for p in plans]},
                          indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)  # fmt: skip
    return render(s, plans, gpus, gpu_memory_gib, mfu, peak_tflops)
