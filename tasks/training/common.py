"""Pieces the four training stages share: the run context, models from checkpoints, the sample videos."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from model.audio import AudioConditioner
from model.dit import AudioDiT, PreparedContext
from model.sampling import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    ancestral_sample_sigmas,
    cfg_velocity,
    euler_sample_sigmas,
    predict_x0,
    teacher_sigmas,
)
from model.streaming import StreamingGenerator
from model.text import action_embeddings, prompt_embedding
from model.vae import VideoVAE
from tasks.common.media import write_video, write_wav
from tasks.common.models import (
    build_audio,
    build_dit,
    build_vae,
    device_of,
    dtype_of,
    stream_settings,
    without_untrained_memory,
)
from tasks.config import Config, ConfigError, data_path
from tasks.training.data import WindowSet
from tasks.training.engine import Checkpoints, Dist, config_digest, init_dist, rank_from_env

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One stage's process-wide context."""

    cfg: Config
    root: Path
    dist: Dist
    device: torch.device
    dtype: torch.dtype  # of the parameters and inputs: float32, the master weights AdamW updates
    text: torch.Tensor  # [1, text_len, text_dim], the fixed prompt's embedding
    audio: AudioConditioner
    progress: bool
    compute: torch.dtype = torch.float32  # project.dtype: what the steps compute in (autocast)
    _action_text: dict[str, torch.Tensor] | None = None  # each action's prompt embedding, made when first needed

    def autocast(self):
        """The steps' mixed precision: bf16/fp16 compute on float32 master weights (a no-op for float32).
        Parameters stored in bf16 would lose AdamW's small updates: at lr 2e-6 most weights of magnitude ~0.02
        would not change at all (tests/test_mixed_precision.py)."""
        return torch.autocast(self.device.type, dtype=self.compute, enabled=self.compute != torch.float32)

    @property
    def checkpoint_root(self) -> Path:
        return self.root / self.cfg.train.checkpoint_dir

    def checkpoints(self, stage: str, fingerprint: str) -> Checkpoints:
        return Checkpoints(self.checkpoint_root / stage, fingerprint, self.cfg.train.keep_checkpoints)

    def text_batch(self, b: int) -> torch.Tensor:
        return self.text.to(self.device, self.dtype).expand(b, -1, -1)

    def context(self, dit: AudioDiT, b: int) -> PreparedContext:
        """The prompt's cross-attention K/V for ``dit`` (recomputed per step when ``dit`` trains)."""
        return dit.prepare_text(self.text_batch(b))

    def texts(self, actions: Sequence[str]) -> torch.Tensor:
        """[len(actions), text_len, text_dim]: each window's prompt (its action's; ``idle``: the base prompt,
        the same tensor as ``text_batch``)."""
        if not actions:
            raise ValueError("texts() of no windows")
        if all(a == "idle" for a in actions):
            return self.text_batch(len(actions))
        table = self.action_text
        unknown = sorted({a for a in actions if a != "idle" and a not in table})
        if unknown:
            raise ValueError(f"no prompt for action(s) {unknown}; known: idle, {', '.join(sorted(table))}")
        rows = [self.text if a == "idle" else table[a] for a in actions]
        return torch.cat(rows).to(self.device, self.dtype)

    @property
    def action_text(self) -> dict[str, torch.Tensor]:
        """Each action's prompt embedding (model/text.py ``action_embeddings``; idle: ``text``), made on first
        use, so a run without action labels never encodes them."""
        if self._action_text is None:
            m = self.cfg.model
            made = action_embeddings(m.prompt, m.text_len, m.text_dim, m.text_encoder_path,
                                     cache_dir=data_path(self.cfg, self.root, "cache"), dtype=self.compute)  # fmt: skip
            self._action_text = {k: v.float() for k, v in made.items() if k != "idle"}
        return self._action_text

    def window_texts(self, windows: WindowSet, idx: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The prompts of ``windows`` (rows ``idx`` of it): by their ``action`` label."""
        labels = list(windows.index["action"]) if "action" in windows.index else ["idle"] * len(windows)
        if idx is not None:
            labels = [labels[int(i)] for i in (idx.tolist() if torch.is_tensor(idx) else idx)]
        return self.texts(labels)


def start_run(cfg: Config, root: Path, progress: bool = True) -> Run:
    dist = init_dist(device_of(cfg))
    text = prompt_embedding(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim, cfg.model.text_encoder_path,
                            cache_dir=data_path(cfg, root, "cache"), dtype=dtype_of(cfg))  # fmt: skip
    audio = build_audio(cfg).to(dist.device)
    return Run(cfg, root, dist, dist.device, torch.float32, text.float(), audio, progress and dist.main,
               compute=dtype_of(cfg))  # fmt: skip


def run_fingerprint(cfg: Config, sections: list[str], extra: dict | None = None) -> str:
    """Digest of the config sections a stage's result depends on, minus how long it runs and how it logs."""
    skip = {"iterations", "checkpoint_every", "keep_checkpoints", "log_every", "sample_video"}
    data = {}
    for name in sections:
        value = cfg.section(name)
        dumped = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        if isinstance(dumped, dict):
            dumped = {k: v for k, v in dumped.items() if k not in skip}
        data[name] = dumped
    return config_digest({**data, **(extra or {})})


def model_sections() -> list[str]:
    return ["project.seed", "project.dtype", "model", "vae", "audio", "video", "student", "train"]


def dit_from_state(cfg: Config, audio: AudioConditioner, state: dict, device: torch.device,
                   dtype: torch.dtype | None = None) -> AudioDiT:  # fmt: skip
    dit = build_dit(cfg, audio.token_dim, pretrained=False, dtype=dtype).to(device)
    state, dropped = without_untrained_memory(dit, state)  # a teacher's closed memory: the student's keeps its init
    try:
        missing, unexpected = dit.load_state_dict(state, strict=not dropped)
        if unexpected or any(".long_memory." not in k for k in missing):
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    except RuntimeError as exc:  # e.g. a teacher trained with model.memory_slots loaded into a model without
        raise ConfigError(f"a checkpoint does not fit the configured model.* (trained with other model settings, "
                          f"e.g. model.memory_slots?): {str(exc).splitlines()[0]} "
                          f"{' '.join(str(exc).splitlines()[1:2]).strip()[:300]}") from None  # fmt: skip
    return dit


def whole(run: Run, model: AudioDiT, state: dict) -> AudioDiT:
    """The trained model for what rank 0 measures alone: itself, or, when FSDP2 shards it (its forward would
    wait for the other ranks), a whole copy built from the gathered ``state``."""
    if not model.sharded:
        return model
    return dit_from_state(run.cfg, run.audio, state, run.device, run.dtype).eval()


def memory_param_groups(model: nn.Module, lr: float, memory_lr_scale: float) -> list[dict]:
    """AdamW groups of a student: its long memory (model/memory.py, ``.long_memory.``) at ``lr *
    memory_lr_scale`` (``train.memory_lr_scale``), everything else at ``lr``; one group without a memory."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if ".long_memory." not in n], "lr": lr},
              {"params": [p for n, p in named if ".long_memory." in n], "lr": lr * memory_lr_scale}]
    return [g for g in groups if g["params"]]


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable(model: nn.Module, on: bool = True) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(on)
    return model


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def frame_mask(b: int, frames: int, device: torch.device) -> torch.Tensor:
    """[B, frames] selecting the generated frames (frame 0, the clean reference, excluded)."""
    m = torch.ones(b, frames, device=device)
    m[:, 0] = 0
    return m


def per_frame_t(sigma: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-sample sigmas [B] -> per-frame timesteps [B, frames], 0 at the clean reference."""
    t = (sigma[:, None] * NUM_TRAIN_TIMESTEPS).expand(-1, frames).clone()
    t[:, 0] = 0
    return t


def noised(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x [B, z, 1 + F, h, w] with frames 1.. noised to per-sample ``sigma`` [B]; the reference stays clean."""
    return torch.cat([x[:, :, :1], add_noise(x[:, :, 1:], eps[:, :, 1:], sigma.view(-1, 1, 1, 1, 1))], 2)


def teacher_velocity(teacher: AudioDiT, context: PreparedContext, talk: torch.Tensor, listen: torch.Tensor,
                     guidance: float):  # fmt: skip
    """velocity_fn(x, sigma) of the bidirectional teacher with audio classifier-free guidance; the reference
    frame (0) stays clean."""

    def fn(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        b, _, f = x.shape[:3]
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        t = per_frame_t(s, f)
        dtype = teacher.dtype
        v = teacher(x.to(dtype), t, context, talk.to(dtype), listen.to(dtype)).float()
        if guidance != 1.0:
            zeros = torch.zeros_like(talk, dtype=dtype)
            v = cfg_velocity(v, teacher(x.to(dtype), t, context, zeros, zeros).float(), guidance)
        v[:, :, 0] = 0  # the reference is given, not generated
        return v

    return fn


def sample_teacher(cfg: Config, teacher: AudioDiT, context: PreparedContext, x: torch.Tensor, talk: torch.Tensor,
                   listen: torch.Tensor, seed: int | None = None) -> torch.Tensor:  # fmt: skip
    """The teacher's sample from ``x`` (frame 0 the clean reference, the rest noise) with teacher_sampler.*; the
    stochastic sampler's fresh noise is seeded by ``seed`` (default project.seed)."""
    s = cfg.teacher_sampler
    fn = teacher_velocity(teacher, context, talk, listen, s.cfg_scale)
    sigmas = teacher_sigmas(s.steps, s.shift)
    if s.eta == 0.0:
        return euler_sample_sigmas(fn, x, sigmas)
    g = torch.Generator().manual_seed(cfg.project.seed if seed is None else seed)
    return ancestral_sample_sigmas(fn, x, sigmas, s.eta, g, given_frames=1)


def teacher_x0(teacher: AudioDiT, context: PreparedContext, x_t: torch.Tensor, sigma: torch.Tensor,
               talk: torch.Tensor, listen: torch.Tensor, guidance: float) -> torch.Tensor:  # fmt: skip
    """x0 prediction of the teacher at per-sample noise levels ``sigma`` [B]."""
    v = teacher_velocity(teacher, context, talk, listen, guidance)(x_t, sigma)
    return predict_x0(x_t, v, sigma.view(-1, 1, 1, 1, 1))


# -------------------------------------------------------------------------------------------------- samples
def _wave_file(wave: torch.Tensor, sample_rate: int, directory: Path) -> Path:
    path = directory / "audio.wav"
    write_wav(path, wave.float().numpy(), sample_rate)
    return path


def _to_uint8(frames: torch.Tensor) -> list[np.ndarray]:
    """[3, T, H, W] in [-1, 1] -> T RGB uint8 frames."""
    x = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    return list(x)


def write_sample(path: Path, frames: torch.Tensor, wave: torch.Tensor, cfg: Config) -> Path:
    """An mp4 of ``frames`` [3, T, H, W] with ``wave`` muxed in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        audio = _wave_file(wave, cfg.audio.sample_rate, Path(tmp))
        write_video(path, _to_uint8(frames), cfg.video.fps, audio_path=audio, audio_rate=cfg.audio.sample_rate)
    return path


@torch.no_grad()
def teacher_sample(run: Run, teacher: AudioDiT, vae: VideoVAE, val: WindowSet, out: Path) -> Path:
    """The teacher's sample (teacher_sampler.*) of the first validation window (frames 1.., the window's audio)."""
    cfg = run.cfg
    w = val.take([0])
    lat = w.latents.to(run.device)
    g = torch.Generator().manual_seed(cfg.project.seed)
    x = torch.randn(lat.shape, generator=g).to(run.device)
    x[:, :, :1] = lat[:, :, :1]
    x0 = sample_teacher(cfg, teacher.eval(), teacher.prepare_text(run.window_texts(w)), x, w.talk.to(run.device),
                        w.listen.to(run.device))  # fmt: skip
    return latent_sample(run, vae, x0, w.wave[0], out)


@torch.no_grad()
def latent_sample(run: Run, vae: VideoVAE, latents: torch.Tensor, wave: torch.Tensor, out: Path) -> Path:
    """Decode [1, z, 1 + F, h, w] (reference first) and write it with the window's audio."""
    frames = vae.decode(latents.to(run.device))[0]
    return write_sample(out, frames, wave, run.cfg)


@torch.no_grad()
def student_sample(run: Run, student: AudioDiT, vae: VideoVAE, val: WindowSet, out: Path) -> Path:
    """The student streaming the first validation window through StreamingGenerator (the product path):
    the avatar's voice is the window's audio where it speaks, the other voice the rest."""
    cfg = run.cfg
    w = val.take([0])
    gen = StreamingGenerator(student.eval(), vae, run.audio, run.text, stream_settings(cfg))
    ref = w.reference[0].float().to(run.device) / 127.5 - 1.0
    gen.start(ref)
    spf = cfg.audio.sample_rate // cfg.video.fps
    mask = w.mask[0].repeat_interleave(spf)
    avatar, other = w.wave[0] * mask, w.wave[0] * (1 - mask)
    frames = []
    step = gen.samples_per_chunk
    for i in range(cfg.train.window_chunks):
        piece = slice(spf + i * step, spf + (i + 1) * step)  # audio of video frames 1.. (frame 0 is the reference)
        frames.append(gen.step(avatar[piece], other[piece])[0])
    video = torch.cat(frames, dim=1)
    return write_sample(out, video, w.wave[0, spf : spf + video.shape[1] * spf], cfg)


def sample_vae(cfg: Config, root: Path | None = None) -> VideoVAE:
    return build_vae(cfg, root=root).eval()


def is_main_process() -> bool:
    return rank_from_env() == 0


# ------------------------------------------------------------------------------------------ held-out measures
@torch.no_grad()
def latent_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the per-position latent vectors of two sets of latent
    clips [B, z, F, h, w] (every frame and pixel of a clip is one z-dimensional sample): a distribution-level
    distance that, unlike a same-noise MSE, does not ask a generator to reproduce one particular sample.
    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64."""

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = x.double().movedim(1, -1).reshape(-1, x.shape[1])
        return v.mean(0), torch.cov(v.T).reshape(x.shape[1], x.shape[1])

    (mu_a, ca), (mu_b, cb) = stats(a), stats(b)
    w, q = torch.linalg.eigh(ca)
    root_a = q @ torch.diag(w.clamp(min=0).sqrt()) @ q.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * cross)


@torch.no_grad()
def student_samples(student: AudioDiT, text: torch.Tensor, reference: torch.Tensor, talk: torch.Tensor,
                    listen: torch.Tensor, layout, sigmas: list[float], noise: torch.Tensor, seed: int,
                    context_mode: str) -> torch.Tensor:  # fmt: skip
    """The student's own N-step streaming samples [B, z, 1 + F, h, w] from ``noise`` [B, z, F, h, w] (the
    re-noising drawn from ``seed``), every chunk run to its last step: what inference produces."""
    from model.rollout import student_rollout

    g = torch.Generator().manual_seed(seed)
    renoise = torch.randn((max(len(sigmas) - 1, 1), *noise.shape), generator=g).to(noise.device)
    chunks = layout.chunks(1 + noise.shape[2])[1:]
    was = student.training
    student.eval()
    out = student_rollout(student, reference, student.prepare_text(text), talk, listen, layout, sigmas, noise,
                          renoise, [len(sigmas) - 1] * len(chunks), context_mode, grad=False)  # fmt: skip
    student.train(was)
    return out


EVAL_SIGMAS = (0.2, 0.5, 0.8)


@torch.no_grad()
def heldout_fm_losses(model: AudioDiT | None, latents: torch.Tensor, text: torch.Tensor, talk: torch.Tensor,
                      listen: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, seed: int = 0,
                      spatial: torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """Flow-matching loss of held-out windows ``latents`` [B, z, 1 + F, h, w] at EVAL_SIGMAS with fixed noise (the
    reference clean, as in training). ``model`` None: the per-channel Gaussian denoiser with the training latents'
    ``mean`` / ``var`` [1, z, 1, 1, 1] -- the score of a model that learned nothing about faces or motion.
    ``spatial`` [h, w]: latent-pixel weights of the mean (e.g. 1 in the mouth box, 0 elsewhere)."""
    from model.losses import flow_matching_loss, gaussian_denoiser_velocity
    from tasks.training.teacher import teacher_loss

    g = torch.Generator().manual_seed(seed)
    out = {}
    device = latents.device
    for s in EVAL_SIGMAS:
        noise = torch.randn(latents.shape, generator=g).to(device)
        sigma = torch.full((latents.shape[0],), s, device=device)
        if model is None:
            x_t = add_noise(latents[:, :, 1:], noise[:, :, 1:], s)
            v = gaussian_denoiser_velocity(x_t, sigma, mean.to(device), var.to(device))
            weight = None if spatial is None else spatial[None, None, None]  # [h, w] -> [1, 1, 1, h, w]
            loss = float(flow_matching_loss(v, noise[:, :, 1:], latents[:, :, 1:], weight))
        else:
            was = model.training
            model.eval()
            loss = float(teacher_loss(model, latents, sigma, noise, text.expand(latents.shape[0], -1, -1), talk, listen,
                                      spatial))
            model.train(was)
        out[f"fm_loss_s{s}"] = loss
    out["fm_loss"] = float(np.mean(list(out.values())))
    return out


# the action whose prompt a window is also scored under: the one most like it that moves the other way
OPPOSITE_ACTION = {"turn_left": "turn_right", "turn_right": "turn_left", "nod": "shake", "shake": "nod",
                   "smile": "wave", "wave": "smile"}  # fmt: skip


def action_prompt_gain(run: Run, model: AudioDiT, windows: WindowSet) -> dict[str, float]:
    """Does the model use the action prompt? On the windows labelled with an action (not idle): the
    flow-matching loss with the base (idle) prompt over the loss with their own action's prompt, minus 1 --
    0 for a model that ignores the prompt, > 0 when the action's words predict the motion; and
    ``action_swap_gain``, the same with the prompt of the opposite action (``OPPOSITE_ACTION``: a turn the
    other way, shake for nod, wave for smile) -- > 0 when the prompt tells which action, not only that one
    happens. Empty without labelled windows."""
    labels = list(windows.index["action"]) if "action" in windows.index else []
    acted = [i for i, a in enumerate(labels) if a != "idle"]
    if not acted:
        return {}
    w = windows.take(acted)
    device = next(model.parameters()).device
    lat = w.latents.to(device)
    zero = torch.zeros(1, lat.shape[1], 1, 1, 1)
    talk, listen = w.talk.to(device), w.listen.to(device)
    own = heldout_fm_losses(model, lat, run.window_texts(w), talk, listen, zero, zero)
    idle = heldout_fm_losses(model, lat, run.text_batch(len(w)), talk, listen, zero, zero)
    swapped = run.texts([OPPOSITE_ACTION.get(labels[i], labels[i]) for i in acted])
    swap = heldout_fm_losses(model, lat, swapped, talk, listen, zero, zero)
    return {"action_windows": float(len(w)), "action_fm_loss": own["fm_loss"],
            "action_fm_loss_idle_prompt": idle["fm_loss"], "action_prompt_gain": idle["fm_loss"] / own["fm_loss"] - 1.0,
            "action_fm_loss_swapped_prompt": swap["fm_loss"],
            "action_swap_gain": swap["fm_loss"] / own["fm_loss"] - 1.0}  # fmt: skip


@torch.no_grad()
def action_prompt_response(run: Run, model: AudioDiT, vae: VideoVAE, windows: WindowSet, limit: int = 8,
                           sheet: Path | None = None) -> dict[str, float]:  # fmt: skip
    """Does the model perform the action its prompt asks for? On up to ``limit`` held-out windows (spread over
    ``windows``), its samples (teacher_sampler.*) under every action's prompt and under the idle prompt from
    the same noise and sampler seed, decoded and read by FaceMesh (tasks/evaluation/actions.py
    ``prompt_response``: per action the change of its feature against idle, signed so the requested way is
    positive, and the share of windows that moved that way). Empty without action prompts in the run's data.
    ``sheet``: a PNG of the first two windows, a row per prompt (idle first), every second frame."""
    from tasks.evaluation.actions import action_signals, clip_features, prompt_response

    if "action" not in windows.index or (windows.index["action"] == "idle").all() or not len(windows):
        return {}
    cfg = run.cfg
    pick = np.unique(np.linspace(0, len(windows) - 1, min(limit, len(windows))).round().astype(int)).tolist()
    w = windows.take(pick)
    lat = w.latents.to(run.device)
    x = torch.randn(lat.shape, generator=torch.Generator().manual_seed(cfg.project.seed)).to(run.device)
    x[:, :, :1] = lat[:, :, :1]
    talk, listen = w.talk.to(run.device), w.listen.to(run.device)
    was = model.training
    model.eval()
    features: dict[str, list[dict[str, float]]] = {}
    rows = []
    for name in ["idle", *sorted(run.action_text)]:
        x0 = sample_teacher(cfg, model, model.prepare_text(run.texts([name] * len(w))), x.clone(), talk, listen)
        video = [np.stack(_to_uint8(v[:, 1:])) for v in vae.decode(x0)]  # per window [T, H, W, 3]
        features[name] = [clip_features(action_signals(v), cfg.video.fps) for v in video]
        rows.append(np.concatenate([np.concatenate(list(v[::2]), axis=1) for v in video[:2]], axis=1))
    model.train(was)
    if sheet is not None:
        sheet.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sheet), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    return {"action_response_windows": float(len(w)), **{f"action_{k}": v for k, v in prompt_response(features).items()}}


def mouth_audio_gain(model: AudioDiT, windows: WindowSet, text: torch.Tensor, box: tuple[float, float, float, float],
                     min_talk: float = 0.3) -> dict[str, float]:  # fmt: skip
    """Does the model use the audio where it matters? The flow-matching loss in the mouth box (``box``, fractions
    of the latent frame) of the windows of ``windows`` in which the avatar talks (speaking mask mean >=
    ``min_talk``), with their own audio and with the audio of the next such window (the same voices and
    loudness, out of sync). ``mouth_audio_gain`` = shuffled / own - 1: 0 for a model that ignores the audio
    (exactly 0 for the zero-initialised audio modules), > 0 for one whose mouth follows it."""
    from model.losses import region_weight

    talking = torch.nonzero(windows.mask[:, 1:].float().mean(1) >= min_talk).flatten().tolist()
    if len(talking) < 2:
        return {}
    w = windows.take(talking)
    if text.shape[0] == len(windows) > 1:  # one prompt per window: those of the talking ones
        text = text[talking]
    device = next(model.parameters()).device
    lat = w.latents.to(device)
    mouth = region_weight(*lat.shape[-2:], box, 1.0, outside=0.0).to(device)
    other = torch.roll(torch.arange(len(w)), 1)
    zero = torch.zeros(1, lat.shape[1], 1, 1, 1)
    own = heldout_fm_losses(model, lat, text, w.talk.to(device), w.listen.to(device), zero, zero, spatial=mouth)
    shuffled = heldout_fm_losses(model, lat, text, w.talk[other].to(device), w.listen[other].to(device), zero, zero,
                                 spatial=mouth)  # fmt: skip
    return {"mouth_windows": float(len(w)), "mouth_fm_loss": own["fm_loss"],
            "mouth_fm_loss_shuffled_audio": shuffled["fm_loss"],
            "mouth_audio_gain": shuffled["fm_loss"] / own["fm_loss"] - 1.0}
