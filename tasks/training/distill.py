"""Stage `distill` (paper 3.1.1): ODE initialisation, then SiD distillation with student forcing.

1. ODE init (``ode_init.*``). The student starts as a copy of the teacher, run block-causally (chunks of C
   latent frames, the Reference Sink, the rolling window and RAPR of ``student.*``, in training exactly as in
   streaming). Each step takes ODE pairs, picks for every chunk one of the kept noise levels, feeds the chunk
   the teacher's state at that level, and regresses the student's x0 prediction onto the teacher's final x0;
   ``ode_init.gt_share`` of the rows instead noise the pair's own data window at those levels and regress onto
   it (the student learns to continue what its context shows, which the teacher's outputs never ask for).
   Reported on held-out (validation) pairs, before and after: how far the student's own few-step samples
   (through the streaming path, from the pair's initial noise) are from the teacher's ODE outputs from the SAME
   noise (MSE), and as distributions (latent Frechet distance, tasks/training/common.py).
2. SiD (``distill.*``). Per step, 1:1: the student rolls out a clip through its streaming path (student
   forcing; one random exit step per chunk carries the gradient, model/rollout.py), the sample is noised at a
   random level, the frozen teacher (real score, CFG ``distill.real_guidance``) and the fake-score network
   (initialised from the teacher) predict x0, and the generator takes the SiD loss (model/losses.py,
   ``distill.sid_alpha``); then the fake-score network takes its denoising loss on the detached sample.
   Reported: the same two held-out measures before (= after ODE init) and after SiD, and the generator's
   gradient norm and the real-fake score gap over the run (a SiD that starts at zero gradient shows here).

Outputs: data/checkpoints/distill/{ode_init,sid}/ (resume points), data/checkpoints/distill/ode_init.pt (the
student after ODE init alone, for evaluate's chain table), data/checkpoints/distill/final.pt (the
student), data/reports/distill/{metrics.json, sample.mp4}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.losses import fake_score_loss, sid_generator_loss, x0_regression_loss
from model.rollout import student_rollout
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise, predict_x0, student_sigmas
from tasks.common.models import build_layout
from tasks.common.stage import StageResult
from tasks.config import Config, DistillConfig, data_path
from tasks.training.common import (
    Run,
    clone,
    dit_from_state,
    frame_mask,
    frozen,
    latent_fd,
    memory_param_groups,
    model_sections,
    noised,
    per_frame_t,
    run_fingerprint,
    sample_vae,
    start_run,
    student_sample,
    student_samples,
    teacher_x0,
    trainable,
    whole,
)
from tasks.training.data import windows_digest
from tasks.training.engine import (
    Dist,
    Metrics,
    accumulate,
    action_weights,
    apply_gradients,
    atomic_save,
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
from tasks.training.ode_pairs import load_pairs, pairs_digest, windows_for

STAGE = "distill"


def run_distill(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    run = start_run(cfg, root, progress)
    dist = run.dist
    teacher_path = run.checkpoint_root / "teacher" / "final.pt"
    teacher_state = load_final(teacher_path, "teacher")["model"]
    upstream = {"teacher": file_digest(teacher_path), "data": windows_digest(cfg, root),
                "pairs": pairs_digest(cfg, root)}  # fmt: skip

    # 1. ODE initialisation; measured on held-out pairs before and after
    student = dit_from_state(cfg, run.audio, teacher_state, run.device, run.dtype)
    before, reg_before = ode_match(run, student), ode_regression(run, student)
    fp_init = run_fingerprint(cfg, model_sections() + ["ode_init"], upstream)
    student, init_last = ode_init(run, student, fp_init)
    after, reg_after = ode_match(run, student), ode_regression(run, student)
    init_sd = state_dict_of(student)  # under FSDP2 a collective: every rank
    if dist.main:  # the student after ODE init alone, for evaluate's chain table (before SiD changes it)
        atomic_save({"model": init_sd, "spec": student.spec.to_json(), "step": cfg.ode_init.iterations,
                      "fingerprint": fp_init}, run.checkpoint_root / STAGE / "ode_init.pt")  # fmt: skip

    # 2. SiD with student forcing; measured on the same held-out pairs before (= after ODE init) and after
    teacher = frozen(dit_from_state(cfg, run.audio, teacher_state, run.device, run.dtype))
    fp_sid = run_fingerprint(cfg, model_sections() + ["ode_init", STAGE], upstream)
    student, sid_last, sid_hist = sid(run, student, teacher, fp_sid)
    sid_after = ode_match(run, student)

    result = StageResult(STAGE)
    sd = state_dict_of(student)
    if dist.main:
        student = whole(run, student, sd)
        ckpt = run.checkpoints(STAGE, fp_sid)
        final = ckpt.save_final({"model": sd, "spec": student.spec.to_json(), "step": cfg.distill.iterations})
        report = data_path(cfg, root, "reports", STAGE)
        report.mkdir(parents=True, exist_ok=True)
        m = {"ode_match_mse_before": before["mse"], "ode_match_mse_after": after["mse"],
             "ode_match_fd_before": before["fd"], "ode_match_fd_after": after["fd"],
             "ode_x0_mse_before": reg_before, "ode_x0_mse_after": reg_after,
             "sid_ode_match_mse_before": after["mse"], "sid_ode_match_mse_after": sid_after["mse"],
             "sid_fd_teacher_before": after["fd"], "sid_fd_teacher_after": sid_after["fd"],
             "sid_real_guidance": float(cfg.distill.real_guidance), "val_pairs": before["pairs"],
             **{f"ode_init_last_{k}": v for k, v in init_last.items()},
             **{f"sid_last_{k}": v for k, v in sid_last.items()}, **sid_hist}  # fmt: skip
        (report / "metrics.json").write_text(json.dumps(m, indent=2))
        artifacts = [report / "metrics.json"]
        for phase in ("ode_init", "sid"):  # each phase's loss curve (dvc.yaml plots)
            artifacts.append(history_csv(ckpt.dir / phase / "metrics.jsonl", report / f"{phase}_loss.csv"))
        if cfg.train.sample_video:
            from tasks.training.data import load_windows

            val = load_windows(cfg, root, "val", limit=cfg.train.val_windows)
            artifacts.append(student_sample(run, student, sample_vae(cfg, root), val, report / "sample.mp4"))
        result = StageResult(
            STAGE, metrics=m, artifacts=artifacts, outputs=[final],
            summary=(f"distill on {before['pairs']:.0f} held-out ODE pairs: ODE init {cfg.ode_init.iterations} steps, "
                     f"the student's x0 from the teacher's states vs the teacher's ODE output (MSE) "
                     f"{reg_before:.4f} -> {reg_after:.4f}, its own {cfg.student.steps}-step streaming samples vs the "
                     f"ODE output from the same noise {before['mse']:.4f} -> {after['mse']:.4f}; SiD "
                     f"{cfg.distill.iterations} steps (real-score guidance {cfg.distill.real_guidance:g}, generator "
                     f"grad norm {sid_hist.get('sid_grad_norm_mean', float('nan')):.3g}): same-noise MSE "
                     f"{after['mse']:.4f} -> {sid_after['mse']:.4f}, latent Frechet distance to the teacher's ODE "
                     f"outputs {after['fd']:.4f} -> {sid_after['fd']:.4f}"),
        )  # fmt: skip
    dist.barrier()
    return result


# ------------------------------------------------------------------------------------------------ ODE init
def ode_init_loss(student, x: torch.Tensor, frame_sigma: torch.Tensor, text: torch.Tensor, talk: torch.Tensor,
                  listen: torch.Tensor, layout, target: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ODE-init objective of one batch: the block-causal student's x0 prediction from the teacher's states
    ``x`` [B, z, 1 + F, h, w] at per-frame levels ``frame_sigma`` [B, 1 + F] (0 at the reference) against the
    teacher's ODE output ``target`` (reference first); the reference frame is left out of the mean."""
    b, n_frames, dt = x.shape[0], x.shape[2], student.dtype
    v = student(x.to(dt), frame_sigma * NUM_TRAIN_TIMESTEPS, text.to(dt), talk.to(dt), listen.to(dt),
                attention="block_causal", layout=layout).float()  # fmt: skip
    pred = predict_x0(x, v, frame_sigma[:, None, :, None, None])
    return x0_regression_loss(pred, target, frame_mask(b, n_frames, x.device))


