"""The teacher's mouth-weighted flow-matching loss and the held-out measure of whether the audio drives the mouth."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from model.dit import AudioDiT, DiTSpec
from model.losses import flow_matching_loss, region_weight
from tasks.training.common import frame_mask, mouth_audio_gain
from tasks.training.data import WindowSet
from tasks.training.teacher import param_groups, teacher_loss

Z, F, H = 4, 3, 8


def tiny(seed: int = 0) -> AudioDiT:
    torch.manual_seed(seed)
    return AudioDiT(DiTSpec(num_attention_heads=2, attention_head_dim=8, in_channels=Z, out_channels=Z, text_dim=8,
                            ffn_dim=32, num_layers=2, audio_dim=6)).eval()  # fmt: skip


def test_region_weight_marks_the_pixels_whose_centres_lie_in_the_box():
    w = region_weight(4, 8, (0.5, 1.0, 0.25, 0.5), 5.0)
    assert w.shape == (4, 8)
    expected = torch.ones(4, 8)
    expected[2:4, 2:4] = 5.0  # rows with centres 0.625, 0.875; columns with centres 0.3125, 0.4375
    assert torch.equal(w, expected)
    mask = region_weight(4, 8, (0.5, 1.0, 0.25, 0.5), 1.0, outside=0.0)
    assert mask.sum() == 4


@pytest.mark.parametrize("box", [(0.6, 0.5, 0.2, 0.4), (0.1, 0.2, 0.5, 1.2), (0.51, 0.52, 0.1, 0.2)])
def test_region_weight_rejects_an_empty_or_inverted_box(box):
    with pytest.raises(ValueError, match="box"):
        region_weight(4, 4, box, 2.0)


def test_teacher_loss_with_a_spatial_weight_is_the_weighted_mean_over_generated_frames():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, Z, 1 + F, H, H, generator=g), torch.randn(2, Z, 1 + F, H, H, generator=g)
    talk = torch.randn(2, 1 + F, 5, 6, generator=g)
    text = torch.randn(2, 3, 8, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    spatial = region_weight(H, H, (0.5, 1.0, 0.25, 0.75), 10.0)
    with torch.no_grad():
        plain = teacher_loss(model, x0, sigma, noise, text, talk, talk)
        ones = teacher_loss(model, x0, sigma, noise, text, talk, talk, torch.ones(H, H))
        weighted = teacher_loss(model, x0, sigma, noise, text, talk, talk, spatial)
        # the same by hand: the squared velocity error of frames 1.., weighted by pixel
        x_t = x0.clone()
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t[:, :, 1:] = (1 - s) * x0[:, :, 1:] + s * noise[:, :, 1:]
        t = (sigma[:, None] * 1000).expand(-1, 1 + F).clone()
        t[:, 0] = 0
        err = (model(x_t, t, text, talk, talk) - (noise - x0))[:, :, 1:] ** 2
    assert torch.allclose(ones, plain, rtol=1e-6)
    manual = (err * spatial).sum() / (spatial.sum() * err[..., 0, 0].numel())
    assert torch.allclose(weighted, manual, rtol=1e-5)
    assert not torch.allclose(weighted, plain, rtol=1e-3)  # the box counts 10x
    assert torch.allclose(plain, flow_matching_loss(model(x_t, t, text, talk, talk), noise, x0,
                                                    frame_mask(2, 1 + F, x0.device)), rtol=1e-6)  # fmt: skip


def test_param_groups_give_the_audio_modules_their_own_learning_rate():
    model = tiny()
    groups = param_groups(model, 1e-4, 10.0)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3)]
    audio = {id(p) for n, p in model.named_parameters() if n in model.audio_parameter_names()}
    assert {id(p) for p in groups[1]["params"]} == audio
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.manual_seed(1)
    with_prompt = AudioDiT(DiTSpec(num_attention_heads=2, attention_head_dim=8, in_channels=Z, out_channels=Z,
                                   text_dim=8, ffn_dim=32, num_layers=2, audio_dim=6, prompt_modulation=True))  # fmt: skip
    groups = param_groups(with_prompt, 1e-4, 10.0, 3.0)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3), pytest.approx(3e-4)]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in with_prompt.prompt_modulation.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(with_prompt.parameters()))


def _windows(n: int = 4) -> WindowSet:
    g = torch.Generator().manual_seed(2)
    talk = torch.randn(n, 1 + F, 5, 6, generator=g)
    mask = torch.ones(n, 1 + 4 * F)
    mask[-1] = 0  # a listening window: left out of the measure
    return WindowSet(pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "window": 0, "start_frame": 0,
                                   "split": "val"}),  # fmt: skip
                     torch.randn(n, Z, 1 + F, H, H, generator=g), talk, torch.zeros_like(talk),
                     torch.zeros(n, 100), mask, torch.zeros(n, 3, 8, 8, dtype=torch.uint8))


def test_mouth_audio_gain_is_zero_for_a_model_that_ignores_the_audio_and_not_for_one_that_uses_it():
    model = tiny()
    windows = _windows()
    text = torch.randn(1, 3, 8)
    box = (0.5, 1.0, 0.25, 0.75)
    ignores = mouth_audio_gain(model, windows, text, box)  # zero-initialised audio modules: no audio path
    assert ignores["mouth_windows"] == 3.0
    assert ignores["mouth_audio_gain"] == 0.0
    assert ignores["mouth_fm_loss"] == ignores["mouth_fm_loss_shuffled_audio"]
    with torch.no_grad():
        for block in model.blocks:
            block.audio_attn.to_out.weight.normal_(0, 0.5)
    uses = mouth_audio_gain(model, windows, text, box)
    assert abs(uses["mouth_audio_gain"]) > 1e-4
    assert uses["mouth_fm_loss"] != uses["mouth_fm_loss_shuffled_audio"]
    assert mouth_audio_gain(model, windows.take([0, 3]), text, box) == {}  # fewer than 2 talking windows


def test_the_gaussian_baseline_weighs_pixels_like_the_model():
    from tasks.training.common import heldout_fm_losses

    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, Z, 1 + F, H, H, generator=g)
    mean, var = torch.zeros(1, Z, 1, 1, 1), torch.ones(1, Z, 1, 1, 1)
    talk = torch.zeros(2, 1 + F, 5, 6)
    text = torch.zeros(1, 3, 8)
    plain = heldout_fm_losses(None, lat, text, talk, talk, mean, var)["fm_loss"]
    ones = heldout_fm_losses(None, lat, text, talk, talk, mean, var, spatial=torch.ones(H, H))["fm_loss"]
    box = heldout_fm_losses(None, lat, text, talk, talk, mean, var,
                            spatial=region_weight(H, H, (0.5, 1.0, 0.25, 0.75), 1.0, outside=0.0))["fm_loss"]  # fmt: skip
    assert ones == pytest.approx(plain, rel=1e-6)
    assert box != pytest.approx(plain, rel=1e-3)  # the mean over the box's pixels only


def test_the_teacher_draws_its_own_share_of_action_windows():
    from tasks.config import load_config
    from tasks.training.teacher import teacher_draw_weights

    labels = ["idle"] * 14 + ["nod", "nod", "turn_left", "wave"]
    acted = torch.tensor([a != "idle" for a in labels])
    cfg = load_config(sets=["train.action_share=0.5"])
    assert teacher_draw_weights(cfg, labels)[acted].sum().item() == pytest.approx(0.5)  # as the later stages
    cfg = load_config(sets=["train.action_share=0.5", "teacher.action_share=0.9"])
    w = teacher_draw_weights(cfg, labels)
    assert w[acted].sum().item() == pytest.approx(0.9) and w.sum().item() == pytest.approx(1.0)
    assert w[14].item() == pytest.approx(w[15].item()) and w[16].item() == pytest.approx(2 * w[14].item())
    assert teacher_draw_weights(load_config(sets=["teacher.action_share=0"]), labels) is None  # uniform
