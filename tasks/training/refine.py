"""Stage `refine` (paper 3.1.2): adversarial refinement of the distilled student against REAL curated clips.

The discriminator (model/discriminator.py) is the teacher's backbone with N_Q Q-Formers of learnable per-frame
queries at intermediate blocks: a Local Realism Branch (a logit per frame) and a Global Consistency Branch
(the reference frame's feature cross-attending to every later frame's, one logit). Both real windows and the
student's rollouts (student forcing, one random exit step per chunk carrying the gradient, the same reference
frame and audio as the real window) are noised to a random level in ``refine.disc_sigma_range`` before the
discriminator sees them. Losses: relativistic (D: softplus(D(fake) - D(real)), G: the mirror), per branch,
global weighted by ``refine.global_weight``; D also takes the approximate R1 (real) and R2 (generated)
penalties ||D(x + s eps) - D(x)||^2 with s = ``refine.penalty_sigma``. One G step and one D step per iteration.

Outputs: data/checkpoints/refine/{step_*,final}.pt (final: the refined student), data/reports/refine/
{metrics.json, sample.mp4}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.discriminator import ConsistencyAwareDiscriminator
from model.losses import approx_r1, approx_r2, relativistic_d_loss, relativistic_g_loss
from model.rollout import student_rollout
from model.sampling import student_sigmas
from tasks.common.models import build_layout
from tasks.common.stage import StageResult
from tasks.config import Config, RefineConfig, data_path
from tasks.training.common import (
    Run,
    dit_from_state,
    latent_fd,
    model_sections,
    noised,
    per_frame_t,
    run_fingerprint,
    sample_vae,
    start_run,
    student_sample,
    student_samples,
    trainable,
    whole,
)
from tasks.training.data import WindowSet, load_windows, windows_digest
from tasks.training.engine import (
    Dist,
    Metrics,
    accumulate,
    action_weights,
    apply_gradients,
    file_digest,
    global_batch,
    history_csv,
    load_final,
    make_ema,
    prepare_training,
    rank_batch,
    run_loop,
    save_step,
    state_dict_of,
    step_generator,
)

STAGE = "refine"


def build_discriminator(cfg: Config, backbone, frames: int) -> ConsistencyAwareDiscriminator:
    r = cfg.refine
    return ConsistencyAwareDiscriminator(backbone, r.num_qformers, r.qformer_queries, r.qformer_layers,
                                         r.qformer_dim, max_frames=frames)  # fmt: skip


def branch_losses(real: dict, fake: dict, weight: float, d_side: bool) -> torch.Tensor:
    fn = relativistic_d_loss if d_side else relativistic_g_loss
    return fn(real["local"], fake["local"]) + weight * fn(real["global_"], fake["global_"])


@dataclass
class RefineDraw:
    """One adversarial step's inputs and random draws (this rank's slice)."""

    text: torch.Tensor  # [B, text_len, text_dim]
    real: torch.Tensor  # [B, z, 1 + F, h, w] real windows (frame 0: the reference the student starts from)
    talk: torch.Tensor  # [B, 1 + F, A, D]
    listen: torch.Tensor
    noise: torch.Tensor  # [B, z, F, h, w]
    renoise: torch.Tensor  # [max(N - 1, 1), B, z, F, h, w]
    exits: list[int]
    sigma: torch.Tensor  # [B] the level both real and generated latents are noised to before D sees them
    eps_real: torch.Tensor  # [B, z, 1 + F, h, w]
    eps_fake: torch.Tensor
    gen_r1: torch.Generator | None = None  # the perturbations of the approximate R1 / R2
    gen_r2: torch.Generator | None = None

    def take(self, sl: slice) -> RefineDraw:
        """The draw of the samples ``sl`` (a micro batch; the R1 / R2 perturbations are drawn whole first)."""
        return RefineDraw(self.text[sl], self.real[sl], self.talk[sl], self.listen[sl], self.noise[sl],
                          self.renoise[:, sl], self.exits, self.sigma[sl], self.eps_real[sl], self.eps_fake[sl])


def refine_update(student, disc: ConsistencyAwareDiscriminator, opt_g, opt_d, draw: RefineDraw, layout,
                  sigmas: list[float], r: RefineConfig, context_mode: str, dist: Dist | None = None,
                  grad_clip: float = 0.0, micro: int = 0) -> dict[str, float]:  # fmt: skip
    """One G step, then one D step; returns the step's metrics (``penalty_share``: (w1 R1 + w2 R2) / D's loss).
    ``micro``: samples per micro batch (0: all at once); both steps accumulate gradients over the micro batches."""
    dist = dist or Dist()
    b, n_frames = draw.real.shape[0], draw.real.shape[2]
    dt = disc.backbone.dtype

    def disc_fn(dr: RefineDraw, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return disc(x.to(dt), per_frame_t(dr.sigma, n_frames), dr.text.to(dt), dr.talk.to(dt), dr.listen.to(dt))

    # 1. generator step: the student's rollout against the frozen discriminator
    fakes: dict[int, torch.Tensor] = {}

    def generator(sl: slice) -> tuple[torch.Tensor, dict]:
        dr = draw.take(sl)
        fake = student_rollout(student, dr.real[:, :, :1], student.prepare_text(dr.text.to(student.dtype)), dr.talk,
                               dr.listen, layout, sigmas, dr.noise, dr.renoise, dr.exits, context_mode)  # fmt: skip
        real_t, fake_t = noised(dr.real, dr.eps_real, dr.sigma), noised(fake, dr.eps_fake, dr.sigma)
        fakes[sl.start] = fake_t.detach()
        with torch.no_grad():
            d_real = disc_fn(dr, real_t)
        return branch_losses(d_real, disc_fn(dr, fake_t), r.global_weight, d_side=False), {}

    trainable(disc, False)
    opt_g.zero_grad(set_to_none=True)
    g_logs = accumulate(student, b, micro, generator)
    gnorm = apply_gradients(opt_g, student, dist, grad_clip)

    # 2. discriminator step: relativistic loss + approximate R1 (real) / R2 (generated), perturbations drawn whole
    trainable(disc, True)
    eps_r1 = torch.randn(draw.real.shape, generator=draw.gen_r1, device=draw.real.device, dtype=draw.real.dtype)
    eps_r2 = torch.randn(draw.real.shape, generator=draw.gen_r2, device=draw.real.device, dtype=draw.real.dtype)

    def discriminator(sl: slice) -> tuple[torch.Tensor, dict]:
        dr = draw.take(sl)
        real_t, fake_t = noised(dr.real, dr.eps_real, dr.sigma), fakes[sl.start]
        d_real, d_fake = disc_fn(dr, real_t), disc_fn(dr, fake_t)
        loss_adv = branch_losses(d_real, d_fake, r.global_weight, d_side=True)

        def logits(x: torch.Tensor) -> torch.Tensor:
            out = disc_fn(dr, x)
            return torch.cat([out["local"], out["global_"][:, None]], 1)

        r1 = approx_r1(logits, real_t, r.penalty_sigma, eps=eps_r1[sl])
        r2 = approx_r2(logits, fake_t, r.penalty_sigma, eps=eps_r2[sl])
        penalty = r.r1_weight * r1 + r.r2_weight * r2
        return loss_adv + penalty, {"adv": float(loss_adv.detach()), "r1": float(r1.detach()),
                                    "r2": float(r2.detach()), "penalty": float(penalty.detach()),
                                    "d_real_local": float(d_real["local"].detach().mean()),
                                    "d_fake_local": float(d_fake["local"].detach().mean())}  # fmt: skip

    opt_d.zero_grad(set_to_none=True)
    d_logs = accumulate(disc, b, micro, discriminator)
    apply_gradients(opt_d, disc, dist, grad_clip)
    share = d_logs["penalty"] / max(d_logs["loss"], 1e-12)
    return {"g_loss": dist.mean(g_logs["loss"]), "d_loss": dist.mean(d_logs["adv"]),
            "r1": dist.mean(d_logs["r1"]), "r2": dist.mean(d_logs["r2"]),
            "penalty_share": dist.mean(share), "d_real_local": d_logs["d_real_local"],
            "d_fake_local": d_logs["d_fake_local"], "grad_norm": float(gnorm)}  # fmt: skip


@torch.no_grad()
def held_out(run: Run, student, val: WindowSet) -> dict[str, float]:
    """The student's streaming samples of the held-out windows (their reference and audio, seeded noise)
    against the real clips: ``fd_real`` (latent Frechet distance, the distributions) and ``mse_real``."""
    cfg, dev = run.cfg, run.device
    real = val.latents
    g = torch.Generator().manual_seed(cfg.project.seed)
    noise = torch.randn((real.shape[0], real.shape[1], real.shape[2] - 1, *real.shape[3:]), generator=g)
    out = student_samples(student, run.window_texts(val), real[:, :, :1].to(dev), val.talk.to(dev),
                          val.listen.to(dev), build_layout(cfg), student_sigmas(cfg.student.steps,
                          cfg.student.timestep_shift), noise.to(dev), cfg.project.seed + 1,
                          cfg.student.context)[:, :, 1:].cpu()  # fmt: skip
    return {"fd_real": latent_fd(out, real[:, :, 1:]), "mse_real": float(((out - real[:, :, 1:]) ** 2).mean())}


def _history(rows: list[dict], total: int) -> dict[str, float]:
    """Run means of the penalties and their share of D's loss (the last step alone is one noisy draw)."""
    rows = [x for x in rows if x["step"] < total and "penalty_share" in x]
    if not rows:
        return {}
    mean = {k: sum(x[k] for x in rows) / len(rows) for k in ("penalty_share", "r1", "r2", "d_loss", "g_loss")}
    return {f"{k}_mean": v for k, v in mean.items()}