def ode_init_batch(data: torch.Tensor, states: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor,
                   chunks: list[tuple[int, int]], level: torch.Tensor, real: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x, frame_sigma, target) of one ODE-init batch. Row b: the reference (``data`` [B, z, 1 + F, h, w] frame
    0, clean) and, for every chunk (``chunks``: frame ranges after the reference), the teacher's state
    (``states`` [B, N, z, F, h, w]) at kept level ``level`` [B, chunks] (``sigmas`` [N]); the target is the
    teacher's output ``x0`` [B, z, F, h, w] after the reference. Rows where ``real`` [B] is true instead hold
    their data window noised with ``noise`` at the same levels, and regress onto the data itself."""
    b, n_frames = data.shape[0], data.shape[2]
    x = torch.empty_like(data)
    x[:, :, 0] = data[:, :, 0]
    frame_sigma = torch.zeros(b, n_frames)
    rows = torch.arange(b)
    for c, (st, en) in enumerate(chunks):
        k = level[:, c]
        x[:, :, st:en] = states[rows, k][:, :, st - 1 : en - 1]
        frame_sigma[:, st:en] = sigmas[k][:, None]
    target = torch.cat([data[:, :, :1], x0], dim=2)
    if real is not None:
        pick = real.view(-1, 1, 1, 1, 1)
        x = torch.where(pick, add_noise(data, noise, frame_sigma[:, None, :, None, None]), x)
        target = torch.where(pick, data, target)
    return x, frame_sigma, target


def ode_init(run: Run, student, fingerprint: str):
    cfg, dist, device = run.cfg, run.dist, run.device
    o = cfg.ode_init
    layout = build_layout(cfg)
    index, states, x0, sigmas = load_pairs(cfg, run.root, "train")
    windows = windows_for(cfg, run.root, index, "train")
    ckpt = run.checkpoints(f"{STAGE}/ode_init", fingerprint)
    state = ckpt.latest()
    start = state["step"] if state is not None else 0
    student, opt = prepare_training(
        student.train(), lambda m: torch.optim.AdamW(memory_param_groups(m, o.lr, cfg.train.memory_lr_scale), lr=o.lr,
                                                     weight_decay=cfg.train.weight_decay),
        dist, cfg.train.parallel, state and state["model"], state and state["optimizer"], run.compute)  # fmt: skip
    ema = make_ema(student, cfg.train.ema_decay, state)
    n_frames = 1 + x0.shape[2]
    chunks = layout.chunks(n_frames)[1:]
    sig = torch.tensor(sigmas)
    gb = o.batch_size
    rank_batch(gb, dist, "ode_init.batch_size")

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, "ode_init", s)
        idx = dist.slice(global_batch(g, len(index), gb))
        level = dist.slice(torch.randint(len(sigmas), (gb, len(chunks)), generator=g))  # one kept level per chunk
        b = idx.shape[0]
        real = noise = None
        if o.gt_share:  # (drawn only then: without it the steps are the same as before the option existed)
            real = dist.slice(torch.rand(gb, generator=g) < o.gt_share)
            noise = dist.slice(torch.randn((gb, *windows.latents.shape[1:]), generator=g))
        x, frame_sigma, target = ode_init_batch(windows.latents[idx], states[idx], x0[idx], sig, chunks, level,
                                                real, noise)  # fmt: skip

        def micro(sl: slice) -> tuple[torch.Tensor, dict]:
            i = idx[sl]
            return ode_init_loss(student, x[sl].to(device), frame_sigma[sl].to(device), run.window_texts(windows, i),
                                 windows.talk[i].to(device), windows.listen[i].to(device), layout,
                                 target[sl].to(device)), {}  # fmt: skip

        opt.zero_grad(set_to_none=True)
        logs = accumulate(student, b, cfg.train.micro_batch_size, micro)
        gnorm = apply_gradients(opt, student, dist, cfg.train.grad_clip)
        if ema is not None:
            ema.update(student)
        return {"loss": dist.mean(logs["loss"]), "grad_norm": float(gnorm)}

    def save(s: int) -> None:
        save_step(ckpt, s, dist, cfg.train.parallel, {"model": (student, opt)}, cfg.train.sharded_checkpoints, ema=ema)

    metrics = Metrics(ckpt.dir / "metrics.jsonl", "ode_init", cfg.train.log_every, dist.main, fresh=start == 0)
    last = run_loop("ode_init", start, o.iterations, step, save, metrics, cfg.train.checkpoint_every, run.progress,
                    amp=run.autocast)  # fmt: skip
    if ema is not None:  # the average is the ODE-init student
        ema.copy_to(student)
    return student, last


@torch.no_grad()
def ode_regression(run: Run, student) -> float:
    """The ODE-init objective on validation pairs: block-causal x0 predictions from the teacher's kept states
    (every chunk at the same level, averaged over the levels) against the teacher's ODE output."""
    cfg = run.cfg
    index, states, x0, sigmas = load_pairs(cfg, run.root, "val")
    windows = windows_for(cfg, run.root, index, "val")
    layout = build_layout(cfg)
    b, dev = len(index), run.device
    was = student.training
    student.eval()
    errs = []
    for k, sigma in enumerate(sigmas):
        x = torch.cat([windows.latents[:, :, :1], states[:, k]], dim=2).to(dev)
        t = torch.full((b, x.shape[2]), sigma * NUM_TRAIN_TIMESTEPS, device=dev)
        t[:, 0] = 0
        v = student(x.to(run.dtype), t, run.window_texts(windows), windows.talk.to(dev, run.dtype),
                    windows.listen.to(dev, run.dtype), attention="block_causal", layout=layout).float()  # fmt: skip
        errs.append(float(((predict_x0(x, v, sigma)[:, :, 1:].cpu() - x0) ** 2).mean()))
    student.train(was)
    return sum(errs) / len(errs)


