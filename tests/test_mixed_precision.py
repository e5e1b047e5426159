"""Mixed precision in training: float32 master weights updated by AdamW, bf16 compute by autocast.

Parameters stored in bf16 (what `project.dtype: bfloat16` did before) cannot take the paper's small updates:
at lr 2e-6 AdamW moves each weight by about 2e-6, under half of bf16's spacing near 0.02, so most weights do
not change at all. With float32 master weights every weight that gets a gradient moves."""

from __future__ import annotations

import torch

from tasks.common.models import build_audio, build_dit
from tasks.training.teacher import run_teacher
from tests.training_data import make_project, tiny_config


def _moved(before: dict, after: dict, names) -> float:
    changed = total = 0
    for n in names:
        a, b = before[n].float(), after[n].float()
        changed += int((a != b).sum())
        total += a.numel()
    return changed / total


def test_bf16_training_keeps_float32_master_weights_that_move_at_the_papers_learning_rate(tmp_path):
    root = make_project(tmp_path)
    cfg = tiny_config(root)
    cfg.project.dtype = "bfloat16"
    cfg.teacher.lr = 2e-6
    cfg.teacher.iterations = 1
    cfg.teacher.audio_dropout = 0.0
    token_dim = build_audio(cfg).token_dim
    init = build_dit(cfg, token_dim, pretrained=False, dtype=torch.float32)  # the stage's seeded start
    start = {k: v.detach().clone() for k, v in init.state_dict().items()}
    run_teacher(cfg, root, progress=False)
    final = torch.load(root / cfg.train.checkpoint_dir / "teacher" / "final.pt", weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in final.values() if v.is_floating_point())  # master weights
    # the audio modules start with a zero output layer, so their attention weights get no gradient yet
    names = [n for n in start if start[n].is_floating_point() and "audio" not in n and "interact" not in n]
    moved = _moved(start, final, names)
    assert moved >= 0.95, moved

    # what bf16 parameters do with the same kind of update: most weights stay exactly where they were
    model = build_dit(cfg, token_dim, pretrained=False, dtype=torch.bfloat16)
    kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=2e-6, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # a gradient on every weight
    opt.step()
    bf16_names = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert _moved(kept, model.state_dict(), bf16_names) < 0.3