def run_refine(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    run = start_run(cfg, root, progress)
    dist, device, r = run.dist, run.device, cfg.refine
    teacher_path = run.checkpoint_root / "teacher" / "final.pt"
    student_path = run.checkpoint_root / "distill" / "final.pt"
    student = dit_from_state(cfg, run.audio, load_final(student_path, "distilled student (stage distill)")["model"],
                             device, run.dtype)  # fmt: skip
    backbone = dit_from_state(cfg, run.audio, load_final(teacher_path, "teacher")["model"], device, run.dtype)
    data = load_windows(cfg, root, "train")
    n_frames = data.latents.shape[2]
    disc = build_discriminator(cfg, backbone, n_frames).to(device)
    upstream = {"teacher": file_digest(teacher_path), "student": file_digest(student_path),
                "data": windows_digest(cfg, root)}
    ckpt = run.checkpoints(STAGE, run_fingerprint(cfg, model_sections() + [STAGE], upstream))
    val = load_windows(cfg, root, "val", limit=cfg.train.val_windows)
    before = held_out(run, student, val)  # the distilled student, before any resumed refinement
    state = ckpt.latest()
    start = state["step"] if state is not None else 0
    wd = cfg.train.weight_decay
    student, opt_g = prepare_training(
        student.train(), lambda m: torch.optim.AdamW(m.parameters(), lr=r.lr, betas=(0.0, 0.999), weight_decay=wd),
        dist, cfg.train.parallel, state and state["model"], state and state["optimizer"], run.compute)  # fmt: skip
    disc, opt_d = prepare_training(  # the discriminator is small: replicated
        disc, lambda m: torch.optim.AdamW(m.parameters(), lr=r.disc_lr, betas=(0.0, 0.999), weight_decay=wd),
        dist, "none", state and state["discriminator"], state and state["disc_optimizer"])  # fmt: skip
    disc.train()
    ema = make_ema(student, cfg.train.ema_decay, state)  # the generator's average (train.ema_decay)
    layout = build_layout(cfg)
    sigmas = student_sigmas(cfg.student.steps, cfg.student.timestep_shift)
    chunks = layout.chunks(n_frames)[1:]
    gb = r.batch_size
    per = rank_batch(gb, dist, "refine.batch_size")
    lat_shape = data.latents.shape[1:]
    lo, hi = r.disc_sigma_range
    draw_weights = action_weights(data.index["action"], cfg.train.action_share)

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, STAGE, s)
        idx = global_batch(g, len(data), gb, draw_weights)
        gen_shape = (gb, lat_shape[0], n_frames - 1, *lat_shape[2:])
        noise = torch.randn(gen_shape, generator=g)
        renoise = torch.randn((max(len(sigmas) - 1, 1), *gen_shape), generator=g)
        exits = torch.randint(len(sigmas), (len(chunks),), generator=g).tolist()
        sigma = lo + (hi - lo) * torch.rand(gb, generator=g)
        eps_real = torch.randn((gb, *lat_shape), generator=g)
        eps_fake = torch.randn((gb, *lat_shape), generator=g)
        idx, noise, sigma, eps_real, eps_fake = (dist.slice(v) for v in (idx, noise, sigma, eps_real, eps_fake))
        if dist.world > 1:
            renoise = renoise[:, dist.rank * per : (dist.rank + 1) * per]
        draw = RefineDraw(run.window_texts(data, idx), data.latents[idx].to(device), data.talk[idx].to(device),
                          data.listen[idx].to(device), noise.to(device), renoise.to(device), exits, sigma.to(device),
                          eps_real.to(device), eps_fake.to(device), step_generator(cfg.project.seed, STAGE, s, "r1"),
                          step_generator(cfg.project.seed, STAGE, s, "r2"))  # fmt: skip
        logs = refine_update(student, disc, opt_g, opt_d, draw, layout, sigmas, r, cfg.student.context, dist,
                             cfg.train.grad_clip, cfg.train.micro_batch_size)  # fmt: skip
        if ema is not None:
            ema.update(student)
        return logs

    def save(s: int) -> None:
        save_step(ckpt, s, dist, cfg.train.parallel, {"model": (student, opt_g)}, cfg.train.sharded_checkpoints,
                  extra={"discriminator": state_dict_of(disc), "disc_optimizer": opt_d.state_dict()}, ema=ema)  # fmt: skip

    metrics = Metrics(ckpt.dir / "metrics.jsonl", STAGE, cfg.train.log_every, dist.main, fresh=start == 0)
    last = run_loop(STAGE, start, r.iterations, step, save, metrics, cfg.train.checkpoint_every, run.progress,
                    amp=run.autocast)  # fmt: skip
    if ema is not None:  # the generator's average is the refined student
        ema.copy_to(student)
    after = held_out(run, student, val)
    result = StageResult(STAGE)
    sd = state_dict_of(student)
    if dist.main:
        student = whole(run, student, sd)
        final = ckpt.save_final({"model": sd, "spec": student.spec.to_json(), "step": r.iterations})
        report = data_path(cfg, root, "reports", STAGE)
        report.mkdir(parents=True, exist_ok=True)
        m = {"steps": float(r.iterations), "windows_train": float(len(data)), "windows_val": float(len(val)),
             **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
             **_history(metrics.history, r.iterations), **{f"last_{k}": v for k, v in last.items()}}  # fmt: skip
        (report / "metrics.json").write_text(json.dumps(m, indent=2))
        artifacts = [report / "metrics.json", history_csv(ckpt.dir / "metrics.jsonl", report / "loss.csv")]
        if cfg.train.sample_video:
            artifacts.append(student_sample(run, student, sample_vae(cfg, root), val, report / "sample.mp4"))
        result = StageResult(
            STAGE, metrics=m, artifacts=artifacts, outputs=[final], model=final,
            summary=(f"refine: {r.iterations} adversarial steps on {len(data)} real windows; on {len(val)} held-out "
                     f"windows the student's samples vs the real clips: latent Frechet distance "
                     f"{before['fd_real']:.4f} -> {after['fd_real']:.4f}, same-window MSE {before['mse_real']:.4f} -> "
                     f"{after['mse_real']:.4f}; G loss {last.get('g_loss', float('nan')):.4g}, D loss "
                     f"{last.get('d_loss', float('nan')):.4g}, R1+R2 "
                     f"{100 * m.get('penalty_share_mean', float('nan')):.1f}% of D's loss; the refined student "
                     f"streamed data/reports/refine/sample.mp4"),
        )  # fmt: skip
    dist.barrier()
    return result