@torch.no_grad()
def ode_match(run: Run, student) -> dict[str, float]:
    """The student's few-step streaming samples against the teacher's ODE outputs on validation pairs, from
    the same initial noise (the pair's state at sigma 1): ``mse`` (same noise, same sample) and ``fd`` (latent
    Frechet distance, the distributions), and the number of ``pairs``."""
    cfg = run.cfg
    index, states, x0, _ = load_pairs(cfg, run.root, "val")
    windows = windows_for(cfg, run.root, index, "val")
    dev = run.device
    out = student_samples(student, run.window_texts(windows), windows.latents[:, :, :1].to(dev),
                          windows.talk.to(dev), windows.listen.to(dev), build_layout(cfg),
                          student_sigmas(cfg.student.steps, cfg.student.timestep_shift), states[:, 0].to(dev),
                          cfg.project.seed, cfg.student.context)[:, :, 1:].cpu()  # fmt: skip
    return {"mse": float(((out - x0) ** 2).mean()), "fd": latent_fd(out, x0), "pairs": float(len(index))}


# ------------------------------------------------------------------------------------------------------ SiD
@dataclass
class SidDraw:
    """One SiD step's inputs and random draws (this rank's slice)."""

    text: torch.Tensor  # [B, text_len, text_dim]
    reference: torch.Tensor  # [B, z, 1, h, w]
    talk: torch.Tensor  # [B, 1 + F, A, D]
    listen: torch.Tensor
    noise: torch.Tensor  # [B, z, F, h, w] each chunk's starting noise
    renoise: torch.Tensor  # [max(N - 1, 1), B, z, F, h, w]
    exits: list[int]  # one exit step per chunk
    sigma_g: torch.Tensor  # [B] where the generator's sample is scored
    eps_g: torch.Tensor  # [B, z, 1 + F, h, w]
    sigma_f: torch.Tensor  # [B] where the fake score learns
    eps_f: torch.Tensor

    def take(self, sl: slice) -> SidDraw:
        """The draw of the samples ``sl`` (a micro batch)."""
        return SidDraw(self.text[sl], self.reference[sl], self.talk[sl], self.listen[sl], self.noise[sl],
                       self.renoise[:, sl], self.exits, self.sigma_g[sl], self.eps_g[sl], self.sigma_f[sl],
                       self.eps_f[sl])  # fmt: skip


