"""train.ema_decay: the trained network's exponential moving average is what a stage saves, and a resumed run
averages exactly what the uninterrupted one does."""

from __future__ import annotations

import shutil
from fractions import Fraction

import pytest
import torch
from torch import nn

from tasks.training.engine import EMA
from tests.training_data import make_project, tiny_config


def test_the_average_follows_the_warmed_up_decay():
    """Pinned by hand: a parameter at 0 that the optimiser moves to 1, 1, 3; decay 0.9, so the n-th update
    keeps min(0.9, (1 + n) / (10 + n)) of the average: 2/11, 3/12, 4/13."""
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    ema = EMA(net, 0.9)
    expected = Fraction(0)
    for value, keep in zip((1, 1, 3), (Fraction(2, 11), Fraction(3, 12), Fraction(4, 13)), strict=True):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        expected = keep * expected + (1 - keep) * value
        assert float(ema.avg["weight"]) == pytest.approx(float(expected), abs=1e-6)
    # ... and the decay itself once the warm-up has passed it: (1 + n) / (10 + n) >= 0.9 from n = 80
    ema.updates = 200
    assert ema.rate() == 0.9
    # the average becomes the model's weights, in the parameter's dtype
    net.double()
    ema.copy_to(net)
    assert net.weight.dtype == torch.float64 and float(net.weight.detach()) == pytest.approx(float(expected), abs=1e-6)


def test_ema_state_round_trips_and_refuses_another_model():
    net = nn.Linear(2, 2)
    ema = EMA(net, 0.99)
    for _ in range(3):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update(net)
    other = EMA(nn.Linear(2, 2), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(torch.equal(other.avg[k], ema.avg[k]) for k in ema.avg)
    with pytest.raises(KeyError, match="parameters differ"):
        EMA(nn.Linear(2, 2, bias=False), 0.99).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(net, 1.0)


def test_teacher_saves_the_average_and_resumes_it_exactly(tmp_path):
    """With ``train.ema_decay`` the teacher's final.pt is the average (not the last step's weights), its
    metrics give the last iterate's held-out loss beside the average's, and a run stopped at step 2 and resumed
    ends with the same average, bit for bit, as the uninterrupted run."""
    from tasks.training.teacher import run_teacher

    root = make_project(tmp_path / "p")
    cfg = tiny_config(root)
    cfg.train.ema_decay = 0.9
    run_teacher(cfg, root, progress=False)
    stage = root / "data/checkpoints/teacher"
    final = torch.load(stage / "final.pt", weights_only=True)["model"]
    last = torch.load(stage / "step_0000004.pt", weights_only=True)
    assert last["ema"]["updates"] == 4
    trained = [k for k in final if k in last["ema"]["avg"] and not torch.equal(last["model"][k], last["ema"]["avg"][k])]
    assert trained, "the average never left the last iterate"
    assert all(torch.equal(final[k], last["ema"]["avg"][k]) for k in trained)
    import json

    m = json.loads((root / "data/reports/teacher/metrics.json").read_text())
    assert m["val_fm_loss_last_iterate"] != m["val_fm_loss"]

    straight = {k: v.clone() for k, v in final.items()}
    shutil.rmtree(stage)
    cfg.teacher.iterations = 2
    run_teacher(cfg, root, progress=False)  # "interrupted" after step 2
    cfg.teacher.iterations = 4
    run_teacher(cfg, root, progress=False)  # resumes at step 2, average included
    resumed = torch.load(stage / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
