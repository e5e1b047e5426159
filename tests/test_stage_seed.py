"""Every stage starts Python's, NumPy's and torch's global generators from a seed of its own (tasks/runner.py
``seed_stage``), so a stage draws the same numbers on its own (`streamavatar refine`, `dvc repro`) as inside
`make demo`'s flow, whatever ran before it in the process."""

from __future__ import annotations

import random

import numpy as np
import torch

from tasks import runner
from tasks.common.stage import StageResult
from tasks.config import load_config
from tasks.registry import Stage


def test_a_stage_draws_the_same_numbers_whatever_ran_before(tmp_path, monkeypatch):
    drawn: list[tuple] = []

    def record(cfg, root):  # what a stage's unseeded draws see: new layers' weights, global numpy, random
        drawn.append((torch.nn.Linear(4, 4).weight.detach().clone(), np.random.rand(3), random.random()))
        return StageResult("refine", summary="recorded")

    monkeypatch.setitem(runner.STAGES, "refine", Stage("refine", record, "records its draws"))
    monkeypatch.setitem(runner.STAGES, "distill", Stage("distill", record, "records its draws"))
    cfg = load_config(sets=["tracking.enabled=false"], root=tmp_path)
    runner.run_stage("refine", cfg, tmp_path)
    torch.rand(1000), np.random.rand(77), random.random()  # another stage's draws in the same process
    runner.run_stage("refine", cfg, tmp_path)
    runner.run_stage("distill", cfg, tmp_path)
    (w1, n1, r1), (w2, n2, r2), (w3, n3, r3) = drawn
    assert torch.equal(w1, w2) and np.array_equal(n1, n2) and r1 == r2
    assert not torch.equal(w1, w3) and not np.array_equal(n1, n3) and r1 != r3  # each stage its own numbers
    other = load_config(sets=["tracking.enabled=false", "project.seed=1"], root=tmp_path)
    runner.run_stage("refine", other, tmp_path)
    assert not torch.equal(drawn[-1][0], w1)  # and the project's seed decides them


def test_a_stage_starts_with_the_threads_the_process_started_with(tmp_path, monkeypatch):
    """A stage that sets torch's thread count (evaluate sets 1) does not hand it to the next stage of the same
    process: the next one starts with the count of the process's first stage, as it would run alone."""
    seen: list[int] = []

    def single(cfg, root):
        seen.append(torch.get_num_threads())
        torch.set_num_threads(1)
        return StageResult("evaluate", summary="one thread")

    def record(cfg, root):
        seen.append(torch.get_num_threads())
        return StageResult("refine", summary="recorded")

    monkeypatch.setitem(runner.STAGES, "evaluate", Stage("evaluate", single, "sets one thread"))
    monkeypatch.setitem(runner.STAGES, "refine", Stage("refine", record, "records its threads"))
    monkeypatch.setattr(runner, "_START_THREADS", [])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config(sets=["tracking.enabled=false"], root=tmp_path)
        runner.run_stage("evaluate", cfg, tmp_path)
        assert torch.get_num_threads() == 1
        runner.run_stage("refine", cfg, tmp_path)
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2]


def test_every_stage_start_sets_torch_threads_even_when_the_count_is_unchanged(tmp_path, monkeypatch):
    """run_stage calls ``torch.set_num_threads`` at every stage start, with the process's first count, also
    when the count in use is the same: the call itself is what the voice detector's loader made mid-flow, so
    a stage is in the same state whether it runs alone or after such a call (tasks/runner.py reset_threads)."""
    calls: list[int] = []
    real = torch.set_num_threads

    def recording(n):
        calls.append(n)
        real(n)

    def record(cfg, root):
        return StageResult("refine", summary="recorded")

    monkeypatch.setitem(runner.STAGES, "refine", Stage("refine", record, "records nothing"))
    monkeypatch.setattr(runner, "_START_THREADS", [])
    monkeypatch.setattr(torch, "set_num_threads", recording)
    count = torch.get_num_threads()
    cfg = load_config(sets=["tracking.enabled=false"], root=tmp_path)
    runner.run_stage("refine", cfg, tmp_path)
    runner.run_stage("refine", cfg, tmp_path)
    assert calls == [count, count]