def sid_update(student, teacher, fake, opt_g, opt_f, draw: SidDraw, layout, sigmas: list[float], d: DistillConfig,
               dist: Dist | None = None, grad_clip: float = 0.0, micro: int = 0) -> dict[str, float]:  # fmt: skip
    """One SiD iteration, 1:1: a generator step, then a fake-score step.

    1. the student rolls out the clip (student forcing), the sample is noised at ``sigma_g``, the frozen teacher
       (real score, with audio classifier-free guidance ``d.real_guidance`` against the audio-dropped
       condition the teacher was trained with, as DMD / SiD-LSG guide the real score) and the fake score
       predict x0, and the student takes the SiD loss. Guidance > 1 also gives the first steps a signal: with
       the fake score a copy of the teacher and no guidance, f_real == f_fake and the loss is exactly zero.
    2. the fake score takes its denoising loss on the detached sample, noised at ``sigma_f``.

    ``micro``: samples per micro batch (0: all at once); both steps accumulate gradients over the micro batches.
    """
    dist = dist or Dist()
    b, n_frames = draw.reference.shape[0], 1 + draw.noise.shape[2]
    samples: dict[int, torch.Tensor] = {}

    # 1. generator
    def generator(sl: slice) -> tuple[torch.Tensor, dict]:
        dr = draw.take(sl)
        x = student_rollout(student, dr.reference, student.prepare_text(dr.text.to(student.dtype)), dr.talk,
                            dr.listen, layout, sigmas, dr.noise, dr.renoise, dr.exits, d.context)  # fmt: skip
        x_t = noised(x, dr.eps_g, dr.sigma_g)
        f_real = teacher_x0(teacher, teacher.prepare_text(dr.text.to(teacher.dtype)), x_t, dr.sigma_g, dr.talk,
                            dr.listen, d.real_guidance)  # fmt: skip
        f_fake = teacher_x0(fake, fake.prepare_text(dr.text.to(fake.dtype)), x_t, dr.sigma_g, dr.talk, dr.listen, 1.0)
        samples[sl.start] = x.detach()
        with torch.no_grad():
            gap = float(((f_real - f_fake)[:, :, 1:] ** 2).mean())
        mask = frame_mask(x.shape[0], n_frames, x.device)
        return sid_generator_loss(x, f_real, f_fake, d.sid_alpha, mask=mask), {"gap": gap}

    trainable(fake, False)
    opt_g.zero_grad(set_to_none=True)
    g_logs = accumulate(student, b, micro, generator)
    gnorm = apply_gradients(opt_g, student, dist, grad_clip)

    # 2. fake score: denoising (flow-matching) loss on the detached sample
    def fake_step(sl: slice) -> tuple[torch.Tensor, dict]:
        dr, xd, dt = draw.take(sl), samples[sl.start], fake.dtype
        v = fake(noised(xd, dr.eps_f, dr.sigma_f).to(dt), per_frame_t(dr.sigma_f, n_frames), dr.text.to(dt),
                 dr.talk.to(dt), dr.listen.to(dt)).float()  # fmt: skip
        return fake_score_loss(v, dr.eps_f, xd, frame_mask(xd.shape[0], n_frames, xd.device)), {}

    trainable(fake, True)
    opt_f.zero_grad(set_to_none=True)
    f_logs = accumulate(fake, b, micro, fake_step)
    fnorm = apply_gradients(opt_f, fake, dist, grad_clip)
    return {"sid_loss": dist.mean(g_logs["loss"]), "fake_loss": dist.mean(f_logs["loss"]),
            "grad_norm": float(gnorm), "fake_grad_norm": float(fnorm), "score_gap": dist.mean(g_logs["gap"]),
            "exit_mean": sum(draw.exits) / len(draw.exits)}  # fmt: skip


