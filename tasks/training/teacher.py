"""Stage `teacher`: fine-tune the bidirectional audio-driven DiT (paper 3.2) with the flow-matching loss.

A training sample is one window: the clean reference as latent frame 0 (timestep 0), the F later latent frames
noised to one sigma (x_t = (1 - s) x0 + s eps, s = shift(u), u ~ U(0, 1)); the network predicts the velocity
eps - x0 on those frames, conditioned on the talking and listening audio tokens (the curated mask applied to
the features) and the fixed prompt. With probability ``teacher.audio_dropout`` both audio streams are zeroed
together, which trains the unconditional branch used by classifier-free guidance.

Outputs: data/latents/ (the encoded windows every later stage reads), data/checkpoints/teacher/{step_*,final}.pt,
data/reports/teacher/{metrics.json, sample.mp4}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.losses import flow_matching_loss, region_weight
from model.sampling import add_noise, shift_sigma
from tasks.common.models import build_dit, build_vae, load_dit_weights
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, data_path, resolve_path
from tasks.training.common import (
    action_prompt_gain,
    action_prompt_response,
    frame_mask,
    heldout_fm_losses,
    model_sections,
    mouth_audio_gain,
    per_frame_t,
    run_fingerprint,
    start_run,
    teacher_sample,
    whole,
)  # fmt: skip
from tasks.training.data import build_windows, load_windows, window_splits, windows_digest
from tasks.training.engine import (
    Metrics,
    accumulate,
    action_weights,
    apply_gradients,
    file_digest,
    global_batch,
    history_csv,
    make_ema,
    prepare_training,
    rank_batch,
    run_loop,
    save_step,
    state_dict_of,
    step_generator,
)

STAGE = "teacher"


def run_teacher(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    run = start_run(cfg, root, progress)
    dist, device, t = run.dist, run.device, cfg.teacher
    report = data_path(cfg, root, "reports", STAGE)
    vae = build_vae(cfg, root=root).eval()
    failures: dict[str, str] = {}
    if dist.main:
        _, failures = build_windows(cfg, root, vae, run.audio, progress=run.progress)
    dist.barrier()
    data = load_windows(cfg, root, "train")
    val = load_windows(cfg, root, "val", limit=cfg.train.val_windows)

    model = build_dit(cfg, run.audio.token_dim, dtype=run.dtype)  # Wan weights from model.pretrained_path, or the demo's random init
    init = None
    if t.init_from and not cfg.model.pretrained_path:
        init = load_base_dit(cfg, root, model)
    ckpt = run.checkpoints(STAGE, run_fingerprint(cfg, model_sections() + [STAGE], {
        "data": windows_digest(cfg, root), "init": init})  # fmt: skip
    )
    # held-out yardsticks before a step is taken: the starting network and the per-channel Gaussian denoiser
    val_dev = val.latents.to(device)
    mean = data.latents.mean(dim=(0, 2, 3, 4), keepdim=True)[:1]
    var = data.latents.var(dim=(0, 2, 3, 4), keepdim=True)[:1]
    text_val = run.window_texts(val)  # each window's prompt: its action's (idle: the base prompt)
    before = heldout_fm_losses(model, val_dev, text_val, val.talk.to(device), val.listen.to(device), mean, var)
    gaussian = heldout_fm_losses(None, val_dev, text_val, val.talk, val.listen, mean, var)
    state = ckpt.latest()
    start = state["step"] if state is not None else 0
    model, opt = prepare_training(
        model.train(), lambda m: torch.optim.AdamW(param_groups(m, t.lr, t.audio_lr_scale, t.prompt_lr_scale), lr=t.lr,
                                                   weight_decay=cfg.train.weight_decay),
        dist, cfg.train.parallel, state and state["model"], state and state["optimizer"], run.compute)  # fmt: skip
    ema = make_ema(model, cfg.train.ema_decay, state)
    gb = t.batch_size
    rank_batch(gb, dist, "teacher.batch_size")
    spatial = None
    if t.mouth_weight != 1.0:
        spatial = region_weight(*data.latents.shape[-2:], t.mouth_box, t.mouth_weight).to(device)

    draw_weights = teacher_draw_weights(cfg, data.index["action"])

    def step(s: int) -> dict[str, float]:
        g = step_generator(cfg.project.seed, STAGE, s)
        idx = global_batch(g, len(data), gb, draw_weights)
        sigma = shift_sigma(torch.rand(gb, generator=g), t.timestep_shift)
        noise = torch.randn((gb, *data.latents.shape[1:]), generator=g)
        keep_audio = (torch.rand(gb, generator=g) >= t.audio_dropout).float()
        idx, sigma, noise, keep_audio = (dist.slice(v) for v in (idx, sigma, noise, keep_audio))

        def micro(sl: slice) -> tuple[torch.Tensor, dict]:
            x0 = data.latents[idx[sl]].to(device)
            keep = keep_audio[sl].view(-1, 1, 1, 1).to(device)
            talk, listen = data.talk[idx[sl]].to(device) * keep, data.listen[idx[sl]].to(device) * keep
            return teacher_loss(model, x0, sigma[sl].to(device), noise[sl].to(device), run.window_texts(data, idx[sl]),
                                talk, listen, spatial), {}  # fmt: skip

        opt.zero_grad(set_to_none=True)
        logs = accumulate(model, len(idx), cfg.train.micro_batch_size, micro)
        gnorm = apply_gradients(opt, model, dist, cfg.train.grad_clip)
        if ema is not None:
            ema.update(model)
        return {"loss": dist.mean(logs["loss"]), "grad_norm": float(gnorm)}

    def save(s: int) -> None:
        save_step(ckpt, s, dist, cfg.train.parallel, {"model": (model, opt)}, cfg.train.sharded_checkpoints, ema=ema)

    metrics = Metrics(ckpt.dir / "metrics.jsonl", STAGE, cfg.train.log_every, dist.main, fresh=start == 0)
    last = run_loop(STAGE, start, t.iterations, step, save, metrics, cfg.train.checkpoint_every, run.progress,
                    amp=run.autocast)  # fmt: skip
    result = StageResult(STAGE)
    last_iterate = None
    if ema is not None:  # the average is the result; the last iterate's held-out loss is reported beside it
        last_sd = state_dict_of(model)  # under FSDP2 a collective: every rank
        if dist.main:
            last_iterate = heldout_fm_losses(whole(run, model, last_sd), val_dev, text_val, val.talk.to(device),
                                             val.listen.to(device), mean, var)["fm_loss"]  # fmt: skip
        ema.copy_to(model)
    final_sd = state_dict_of(model)
    if dist.main:
        model = whole(run, model, final_sd)
        final = ckpt.save_final({"model": final_sd, "spec": model.spec.to_json(), "step": t.iterations})
        history = _history(ckpt.dir / "metrics.jsonl", t.iterations)
        m = {"windows_train": float(len(data)), "windows_val": float(len(val)), "steps": float(t.iterations), **history}
        m.update({f"last_{k}": v for k, v in last.items()})
        after = heldout_fm_losses(model, val_dev, text_val, val.talk.to(device), val.listen.to(device), mean, var)
        silent = torch.zeros_like(val.talk).to(device)
        no_audio = heldout_fm_losses(model, val_dev, text_val, silent, silent, mean, var)
        m.update({"val_fm_loss": after["fm_loss"], "val_fm_loss_before": before["fm_loss"],
                  "val_fm_loss_gaussian": gaussian["fm_loss"], "val_fm_loss_no_audio": no_audio["fm_loss"],
                  "init_from_base_dit": float(init is not None)})  # fmt: skip
        if last_iterate is not None:
            m["val_fm_loss_last_iterate"] = last_iterate
        m.update({f"val_{k}": v for k, v in after.items() if k != "fm_loss"})
        every_val = load_windows(cfg, root, "val")
        m.update({f"val_{k}": v for k, v in mouth_audio_gain(model, every_val, run.window_texts(every_val),
                                                              t.mouth_box).items()})  # fmt: skip
        m.update({f"val_{k}": v for k, v in action_prompt_gain(run, model, every_val).items()})
        unseen = load_windows(cfg, root, "unseen") if "unseen" in window_splits(cfg, root) else None
        if unseen is not None and len(unseen):  # the held-out identity's action windows: more of them than val has
            m.update({f"unseen_{k}": v for k, v in action_prompt_gain(run, model, unseen).items()})
        sheet = report / "action_prompts.png"  # written only when the windows carry action labels
        sheet.unlink(missing_ok=True)
        m.update({f"val_{k}": v for k, v in action_prompt_response(run, model, vae, every_val, sheet=sheet).items()})
        report.mkdir(parents=True, exist_ok=True)
        (report / "metrics.json").write_text(json.dumps(m, indent=2))
        artifacts = [report / "metrics.json", history_csv(ckpt.dir / "metrics.jsonl", report / "loss.csv")]
        artifacts += [sheet] if sheet.is_file() else []
        if cfg.train.sample_video:
            artifacts.append(teacher_sample(run, model, vae, val, report / "sample.mp4"))
        result = StageResult(
            STAGE, metrics=m, artifacts=artifacts, outputs=[final], failures=failures,
            summary=(f"teacher: {t.iterations} steps on {len(data)} windows; held-out flow-matching loss "
                     f"{m['val_fm_loss_before']:.4f} -> {m['val_fm_loss']:.4f} (per-channel Gaussian denoiser "
                     f"{m['val_fm_loss_gaussian']:.4f}; with the audio silenced {m['val_fm_loss_no_audio']:.4f}); "
                     f"mouth-box loss with shuffled audio {100 * m.get('val_mouth_audio_gain', float('nan')):+.1f} %"
                     + _action_summary(m)),
        )  # fmt: skip
    dist.barrier()
    return result


def teacher_draw_weights(cfg: Config, labels) -> torch.Tensor | None:
    """The teacher's draw weights over its windows: ``teacher.action_share`` of the draws from the
    action-labelled ones (``train.action_share`` when null, as the later stages draw)."""
    t = cfg.teacher
    return action_weights(labels, cfg.train.action_share if t.action_share is None else t.action_share)


def _action_summary(m: dict[str, float]) -> str:
    """The action-prompt figures of a run with action labels, for the stage's summary line ('' without)."""
    if "unseen_action_swap_gain" in m:
        split = "unseen"
    elif "val_action_swap_gain" in m:
        split = "val"
    else:
        return ""
    turns = [f"{a} {m[f'val_action_right_way_{a}']:.2f}" for a in ("turn_left", "turn_right")
             if f"val_action_right_way_{a}" in m]  # fmt: skip
    return (f"; {split} action windows: loss with the idle prompt {100 * m[f'{split}_action_prompt_gain']:+.1f} %, "
            f"with the opposite action's {100 * m[f'{split}_action_swap_gain']:+.1f} %"
            + (f"; samples turned the asked way: {', '.join(turns)}" if turns else ""))


