"""TalkNet-ASD: our implementation takes the authors' checkpoint layout strictly and scores frames like Light-ASD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model.asd.talknet import TalkNet, load_talknet, to_checkpoint
from tasks.curation.asd import asd_scores, load_detector
from tests.conftest import shared_path

HEADS = ("head_av", "head_a", "head_v")  # lossAV / lossA / lossV FCs of the authors' training wrapper


@pytest.fixture(scope="module")
def model() -> TalkNet:
    torch.manual_seed(0)
    net = TalkNet()
    # non-default BN statistics and affine values, so a round trip that forgot a buffer would show
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net.eval()


def inputs(t: int, b: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4 * t, 13, generator=gen) * 10, torch.rand(b, t, 112, 112, generator=gen) * 255


@pytest.mark.parametrize("t", [25, 37])
def test_one_logit_per_frame(model, t):
    mfcc, faces = inputs(t, b=2)
    with torch.no_grad():
        out = model(mfcc, faces)
        assert out.shape == (2, t) and torch.isfinite(out).all()
        if t == 37:  # clips in a batch do not see each other (the authors' batched 3D conv leaks at seams)
            torch.testing.assert_close(out[1:], model(mfcc[1:], faces[1:]), rtol=1e-4, atol=1e-5)


def test_parameter_count_is_the_published_size(model):
    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for name in HEADS for p in getattr(model, name).parameters())
    assert total == 15_744_481
    assert heads == 257 * 2 + 2 * 129 * 2
    # the paper's / the authors' log's "15.01 M" is the network without the heads, counted in units of 2**20
    assert total - heads == 15_743_451 and round((total - heads) / 2**20, 2) == 15.01


def test_checkpoint_under_the_authors_names_loads_strictly(model, tmp_path):
    state = to_checkpoint(model.state_dict())
    assert len(state) == 487
    for key in (
        "model.visualFrontend.frontend3D.0.weight",
        "model.visualFrontend.frontend3D.1.running_var",
        "model.visualFrontend.resnet.layer1.downsample.weight",
        "model.visualTCN.net.4.net.3.weight",
        "model.visualTCN.net.0.net.4.gamma",
        "model.visualConv1D.net.3.bias",
        "model.audioEncoder.layer4.2.se.fc.2.bias",
        "model.audioEncoder.layer2.0.downsample.1.num_batches_tracked",
        "model.crossA2V.self_attn.in_proj_weight",
        "model.selfAV.self_attn.out_proj.bias",
        "lossAV.FC.weight",
        "lossA.FC.bias",
        "lossV.FC.weight",
    ):
        assert key in state, key
    mfcc, faces = inputs(10)
    with torch.no_grad():
        want = model(mfcc, faces)
    for name, saved in (("plain.model", state), ("parallel.model", {f"module.{k}": v for k, v in state.items()})):
        torch.save(saved, tmp_path / name)
        loaded = load_talknet(tmp_path / name)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(mfcc, faces), want), name


def test_missing_or_foreign_weights_fail_clearly(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.model.*curate\.asd_weights"):
        load_talknet(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"'model\.visualEncoder\.block1\.s_3\.weight'.*TalkNet checkpoint"):
        load_talknet(shared_path("models", "light-asd", "finetuning_TalkSet.model"))
    partial = to_checkpoint(model.state_dict())
    del partial["lossAV.FC.bias"]
    torch.save(partial, tmp_path / "partial.model")
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'lossAV\.FC\.bias'"):
        load_talknet(tmp_path / "partial.model")


def test_training_only_heads_may_be_absent(model, tmp_path):
    mfcc, faces = torch.randn(1, 100, 13), torch.randint(0, 255, (1, 25, 112, 112)).float()
    state = {k: v for k, v in to_checkpoint(model.state_dict()).items() if not k.startswith(("lossA.", "lossV."))}
    torch.save(state, tmp_path / "inference_only.model")
    loaded = load_talknet(tmp_path / "inference_only.model")
    with torch.no_grad():
        assert torch.equal(loaded(mfcc, faces), model(mfcc, faces))


def test_curation_uses_talknet(model, tmp_path):
    torch.save(to_checkpoint(model.state_dict()), tmp_path / "pretrain_TalkSet.model")
    detector = load_detector("talknet", tmp_path / "pretrain_TalkSet.model")
    assert isinstance(detector, TalkNet) and not detector.training
    with pytest.raises(ValueError, match="light-asd, talknet"):
        load_detector("syncnet", tmp_path / "pretrain_TalkSet.model")

    rng = np.random.default_rng(0)
    n = 40
    mfcc = rng.normal(0, 10, (4 * n + 3, 13))  # a partial trailing window is dropped
    faces = rng.integers(0, 256, (n, 112, 112), dtype=np.uint8)
    scores = asd_scores(detector, mfcc, faces, [1.0, 2.0])
    assert scores.shape == (n,) and np.isfinite(scores).all()


def test_score_depends_on_the_audio(model):
    mfcc, faces = inputs(25)
    changed = mfcc.clone()
    changed[:, 40:44] += 20.0  # the audio under frame 10 only
    with torch.no_grad():
        a, b = model(mfcc, faces), model(changed, faces)
    assert (a[0, 10] - b[0, 10]).abs() > 1e-4
    assert not torch.allclose(a, b)
