"""Stage `distill` (paper 3.1.1): ODE initialisation, then SiD distillation with student forcing.

1. ODE init (``ode_init.*``). The student starts as a copy of the teacher, run block-causally (chunks of C
   latent frames, the Reference Sink, the rolling window and RAPR of ``student.*``, in training exactly as in
   streaming). Each step takes ODE pairs, picks for every chunk one of the kept noise levels, feeds the chunk
   the teacher's state at that level, and regresses the student's x0 prediction onto the teacher's final x0.
   Reported: how far the student's own few-step samples (through the streaming path, from the pair's initial
   noise) are from the teacher's ODE outputs on validation pairs, before and after.
2. SiD (``distill.*``). Per step, 1:1: the student rolls out a clip through its streaming path (student
   forcing; one random exit step per chunk carries the gradient, model/rollout.py), the sample is noised at a
   random level, the frozen teacher (real score, CFG ``distill.real_guidance``) and the fake-score network
   (initialised from the teacher) predict x0, and the generator takes the SiD loss (model/losses.py,
   ``distill.sid_alpha``); then the fake-score network takes its denoising loss on the detached sample.

Outputs: data/checkpoints/distill/{ode_init,sid}/ (resume points), data/checkpoints/distill/final.pt (the
student), data/reports/distill/{metrics.json, sample.mp4}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.losses import fake_score_loss, sid_generator_loss, x0_regression_loss
from model.rollout import student_rollout
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise, predict_x0, student_sigmas
from tasks.common.models import build_layout
from tasks.common.stage import StageResult
from tasks.config import Config
from tasks.training.common import (
    Run,
    clone,
    dit_from_state,
    frame_mask,
    frozen,
    model_sections,
    per_frame_t,
    run_fingerprint,
    sample_vae,
    start_run,
    student_sample,
    teacher_x0,
    trainable,
)
from tasks.training.data import windows_digest
from tasks.training.engine import (
    Metrics,
    file_digest,
    global_batch,
    load_final,
    optimizer_step,
    run_loop,
    shard_model,
    state_dict_of,
    step_generator,
)
from tasks.training.ode_pairs import load_pairs, windows_for

STAGE = "distill"


def run_distill(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    run = start_run(cfg, root, progress)
    dist = run.dist
    teacher_path = run.checkpoint_root / "teacher" / "final.pt"
    teacher_state = load_final(teacher_path, "teacher")["model"]
    pairs_index = root / cfg.ode_pairs.out_dir / "index.parquet"
    upstream = {"teacher": file_digest(teacher_path), "data": windows_digest(cfg, root),
                "pairs": file_digest(pairs_index) if pairs_index.is_file() else None}  # fmt: skip

    # 1. ODE initialisation
    student = dit_from_state(cfg, run.audio, teacher_state, run.device)
    before, reg_before = ode_match(run, student), ode_regression(run, student)
    fp_init = run_fingerprint(cfg, model_sections() + ["ode_init"], upstream)
    student, init_last = ode_init(run, student, fp_init)
    after, reg_after = ode_match(run, student), ode_regression(run, student)

    # 2. SiD with student forcing
    teacher = frozen(dit_from_state(cfg, run.audio, teacher_state, run.device))
    fp_sid = run_fingerprint(cfg, model_sections() + ["ode_init", STAGE], upstream)
    student, sid_last, sid_hist = sid(run, student, teacher, fp_sid)

    result = StageResult(STAGE)
    sd = state_dict_of(student)
    if dist.main:
        ckpt = run.checkpoints(STAGE, fp_sid)
        final = ckpt.save_final({"model": sd, "spec": student.spec.to_json(), "step": cfg.distill.iterations})
        report = root / "data" / "reports" / STAGE
        report.mkdir(parents=True, exist_ok=True)
        m = {"ode_match_mse_before": before, "ode_match_mse_after": after,
             "ode_x0_mse_before": reg_before, "ode_x0_mse_after": reg_after,
             **{f"ode_init_last_{k}": v for k, v in init_last.items()},
             **{f"sid_last_{k}": v for k, v in sid_last.items()}, **sid_hist}  # fmt: skip
        (report / "metrics.json").write_text(json.dumps(m, indent=2))
        artifacts = [report / "metrics.json"]
        if cfg.train.sample_video:
            from tasks.training.data import load_windows

            val = load_windows(cfg, root, "val", limit=cfg.train.val_windows)
            artifacts.append(student_sample(run, student, sample_vae(cfg), val, report / "sample.mp4"))
        result = StageResult(
            STAGE, metrics=m, artifacts=artifacts, outputs=[final],
            summary=(f"distill: ODE init {cfg.ode_init.iterations} steps; on validation pairs the student's x0 from "
                     f"the teacher's states vs the teacher's ODE output (MSE) {reg_before:.4f} -> {reg_after:.4f}, "
                     f"its own {cfg.student.steps}-step streaming samples vs the ODE output {before:.4f} -> {after:.4f}; "
                     f"SiD {cfg.distill.iterations} steps, generator loss {sid_last.get('sid_loss', float('nan')):.4g}, "
                     f"fake-score loss {sid_last.get('fake_loss', float('nan')):.4g}"),
        )  # fmt: skip
    dist.barrier()
    return result


# ------------------------------------------------------------------------------------------------ ODE init
def ode_init(run: Run, student, fingerprint: str):
    cfg, dist, device = run.cfg, run.dist, run.device
    o = cfg.ode_init
    layout = build_layout(cfg)
    index, states, x0, sigmas = load_pairs(cfg, run.root, "train")
    windows = windows_for(cfg, run.root, index, "train")
    ckpt = run.checkpoints(f"{STAGE}/ode_init", fingerprint)
    opt = torch.optim.AdamW(student.parameters(), lr=o.lr, weight_decay=cfg.train.weight_decay)
    start = 0
    state = ckpt.latest()
    if state is not None:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    student = shard_model(student.train(), dist, cfg.train.parallel)
    n_frames = 1 + x0.shape[2]
    chunks = layout.chunks(n_frames)[1:]
    sig = torch.tensor(sigmas)
    gb = o.batch_size * dist.world

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, "ode_init", s)
        idx = dist.slice(global_batch(g, len(index), gb))
        level = dist.slice(torch.randint(len(sigmas), (gb, len(chunks)), generator=g))  # one kept level per chunk
        b = idx.shape[0]
        x = torch.empty((b, *windows.latents.shape[1:]))
        x[:, :, 0] = windows.latents[idx, :, 0]
        frame_sigma = torch.zeros(b, n_frames)
        for c, (st, en) in enumerate(chunks):
            k = level[:, c]
            x[:, :, st:en] = states[idx, k][:, :, st - 1 : en - 1]
            frame_sigma[:, st:en] = sig[k][:, None]
        x, frame_sigma = x.to(device), frame_sigma.to(device)
        v = student(x.to(run.dtype), frame_sigma * NUM_TRAIN_TIMESTEPS, run.text_batch(b),
                    windows.talk[idx].to(device, run.dtype), windows.listen[idx].to(device, run.dtype),
                    attention="block_causal", layout=layout).float()  # fmt: skip
        pred = predict_x0(x, v, frame_sigma[:, None, :, None, None])
        target = torch.cat([windows.latents[idx, :, :1], x0[idx]], dim=2).to(device)
        loss = x0_regression_loss(pred, target, frame_mask(b, n_frames, device))
        gnorm = optimizer_step(loss, opt, student, dist, cfg.train.grad_clip)
        return {"loss": dist.mean(float(loss.detach())), "grad_norm": float(gnorm)}

    def save(s: int) -> None:
        sd = state_dict_of(student)
        if dist.main:
            ckpt.save(s, {"model": sd, "optimizer": opt.state_dict()})

    metrics = Metrics(ckpt.dir / "metrics.jsonl", "ode_init", cfg.train.log_every, dist.main, fresh=start == 0)
    last = run_loop("ode_init", start, o.iterations, step, save, metrics, cfg.train.checkpoint_every, run.progress)
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
        v = student(x.to(run.dtype), t, run.text_batch(b), windows.talk.to(dev, run.dtype),
                    windows.listen.to(dev, run.dtype), attention="block_causal", layout=layout).float()  # fmt: skip
        errs.append(float(((predict_x0(x, v, sigma)[:, :, 1:].cpu() - x0) ** 2).mean()))
    student.train(was)
    return sum(errs) / len(errs)


@torch.no_grad()
def ode_match(run: Run, student) -> float:
    """MSE between the student's few-step streaming samples and the teacher's ODE outputs, validation pairs,
    from the same initial noise (the pair's state at sigma 1)."""
    cfg = run.cfg
    index, states, x0, _ = load_pairs(cfg, run.root, "val")
    windows = windows_for(cfg, run.root, index, "val")
    layout = build_layout(cfg)
    sigmas = student_sigmas(cfg.student.steps, cfg.student.timestep_shift)
    b = len(index)
    g = torch.Generator().manual_seed(cfg.project.seed)
    renoise = torch.randn((max(len(sigmas) - 1, 1), *x0.shape), generator=g)
    chunks = layout.chunks(1 + x0.shape[2])[1:]
    was = student.training
    student.eval()
    dev = run.device
    out = student_rollout(student, windows.latents[:, :, :1].to(dev), run.context(student, b),
                          windows.talk.to(dev), windows.listen.to(dev), layout, sigmas, states[:, 0].to(dev),
                          renoise.to(dev), [len(sigmas) - 1] * len(chunks), cfg.student.context, grad=False)  # fmt: skip
    student.train(was)
    return float(((out[:, :, 1:].cpu() - x0) ** 2).mean())


# ------------------------------------------------------------------------------------------------------ SiD
def sid(run: Run, student, teacher, fingerprint: str):
    cfg, dist, device = run.cfg, run.dist, run.device
    d = cfg.distill
    layout = build_layout(cfg)
    sigmas = student_sigmas(cfg.student.steps, cfg.student.timestep_shift)
    from tasks.training.data import load_windows

    data = load_windows(cfg, run.root, "train")
    fake = trainable(clone(teacher).train())
    ckpt = run.checkpoints(STAGE + "/sid", fingerprint)
    opt_g = torch.optim.AdamW(student.parameters(), lr=d.lr, betas=(0.0, 0.999), weight_decay=cfg.train.weight_decay)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=d.fake_lr, betas=(0.0, 0.999), weight_decay=cfg.train.weight_decay)
    start = 0
    state = ckpt.latest()
    if state is not None:
        student.load_state_dict(state["model"])
        fake.load_state_dict(state["fake"])
        opt_g.load_state_dict(state["optimizer"])
        opt_f.load_state_dict(state["fake_optimizer"])
        start = state["step"]
    student = shard_model(student.train(), dist, cfg.train.parallel)
    fake = shard_model(fake, dist, cfg.train.parallel)
    n_frames = data.latents.shape[2]
    chunks = layout.chunks(n_frames)[1:]
    gb = d.batch_size * dist.world
    lat_shape = data.latents.shape[1:]
    lo, hi = d.sigma_range
    teacher_ctx = run.context(teacher, d.batch_size)
    mask_all = frame_mask(d.batch_size, n_frames, device)

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, "sid", s)
        idx = global_batch(g, len(data), gb)
        gen_shape = (gb, lat_shape[0], n_frames - 1, *lat_shape[2:])
        noise = torch.randn(gen_shape, generator=g)
        renoise = torch.randn((max(len(sigmas) - 1, 1), *gen_shape), generator=g)
        exits = torch.randint(len(sigmas), (len(chunks),), generator=g).tolist()  # the same on every rank
        sigma_g = lo + (hi - lo) * torch.rand(gb, generator=g)
        eps_g = torch.randn((gb, *lat_shape), generator=g)
        sigma_f = lo + (hi - lo) * torch.rand(gb, generator=g)
        eps_f = torch.randn((gb, *lat_shape), generator=g)
        idx, noise, sigma_g, eps_g, sigma_f, eps_f = (dist.slice(v) for v in (idx, noise, sigma_g, eps_g, sigma_f, eps_f))
        renoise = renoise[:, dist.rank * d.batch_size : (dist.rank + 1) * d.batch_size] if dist.world > 1 else renoise
        b = idx.shape[0]
        ref = data.latents[idx, :, :1].to(device)
        talk, listen = data.talk[idx].to(device), data.listen[idx].to(device)

        # generator: student forcing rollout -> SiD loss against the teacher and the fake score
        trainable(fake, False)
        x = student_rollout(student, ref, run.context(student, b), talk, listen, layout, sigmas, noise.to(device),
                            renoise.to(device), exits, d.context)  # fmt: skip
        sg = sigma_g.to(device)
        x_t = torch.cat([x[:, :, :1], add_noise(x[:, :, 1:], eps_g[:, :, 1:].to(device), sg.view(-1, 1, 1, 1, 1))], 2)
        f_real = teacher_x0(teacher, teacher_ctx, x_t, sg, talk, listen, d.real_guidance)
        f_fake = teacher_x0(fake, run.context(fake, b), x_t, sg, talk, listen, 1.0)
        loss_g = sid_generator_loss(x, f_real, f_fake, d.sid_alpha, mask=mask_all[:b])
        gnorm = optimizer_step(loss_g, opt_g, student, dist, cfg.train.grad_clip)

        # fake score: denoising (flow-matching) loss on the detached sample
        trainable(fake, True)
        xd = x.detach()
        sf = sigma_f.to(device)
        ef = eps_f.to(device)
        xf_t = torch.cat([xd[:, :, :1], add_noise(xd[:, :, 1:], ef[:, :, 1:], sf.view(-1, 1, 1, 1, 1))], 2)
        v = fake(xf_t.to(run.dtype), per_frame_t(sf, n_frames), run.text_batch(b), talk.to(run.dtype),
                 listen.to(run.dtype)).float()  # fmt: skip
        loss_f = fake_score_loss(v, ef, xd, mask_all[:b])
        optimizer_step(loss_f, opt_f, fake, dist, cfg.train.grad_clip)
        return {"sid_loss": dist.mean(float(loss_g.detach())), "fake_loss": dist.mean(float(loss_f.detach())),
                "grad_norm": float(gnorm), "exit_mean": sum(exits) / len(exits)}  # fmt: skip

    def save(s: int) -> None:
        sd, fsd = state_dict_of(student), state_dict_of(fake)
        if dist.main:
            ckpt.save(s, {"model": sd, "fake": fsd, "optimizer": opt_g.state_dict(),
                          "fake_optimizer": opt_f.state_dict()})  # fmt: skip

    metrics = Metrics(ckpt.dir / "metrics.jsonl", "sid", cfg.train.log_every, dist.main, fresh=start == 0)
    last = run_loop("sid", start, d.iterations, step, save, metrics, cfg.train.checkpoint_every, run.progress)
    hist = {}
    if metrics.history:
        vals = [r["sid_loss"] for r in metrics.history]
        hist = {"sid_loss_min": min(vals), "sid_loss_max": max(vals)}
    return student, last, hist