def load_base_dit(cfg: Config, root: Path, model) -> str:
    """teacher.init_from (the demo's base DiT from `streamavatar pretrain`) into ``model``; returns its digest."""
    path = resolve_path(cfg.teacher.init_from, root)
    if not path.is_file():
        raise ConfigError(f"teacher.init_from: {path} does not exist (null starts from a random DiT)")
    load_dit_weights(model, torch.load(path, map_location="cpu", weights_only=True), f"teacher.init_from: {path}")
    return file_digest(path)


def param_groups(model, lr: float, audio_lr_scale: float, prompt_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: the audio modules at ``lr * audio_lr_scale``, the prompt modulation (``model.prompt_modulation``)
    at ``lr * prompt_lr_scale``, the rest at ``lr``."""
    audio = model.audio_parameter_names()
    prompt = {n for n, _ in model.named_parameters() if n.startswith("prompt_modulation.")}
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in audio and n not in prompt], "lr": lr},
              {"params": [p for n, p in named if n in audio], "lr": lr * audio_lr_scale},
              {"params": [p for n, p in named if n in prompt], "lr": lr * prompt_lr_scale}]
    return [g for g in groups if g["params"]]


def teacher_loss(model, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, text: torch.Tensor,
                 talk: torch.Tensor, listen: torch.Tensor, spatial: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The flow-matching loss of one batch: frames 1.. of ``x0`` [B, z, 1 + F, h, w] noised to per-sample
    ``sigma`` [B] with ``noise``, the reference (frame 0) clean at timestep 0 and out of the mean; ``spatial``
    [h, w] weighs latent pixels (a weighted mean: the loss keeps its scale)."""
    b, n_frames, dt = x0.shape[0], x0.shape[2], model.dtype
    x_t = x0.clone()
    x_t[:, :, 1:] = add_noise(x0[:, :, 1:], noise[:, :, 1:], sigma.view(-1, 1, 1, 1, 1))
    v = model(x_t.to(dt), per_frame_t(sigma, n_frames), text.to(dt), talk.to(dt), listen.to(dt)).float()
    mask = frame_mask(b, n_frames, x0.device)
    if spatial is not None:
        mask = mask[:, None, :, None, None] * spatial
    return flow_matching_loss(v, noise, x0, mask)


def _history(path: Path, total: int) -> dict[str, float]:
    """Mean loss over the first and the last tenth of the steps (from the whole run's metrics file)."""
    rows: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["step"] < total:
                rows[r["step"]] = r["loss"]  # a resumed run re-logs the steps after its checkpoint: keep the newest
    if not rows:
        return {}
    steps = sorted(rows)
    k = max(1, len(steps) // 10)
    first = sum(rows[s] for s in steps[:k]) / k
    last = sum(rows[s] for s in steps[-k:]) / k
    return {"loss_first": first, "loss_last": last}
