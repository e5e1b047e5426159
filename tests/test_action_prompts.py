"""The teacher's action-prompt measure (tasks/training/common.py ``action_prompt_response``) on the committed
demo weights and a real portrait: the model's samples under each action's prompt against the idle prompt's."""

from __future__ import annotations

import pandas as pd
import torch

from tasks.common.models import build_dit, build_vae, load_dit_weights
from tasks.common.reference import read_reference
from tasks.config import load_config
from tasks.training.common import action_prompt_response, start_run
from tasks.training.data import WindowSet
from tests.conftest import REPO

PORTRAIT = REPO.parent / "shared" / "fixtures" / "avatars" / "fashion_blogger.jpg"
F = 6  # latent frames after the reference: 24 video frames, a training window's


def _windows(cfg, vae, run, labels: list[str]) -> WindowSet:
    ref = read_reference(PORTRAIT, cfg.video.width, cfg.video.height)
    with torch.no_grad():
        lat = vae.encode_reference(ref[None])
    n = len(labels)
    latents = torch.cat([lat, torch.zeros(*lat.shape[:2], F, *lat.shape[3:])], dim=2).expand(n, -1, -1, -1, -1)
    talk = torch.zeros(n, 1 + F, run.audio.tokens_per_latent, run.audio.token_dim)
    index = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "window": 0, "start_frame": 0, "split": "val",
                          "action": labels})  # fmt: skip
    return WindowSet(index, latents.contiguous(), talk, talk.clone(), torch.zeros(n, 100), torch.zeros(n, 1 + 4 * F),
                     torch.zeros(n, 3, cfg.video.height, cfg.video.width, dtype=torch.uint8))  # fmt: skip


def test_action_prompt_response_is_zero_when_the_prompt_is_ignored_and_writes_its_sheet(tmp_path):
    cfg = load_config(sets=["vae.pretrained_path=weights/demo_vae.pt", "teacher_sampler.steps=8"], root=REPO)
    run = start_run(cfg, REPO, progress=False)
    vae = build_vae(cfg, root=REPO).eval()
    model = build_dit(cfg, run.audio.token_dim, pretrained=False)
    load_dit_weights(model, torch.load(REPO / "weights" / "demo_dit.pt", weights_only=True), "weights/demo_dit.pt")
    windows = _windows(cfg, vae, run, ["idle", "nod", "idle"])
    assert action_prompt_response(run, model, vae, windows.take([0, 2])) == {}  # no action labels: nothing to ask

    r = action_prompt_response(run, model, vae, windows, sheet=tmp_path / "sheet.png")
    assert r["action_response_windows"] == 3.0
    names = ("nod", "shake", "smile", "turn_left", "turn_right", "wave")
    assert set(r) == {"action_response_windows", *(f"action_{k}_{a}" for a in names for k in ("response", "right_way"))}
    assert all(r[f"action_response_{a}"] == r[f"action_response_{a}"] for a in names)  # faces found: no NaN
    # the base DiT was trained on one prompt; another prompt's tokens still move its samples
    assert any(abs(r[f"action_response_{a}"]) > 0 for a in names)
    from PIL import Image

    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (2 * 12 * cfg.video.width, 7 * cfg.video.height)  # 2 windows x every 2nd of 24 frames; 7 prompts

    with torch.no_grad():  # the cross-attention's values closed: the prompt reaches nothing, the samples are equal
        for block in model.blocks:
            block.attn2.to_v.weight.zero_()
            block.attn2.to_v.bias.zero_()
    ignored = action_prompt_response(run, model, vae, windows.take([0, 1]))  # one action window tells
    assert all(ignored[f"action_response_{a}"] == 0.0 and ignored[f"action_right_way_{a}"] == 0.0 for a in names)


def test_action_prompt_gain_scores_the_own_the_idle_and_the_opposite_prompt():
    from tasks.training.common import OPPOSITE_ACTION, action_prompt_gain

    cfg = load_config(sets=["vae.pretrained_path=weights/demo_vae.pt"], root=REPO)
    run = start_run(cfg, REPO, progress=False)
    vae = build_vae(cfg, root=REPO).eval()
    model = build_dit(cfg, run.audio.token_dim, pretrained=False)
    load_dit_weights(model, torch.load(REPO / "weights" / "demo_dit.pt", weights_only=True), "weights/demo_dit.pt")
    assert all(OPPOSITE_ACTION[OPPOSITE_ACTION[a]] == a for a in OPPOSITE_ACTION)
    windows = _windows(cfg, vae, run, ["turn_left", "idle", "nod", "wave"])
    g = action_prompt_gain(run, model, windows)
    assert g["action_windows"] == 3.0  # the idle window is not scored
    assert g["action_prompt_gain"] != 0.0 and g["action_swap_gain"] != 0.0  # other tokens move the prediction
    assert g["action_fm_loss_swapped_prompt"] != g["action_fm_loss_idle_prompt"]
    with torch.no_grad():  # the prompt reaches nothing: no gain either way
        for block in model.blocks:
            block.attn2.to_v.weight.zero_()
            block.attn2.to_v.bias.zero_()
    g = action_prompt_gain(run, model, windows)
    assert g["action_prompt_gain"] == 0.0 and g["action_swap_gain"] == 0.0
    assert action_prompt_gain(run, model, windows.take([1])) == {}