def sid(run: Run, student, teacher, fingerprint: str):
    cfg, dist, device = run.cfg, run.dist, run.device
    d = cfg.distill
    layout = build_layout(cfg)
    sigmas = student_sigmas(cfg.student.steps, cfg.student.timestep_shift)
    from tasks.training.data import load_windows

    data = load_windows(cfg, run.root, "train")
    fake = trainable(clone(teacher).train())
    ckpt = run.checkpoints(STAGE + "/sid", fingerprint)
    state = ckpt.latest()
    start = state["step"] if state is not None else 0
    wd = cfg.train.weight_decay
    student, opt_g = prepare_training(
        student.train(), lambda m: torch.optim.AdamW(memory_param_groups(m, d.lr, cfg.train.memory_lr_scale), lr=d.lr,
                                                     betas=(0.0, 0.999), weight_decay=wd),
        dist, cfg.train.parallel, state and state["model"], state and state["optimizer"], run.compute)  # fmt: skip
    fake, opt_f = prepare_training(
        fake, lambda m: torch.optim.AdamW(m.parameters(), lr=d.fake_lr, betas=(0.0, 0.999), weight_decay=wd),
        dist, cfg.train.parallel, state and state["fake"], state and state["fake_optimizer"], run.compute)  # fmt: skip
    ema = make_ema(student, cfg.train.ema_decay, state)  # the generator's average; the fake score trains on its own
    n_frames = data.latents.shape[2]
    chunks = layout.chunks(n_frames)[1:]
    gb = d.batch_size
    per = rank_batch(gb, dist, "distill.batch_size")
    lat_shape = data.latents.shape[1:]
    lo, hi = d.sigma_range
    draw_weights = action_weights(data.index["action"], cfg.train.action_share)

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, "sid", s)
        idx = global_batch(g, len(data), gb, draw_weights)
        gen_shape = (gb, lat_shape[0], n_frames - 1, *lat_shape[2:])
        noise = torch.randn(gen_shape, generator=g)
        renoise = torch.randn((max(len(sigmas) - 1, 1), *gen_shape), generator=g)
        exits = torch.randint(len(sigmas), (len(chunks),), generator=g).tolist()  # the same on every rank
        sigma_g = lo + (hi - lo) * torch.rand(gb, generator=g)
        eps_g = torch.randn((gb, *lat_shape), generator=g)
        sigma_f = lo + (hi - lo) * torch.rand(gb, generator=g)
        eps_f = torch.randn((gb, *lat_shape), generator=g)
        idx, noise, sigma_g, eps_g, sigma_f, eps_f = (dist.slice(v) for v in (idx, noise, sigma_g, eps_g, sigma_f, eps_f))
        renoise = renoise[:, dist.rank * per : (dist.rank + 1) * per] if dist.world > 1 else renoise
        draw = SidDraw(run.window_texts(data, idx), data.latents[idx, :, :1].to(device), data.talk[idx].to(device),
                       data.listen[idx].to(device), noise.to(device), renoise.to(device), exits, sigma_g.to(device),
                       eps_g.to(device), sigma_f.to(device), eps_f.to(device))  # fmt: skip
        logs = sid_update(student, teacher, fake, opt_g, opt_f, draw, layout, sigmas, d, dist, cfg.train.grad_clip,
                          cfg.train.micro_batch_size)  # fmt: skip
        if ema is not None:
            ema.update(student)
        return logs

    def save(s: int) -> None:
        save_step(ckpt, s, dist, cfg.train.parallel, {"model": (student, opt_g), "fake": (fake, opt_f)},
                  cfg.train.sharded_checkpoints, ema=ema)  # fmt: skip

    metrics = Metrics(ckpt.dir / "metrics.jsonl", "sid", cfg.train.log_every, dist.main, fresh=start == 0)
    last = run_loop("sid", start, d.iterations, step, save, metrics, cfg.train.checkpoint_every, run.progress,
                    amp=run.autocast)  # fmt: skip
    if ema is not None:  # the generator's average is the distilled student
        ema.copy_to(student)
    hist = {}
    rows = [r for r in metrics.history if r["step"] < d.iterations]
    if rows:  # none when distill.iterations is 0 (ODE init alone)
        vals = [r["sid_loss"] for r in rows]
        norms = [r["grad_norm"] for r in rows]
        hist = {"sid_loss_min": min(vals), "sid_loss_max": max(vals), "sid_grad_norm_first": norms[0],
                "sid_grad_norm_mean": sum(norms) / len(norms), "sid_grad_norm_last": norms[-1]}  # fmt: skip
        if "score_gap" in rows[0]:
            hist["sid_score_gap_first"], hist["sid_score_gap_last"] = rows[0]["score_gap"], rows[-1]["score_gap"]
    return student, last, hist
