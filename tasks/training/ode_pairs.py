"""Stage `ode_pairs`: the fine-tuned teacher's ODE trajectories (paper 3.1.1, after CausVid).

For each training window (its reference latent and audio tokens), the teacher solves the probability-flow
ODE with ``ode_pairs.steps`` Euler steps (shift ``ode_pairs.shift``, audio CFG ``ode_pairs.cfg_scale``) from a
noise draw seeded by the pair's id. Only the states at the student's own noise levels (student.steps,
student.timestep_shift; the teacher's schedule contains them exactly) and the final x0 are kept.

Files (data/ode_pairs/): ``shards/NNNNN.pt`` (``states`` [n, N, z, F, h, w] at ``sigmas`` [N], ``x0`` [n, z, F, h,
w]) and ``index.parquet`` (pair_id, clip_id, window, split, shard, row). Resumable: pairs already in the index
are not computed again; a shard and the index are written atomically, shard first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from model.sampling import ancestral_sample_sigmas, euler_sample_sigmas, student_sigmas, teacher_sigmas
from tasks.common.stage import StageResult
from tasks.config import Config, ConfigError, data_path
from tasks.training.common import (
    dit_from_state,
    frozen,
    latent_sample,
    sample_vae,
    start_run,
    teacher_velocity,
)
from tasks.training.data import WindowSet, load_windows, windows_digest
from tasks.training.engine import file_digest, load_final, step_generator

STAGE = "ode_pairs"
COLUMNS = ["pair_id", "clip_id", "window", "split", "shard", "row"]


def pair_id(split: str, clip_id: str, window: int) -> str:
    return f"{split}/{clip_id}/{window}"


def load_pairs(cfg: Config, root: Path, split: str) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor, list[float]]:
    """(index rows, states [n, N, z, F, h, w], x0 [n, z, F, h, w], sigmas) of ``split``, in index order."""
    out = root / cfg.ode_pairs.out_dir
    path = out / "index.parquet"
    if not path.is_file():
        raise ConfigError(f"{path.relative_to(root)}: no ODE pairs; run `streamavatar ode_pairs` first")
    index = pd.read_parquet(path)
    index = index[index.split == split].reset_index(drop=True)
    if index.empty:
        raise ConfigError(f"no {split} ODE pairs in {path.relative_to(root)}")
    shards: dict[int, dict] = {}
    states, x0 = [], []
    sigmas: list[float] = []
    for r in index.itertuples():
        if r.shard not in shards:
            shards[r.shard] = torch.load(out / "shards" / f"{r.shard:05d}.pt", weights_only=True)
        sh = shards[r.shard]
        states.append(sh["states"][r.row])
        x0.append(sh["x0"][r.row])
        sigmas = [float(s) for s in sh["sigmas"]]
    return index, torch.stack(states), torch.stack(x0), sigmas


def pairs_digest(cfg: Config, root: Path) -> str | None:
    """What the pairs are: their index and how they were made (teacher, data, sampler: meta.json). The index alone
    is the same when the same windows are sampled again with other settings."""
    out = root / cfg.ode_pairs.out_dir
    parts = [out / "index.parquet", out / "meta.json"]
    return "/".join(file_digest(p) for p in parts) if all(p.is_file() for p in parts) else None


def pair_windows(labels: list[str], n: int, action_share: float) -> list[int]:
    """Which of the training windows (their action ``labels``) get one of the ``n`` pairs: evenly spread over
    them; with ``action_share`` > 0, that share of the pairs (at most all of them) from the action-labelled
    windows, each set spread evenly on its own."""

    def spread(items: list[int], k: int) -> list[int]:
        if k <= 0 or not items:
            return []
        return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int))]

    acted = [i for i, a in enumerate(labels) if a != "idle"]
    if action_share <= 0 or not acted:
        return spread(list(range(len(labels))), n)
    chosen = spread(acted, round(n * action_share))
    rest = [i for i, a in enumerate(labels) if a == "idle"]
    return sorted(chosen + spread(rest, n - len(chosen)))


def windows_for(cfg: Config, root: Path, index: pd.DataFrame, split: str) -> WindowSet:
    """The data windows the pairs in ``index`` were made from, in the same order."""
    windows = load_windows(cfg, root, split)
    pos = {(r.clip_id, r.window): i for i, r in enumerate(windows.index.itertuples())}
    missing = [(r.clip_id, r.window) for r in index.itertuples() if (r.clip_id, r.window) not in pos]
    if missing:
        raise ConfigError(f"ODE pairs refer to windows no longer in {cfg.train.latents_dir}: {missing[:3]}; "
                          "re-run `streamavatar ode_pairs`")  # fmt: skip
    return windows.take([pos[(r.clip_id, r.window)] for r in index.itertuples()])


def run_ode_pairs(cfg: Config, root: Path, progress: bool = True) -> StageResult:
    run = start_run(cfg, root, progress)
    if not run.dist.main:  # one process is enough: sampling is cheap next to training
        return StageResult(STAGE, summary="ode_pairs: rank > 0, nothing to do")
    c = cfg.ode_pairs
    teacher_path = run.checkpoint_root / "teacher" / "final.pt"
    state = load_final(teacher_path, "teacher")
    teacher = frozen(dit_from_state(cfg, run.audio, state["model"], run.device, run.dtype))
    out = root / c.out_dir
    (out / "shards").mkdir(parents=True, exist_ok=True)
    index_path = out / "index.parquet"
    keep_sigmas = student_sigmas(cfg.student.steps, cfg.student.timestep_shift)
    sigmas = teacher_sigmas(c.steps, c.shift, keep_sigmas)
    keep_at = [sigmas.index(s) for s in keep_sigmas]
    # pairs made by another teacher or sampler are not mixed with new ones
    meta = {"teacher": file_digest(teacher_path), "data": windows_digest(cfg, root), "sigmas": sigmas, "cfg_scale": c.cfg_scale, "seed": cfg.project.seed}
    if c.eta:
        meta["eta"] = c.eta
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        for f in (out / "shards").glob("*.pt"):
            f.unlink()
        index_path.unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))

    index = pd.read_parquet(index_path) if index_path.is_file() else pd.DataFrame(columns=COLUMNS)
    done = set(index.pair_id)
    todo: list[tuple[str, WindowSet]] = []
    train = load_windows(cfg, root, "train")
    if c.max_pairs and c.max_pairs < len(train):  # evenly spread over the windows, so every source has pairs
        train = train.take(pair_windows(list(train.index["action"]), c.max_pairs, cfg.train.action_share))
    todo.append(("train", train))
    todo.append(("val", load_windows(cfg, root, "val", limit=cfg.train.val_windows)))
    pending = [(split, ws, i) for split, ws in todo for i in range(len(ws))
               if pair_id(split, ws.index.clip_id[i], int(ws.index.window[i])) not in done]  # fmt: skip
    next_shard = int(index.shard.max()) + 1 if len(index) else 0
    made = 0
    bar = tqdm(total=len(pending), desc="ode pairs", unit="pair", disable=not run.progress)
    for start in range(0, len(pending), c.batch_size):
        batch = pending[start : start + c.batch_size]
        rows, states, finals = [], [], []
        for split, ws, i in batch:
            w = ws.take([i])
            pid = pair_id(split, w.index.clip_id[0], int(w.index.window[0]))
            lat = w.latents.to(run.device)
            x = torch.randn(lat.shape, generator=step_generator(cfg.project.seed, STAGE, 0, pid)).to(run.device)
            x[:, :, :1] = lat[:, :, :1]
            kept: dict[int, torch.Tensor] = {}

            def keep(k: int, sigma: float, state: torch.Tensor, kept=kept) -> None:
                if k in keep_at:
                    kept[k] = state[0, :, 1:].cpu()

            fn = teacher_velocity(teacher, teacher.prepare_text(run.window_texts(w)), w.talk.to(run.device), w.listen.to(run.device),
                                  c.cfg_scale)  # fmt: skip
            with torch.no_grad(), run.autocast():
                if c.eta:
                    g = step_generator(cfg.project.seed, STAGE, 1, pid)
                    x0 = ancestral_sample_sigmas(fn, x, sigmas, c.eta, g, given_frames=1, keep=keep)
                else:
                    x0 = euler_sample_sigmas(fn, x, sigmas, keep)
            states.append(torch.stack([kept[k] for k in keep_at]))
            finals.append(x0[0, :, 1:].cpu())
            rows.append({"pair_id": pid, "clip_id": w.index.clip_id[0], "window": int(w.index.window[0]),
                         "split": split, "shard": next_shard, "row": len(rows)})  # fmt: skip
            bar.update()
        shard = {"states": torch.stack(states), "x0": torch.stack(finals), "sigmas": torch.tensor(keep_sigmas)}
        path = out / "shards" / f"{next_shard:05d}.pt"
        torch.save(shard, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        index = pd.concat([index, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if len(index) else \
            pd.DataFrame(rows, columns=COLUMNS)
        index.to_parquet(index_path.with_suffix(".tmp"), index=False)
        os.replace(index_path.with_suffix(".tmp"), index_path)
        next_shard += 1
        made += len(rows)
    bar.close()
    counts = index.split.value_counts().to_dict()
    m = {"pairs_train": float(counts.get("train", 0)), "pairs_val": float(counts.get("val", 0)),
         "pairs_made_now": float(made), "teacher_steps": float(c.steps), "kept_states": float(len(keep_at))}  # fmt: skip
    report = data_path(cfg, root, "reports", STAGE)
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(json.dumps(m, indent=2))
    artifacts = [report / "metrics.json"]
    if cfg.train.sample_video:  # the first validation pair's teacher output, decoded, with its audio
        vindex, _, vx0, _ = load_pairs(cfg, root, "val")
        w = windows_for(cfg, root, vindex.iloc[:1], "val")
        lat = torch.cat([w.latents[:, :, :1], vx0[:1]], dim=2)
        artifacts.append(latent_sample(run, sample_vae(cfg, root), lat, w.wave[0], report / "sample.mp4"))
    return StageResult(STAGE, metrics=m, artifacts=artifacts, outputs=[index_path],
                       summary=(f"ode_pairs: {len(index)} pairs ({made} new), teacher {c.steps} "
                                f"{f'stochastic (eta {c.eta})' if c.eta else 'Euler'} steps, CFG "
                                f"{c.cfg_scale}, states kept at sigma {[round(s, 3) for s in keep_sigmas]}"))  # fmt: skip
