"""The training stages on a tiny curated project: the losses that run, where gradients flow, exact resume,
and 2 processes (gloo) against 1 with the doubled batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from model.attention import CausalLayout
from model.dit import AudioDiT, DiTSpec
from model.rollout import student_rollout
from model.sampling import student_sigmas
from tests.conftest import REPO, tool_env
from tests.training_data import make_project, tiny_config


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Teacher, ODE pairs and distillation run once on the tiny project; tests copy it."""
    from tasks.training.distill import run_distill
    from tasks.training.ode_pairs import run_ode_pairs
    from tasks.training.teacher import run_teacher

    root = make_project(tmp_path_factory.mktemp("train") / "p")
    cfg = tiny_config(root)
    run_teacher(cfg, root, progress=False)
    run_ode_pairs(cfg, root, progress=False)
    run_distill(cfg, root, progress=False)
    return root


def history(root, stage):
    path = root / "data/checkpoints" / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def copy_project(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- the stages
def test_teacher_windows_and_loss(project):
    import pandas as pd

    index = pd.read_parquet(project / "data/latents/index.parquet")
    # 2 s = 50 frames -> 2 windows of 25 per clip; the unselected clip is the validation clip
    assert sorted(index.groupby("split").size().items()) == [("train", 4), ("val", 2)]
    assert set(index[index.split == "val"].clip_id) == {"va_a"}
    packed = torch.load(project / "data/latents/tr_a.pt", weights_only=True)
    assert packed["latents"].shape == (2, 16, 7, 16, 16)  # 64x64 frames, 4x spatial compression
    # slot 0 (the reference) is silent; talk and listen never overlap (the mask splits the features)
    assert packed["talk"][:, 0].abs().sum() == 0 and packed["listen"][:, 0].abs().sum() == 0
    assert ((packed["talk"] != 0) & (packed["listen"] != 0)).sum() == 0
    rows = history(project, "teacher")
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["loss"] > 0 for r in rows)
    final = torch.load(project / "data/checkpoints/teacher/final.pt", weights_only=False)
    assert final["step"] == 4 and "blocks.0.audio_attn.to_q.weight" in final["model"]


def test_ode_pairs_keep_the_student_levels(project):
    from tasks.training.ode_pairs import load_pairs

    index, states, x0, sigmas = load_pairs(tiny_config(project), project, "train")
    assert sigmas == pytest.approx(student_sigmas(3, 5.0))
    assert states.shape == (4, 3, 16, 6, 16, 16) and x0.shape == (4, 16, 6, 16, 16)
    assert not torch.equal(states[:, 0], x0)  # sigma 1 is pure noise, x0 the ODE's end


def test_ode_pairs_resume_skips_done_pairs(project, tmp_path):
    from tasks.training.ode_pairs import run_ode_pairs

    root = copy_project(project, tmp_path / "p")
    result = run_ode_pairs(tiny_config(root), root, progress=False)
    assert result.metrics["pairs_made_now"] == 0 and result.metrics["pairs_train"] == 4


def test_stochastic_and_ode_pairs_replace_each_other_and_start_from_the_same_noise(project, tmp_path):
    """ode_pairs.eta (0: the ODE, the tiny projects' and the paper's; 1: the teacher's stochastic sampler, the
    demo's): pairs made one way are replaced,
    not mixed, when made the other; sigma 1 is the same seeded noise; the later states and x0 differ; and
    distill's resume fingerprint sees the difference (the index alone is the same: same windows, same shards)."""
    from tasks.training.ode_pairs import load_pairs, pairs_digest, run_ode_pairs

    root = copy_project(project, tmp_path / "p")
    cfg = tiny_config(root)
    assert cfg.ode_pairs.eta == 0.0
    _, ode_states, ode_x0, _ = load_pairs(cfg, root, "train")
    digest = pairs_digest(cfg, root)
    cfg.ode_pairs.eta = 1.0
    result = run_ode_pairs(cfg, root, progress=False)
    assert result.metrics["pairs_made_now"] == 4 + 1  # every train and val pair made again
    assert "stochastic (eta 1.0)" in result.summary
    _, states, x0, sigmas = load_pairs(cfg, root, "train")
    assert sigmas == pytest.approx(student_sigmas(3, 5.0))
    torch.testing.assert_close(states[:, 0], ode_states[:, 0], rtol=0, atol=0)
    assert not torch.allclose(states[:, 1:], ode_states[:, 1:], atol=1e-3)
    assert not torch.allclose(x0, ode_x0, atol=1e-3)
    assert pairs_digest(cfg, root) != digest


def test_the_generator_loss_that_runs_is_sid(project, tmp_path, monkeypatch):
    """Record what the SiD step feeds its loss and check the value against the formula in float64, and that
    f_real is the frozen teacher's guided x0 and f_fake the fake score's (swapping them must fail)."""
    import tasks.training.distill as distill

    calls, scores = [], []
    real, real_x0 = distill.sid_generator_loss, distill.teacher_x0
    teacher_sd = torch.load(project / "data/checkpoints/teacher/final.pt", weights_only=False)["model"]

    def spy_x0(model, context, x_t, sigma, talk, listen, guidance):
        out = real_x0(model, context, x_t, sigma, talk, listen, guidance)
        is_teacher = not model.training and all(torch.equal(v, teacher_sd[k]) for k, v in model.state_dict().items())
        scores.append((is_teacher, guidance, out.detach().clone()))
        return out

    def spy(x, f_real, f_fake, alpha, mask=None):
        out = real(x, f_real, f_fake, alpha, mask=mask)
        calls.append((x.detach().clone(), f_real.detach().clone(), f_fake.detach().clone(), alpha, out.item(),
                      scores[-2:]))  # fmt: skip
        return out

    monkeypatch.setattr(distill, "sid_generator_loss", spy)
    monkeypatch.setattr(distill, "teacher_x0", spy_x0)
    root = copy_project(project, tmp_path / "p")
    shutil.rmtree(root / "data/checkpoints/distill")
    cfg = tiny_config(root)
    cfg.distill.sid_alpha = 1.2
    cfg.distill.real_guidance = 3.0
    distill.run_distill(cfg, root, progress=False)
    assert len(calls) == cfg.distill.iterations
    saw_nonzero = False
    for x, fr, ff, alpha, value, (first, second) in calls:
        assert alpha == 1.2
        # which score is which: the real one comes from the frozen teacher with the configured guidance
        (t_is_teacher, t_guidance, t_out), (f_is_teacher, f_guidance, f_out) = first, second
        assert t_is_teacher and t_guidance == 3.0 and torch.equal(fr, t_out)
        assert not f_is_teacher and f_guidance == 1.0 and torch.equal(ff, f_out)
        x, fr, ff = x[:, :, 1:].double(), fr[:, :, 1:].double(), ff[:, :, 1:].double()  # the reference is excluded
        per = ((fr - ff) * ((fr - x) - alpha * (fr - ff))).flatten(1).mean(1)
        w = (x - fr).abs().flatten(1).mean(1).clamp(min=1e-5)
        assert value == pytest.approx(float((per / w).mean()), rel=1e-9, abs=1e-15)
        dmd = (0.5 * ((x - (x - (ff - fr) / w.view(-1, 1, 1, 1, 1))) ** 2)).mean()  # what DMD would give
        saw_nonzero |= abs(value) > 0 and abs(value - float(dmd)) > 1e-9
    assert saw_nonzero  # the guided real score differs from the fake one: SiD and DMD values differ


def test_distill_improves_the_match_to_the_teacher(project):
    metrics = json.loads((project / "data/reports/distill/metrics.json").read_text())
    for key in ("ode_match_mse_before", "ode_match_mse_after", "ode_match_fd_before", "ode_match_fd_after",
                "sid_fd_teacher_before", "sid_fd_teacher_after", "sid_last_sid_loss", "sid_last_fake_loss"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    # ODE init, on held-out pairs: the objective and the student's own samples from the same noise improve
    assert metrics["ode_x0_mse_after"] < 0.9 * metrics["ode_x0_mse_before"], metrics
    assert metrics["ode_match_mse_after"] < metrics["ode_match_mse_before"], metrics
    # SiD starts from the ODE-initialised student and has a gradient from its first step (guided real score)
    assert metrics["sid_fd_teacher_before"] == metrics["ode_match_fd_after"]
    assert metrics["sid_grad_norm_first"] > 1e-4 and metrics["sid_score_gap_first"] > 0, metrics
    final = torch.load(project / "data/checkpoints/distill/final.pt", weights_only=False)
    teacher = torch.load(project / "data/checkpoints/teacher/final.pt", weights_only=False)
    assert any(not torch.equal(final["model"][k], teacher["model"][k]) for k in final["model"])


# ------------------------------------------------------------------------------------------- exact resume
def test_teacher_resume_equals_uninterrupted(project, tmp_path):
    from tasks.training.teacher import run_teacher

    root = copy_project(project, tmp_path / "p")
    shutil.rmtree(root / "data/checkpoints/teacher")
    cfg = tiny_config(root)
    cfg.teacher.iterations = 2
    run_teacher(cfg, root, progress=False)  # "interrupted" after step 2 (its checkpoint)
    cfg.teacher.iterations = 4
    run_teacher(cfg, root, progress=False)  # resumes at step 2
    resumed = {r["step"]: r["loss"] for r in history(root, "teacher")}
    straight = {r["step"]: r["loss"] for r in history(project, "teacher")}
    assert sorted(resumed) == [0, 1, 2, 3]
    assert [resumed[s] for s in (2, 3)] == [straight[s] for s in (2, 3)]  # bit-identical


def test_sid_resume_equals_uninterrupted(project, tmp_path):
    from tasks.training.distill import run_distill

    root = copy_project(project, tmp_path / "p")
    shutil.rmtree(root / "data/checkpoints/distill/sid")
    cfg = tiny_config(root)
    cfg.distill.iterations = 2
    run_distill(cfg, root, progress=False)
    cfg.distill.iterations = 4
    run_distill(cfg, root, progress=False)
    resumed = {r["step"]: (r["sid_loss"], r["fake_loss"]) for r in history(root, "distill/sid")}
    straight = {r["step"]: (r["sid_loss"], r["fake_loss"]) for r in history(project, "distill/sid")}
    assert [resumed[s] for s in (2, 3)] == [straight[s] for s in (2, 3)]


def test_changed_settings_start_over(project, tmp_path):
    from tasks.training.teacher import run_teacher

    root = copy_project(project, tmp_path / "p")
    cfg = tiny_config(root)
    cfg.teacher.lr = 3e-4  # not a longer run of the same thing: the old checkpoints are not resumed
    run_teacher(cfg, root, progress=False)
    rows = history(root, "teacher")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["loss"] != history(project, "teacher")[1]["loss"]


def test_refine_trains_both_players_and_reports_against_its_baseline(project, tmp_path):
    from tasks.training.refine import run_refine

    root = copy_project(project, tmp_path / "p")
    cfg = tiny_config(root)
    result = run_refine(cfg, root, progress=False)
    rows = history(root, "refine")
    assert len(rows) == 2
    for r in rows:
        assert all(v == v and abs(v) < 1e6 for v in r.values())
    assert {"g_loss", "d_loss", "r1", "r2", "penalty_share"} <= set(rows[0])
    m = json.loads((root / "data/reports/refine/metrics.json").read_text())
    assert m == result.metrics and m["steps"] == 2
    # held-out before / after, measured on the same windows and noise
    for key in ("fd_real_before", "fd_real_after", "mse_real_before", "mse_real_after"):
        assert m[key] == m[key] and m[key] >= 0
    assert m["fd_real_before"] != m["fd_real_after"]
    # R1/R2 are measured and their share of D's loss is what it says (how large it grows once D separates real
    # from generated: tests/test_training_overfit.py; a fresh D is flat, so two steps give ~0 here)
    for r in rows:
        assert r["r1"] > 0 and r["r2"] > 0
        pen = cfg.refine.r1_weight * r["r1"] + cfg.refine.r2_weight * r["r2"]
        assert r["penalty_share"] == pytest.approx(pen / (r["d_loss"] + pen), rel=1e-4)
    assert m["penalty_share_mean"] == pytest.approx(sum(r["penalty_share"] for r in rows) / 2)
    # both players moved: the student off the distilled one, the discriminator off its initialisation
    final = torch.load(root / "data/checkpoints/refine/final.pt", weights_only=False)["model"]
    distilled = torch.load(root / "data/checkpoints/distill/final.pt", weights_only=False)["model"]
    assert any(not torch.equal(final[k], distilled[k]) for k in final)
    step = torch.load(sorted((root / "data/checkpoints/refine").glob("step_*.pt"))[-1], weights_only=False)
    teacher = torch.load(root / "data/checkpoints/teacher/final.pt", weights_only=False)["model"]
    disc = step["discriminator"]
    assert any(not torch.equal(disc[f"backbone.{k}"], teacher[k]) for k in teacher if f"backbone.{k}" in disc)
    assert (root / "data/checkpoints/refine/final.pt").is_file()


# ------------------------------------------------------------------------------ student forcing gradients
def tiny_dit() -> AudioDiT:
    torch.manual_seed(0)
    return AudioDiT(DiTSpec(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8,
                            ffn_dim=32, num_layers=2, audio_dim=6))  # fmt: skip


def test_gradient_reaches_the_student_only_through_the_exit_steps():
    dit = tiny_dit()
    layout = CausalLayout(chunk_frames=2, sink_frames=3, window_frames=2, rapr=True, max_distance=4)
    sigmas = student_sigmas(3, 5.0)
    g = torch.Generator().manual_seed(1)
    b, frames = 2, 6
    ref = torch.randn(b, 4, 1, 4, 4, generator=g)
    noise = torch.randn(b, 4, frames, 4, 4, generator=g)
    renoise = torch.randn(2, b, 4, frames, 4, 4, generator=g)
    talk = torch.randn(b, 1 + frames, 5, 6, generator=g)
    listen = torch.randn(b, 1 + frames, 5, 6, generator=g)
    ctx = dit.prepare_text(torch.randn(b, 3, 8, generator=g))
    exits = [2, 0, 1]
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({"grad": torch.is_grad_enabled(), "input_has_graph": args[0].grad_fn is not None,
                      "frame_start": kwargs["frame_start"], "out_grad": output.requires_grad})  # fmt: skip

    handle = dit.register_forward_hook(hook, with_kwargs=True)
    out = student_rollout(dit, ref, ctx, talk, listen, layout, sigmas, noise, renoise, exits, "noisy")
    handle.remove()
    # the reference pass, then 3 steps per chunk; exactly the exit step of each chunk records a graph
    graph_steps = [(c["frame_start"], i) for i, c in enumerate(calls) if c["out_grad"]]
    assert len(calls) == 1 + 3 * 3
    assert graph_steps == [(1, 1 + 2), (3, 4 + 0), (5, 7 + 1)]
    assert not any(c["input_has_graph"] for c in calls)  # every step starts from a detached state
    # the cache holds no graph, and the output is the exit steps' x0 (same values as a no-grad rollout)
    ctx_ng = dit.prepare_text(torch.randn(b, 3, 8, generator=torch.Generator().manual_seed(9)))
    del ctx_ng
    with torch.no_grad():
        again = student_rollout(dit, ref, ctx, talk, listen, layout, sigmas, noise, renoise, exits, "noisy",
                                grad=False)  # fmt: skip
    assert torch.allclose(out.detach(), again, atol=1e-6)
    out[:, :, 1:].pow(2).mean().backward()
    grads = [p.grad for p in dit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    # a chunk's output depends (through the graph) only on its own exit step: the gradient of a later chunk's
    # output w.r.t. an earlier chunk's audio (a leaf INPUT of the rollout, which reaches the later chunk only
    # through the cache that chunk's last step wrote with autograd on) is exactly zero, because cache writes
    # are detached; the earlier chunk's own output does depend on it (the check is not vacuous)
    dit.zero_grad()
    with torch.no_grad():  # audio attention starts with a zero output projection: give the audio a way in
        for block in dit.blocks:
            block.audio_attn.to_out.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    talk_leaf = talk.clone().requires_grad_(True)
    out2 = student_rollout(dit, ref, ctx, talk_leaf, listen, layout, sigmas, noise, renoise, [2, 2, 2], "noisy")
    (own,) = torch.autograd.grad(out2[:, :, 1:3].pow(2).sum(), talk_leaf, retain_graph=True)
    assert own[:, 1:3].abs().sum() > 0
    (later,) = torch.autograd.grad(out2[:, :, 3:7].pow(2).sum(), talk_leaf)
    assert later[:, 3:7].abs().sum() > 0 and later[:, :3].abs().sum() == 0


def test_exit_step_choice_changes_the_output():
    dit = tiny_dit()
    layout = CausalLayout(chunk_frames=2, sink_frames=3, window_frames=2)
    g = torch.Generator().manual_seed(2)
    args = dict(reference=torch.randn(1, 4, 1, 4, 4, generator=g), context=dit.prepare_text(torch.randn(1, 3, 8)),
                audio_talk=None, audio_listen=None, layout=layout, sigmas=student_sigmas(3, 5.0),
                noise=torch.randn(1, 4, 4, 4, 4, generator=g), renoise=torch.randn(2, 1, 4, 4, 4, 4, generator=g))  # fmt: skip
    with torch.no_grad():
        last = student_rollout(dit, exit_steps=[2, 2], grad=False, **args)
        early = student_rollout(dit, exit_steps=[0, 2], grad=False, **args)
    assert torch.equal(last[:, :, 3:], early[:, :, 3:])  # the cache (context) is what inference writes either way
    assert not torch.allclose(last[:, :, 1:3], early[:, :, 1:3])  # the first chunk's output is its exit step's x0


# --------------------------------------------------------------------------- 2 processes vs 1, torchrun
TINY_SETS = ["tracking.enabled=false", "vae.pretrained_path=null", "teacher.init_from=null", "model.num_layers=2",
             "model.num_heads=2", "model.head_dim=16", "model.ffn_dim=128", "train.window_chunks=2",
             "train.checkpoint_every=2", "train.val_windows=1", "train.sample_video=false", "teacher.iterations=4",
             "ode_pairs.steps=6", "ode_pairs.eta=0.0", "teacher_sampler.steps=6", "ode_init.iterations=4",
             "ode_init.lr=1e-3", "distill.iterations=4", "refine.iterations=2",
             "refine.qformer_dim=16"]  # tiny_config (tests/training_data.py) as --set  # fmt: skip


@pytest.mark.slow
def test_sigterm_stops_a_training_stage_and_the_next_run_resumes(project, tmp_path):
    """SIGTERM to `streamavatar teacher` mid-run: it exits within seconds (143), the step checkpoints it wrote
    stay, and the next run resumes from the newest one instead of starting over."""
    import signal

    root = copy_project(project, tmp_path / "p")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.rmtree(root / "data/checkpoints/teacher")
    sets = [x for kv in TINY_SETS + ["teacher.iterations=400"] for x in ("--set", kv)]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "teacher", *sets], cwd=root, env=tool_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    stage = root / "data/checkpoints/teacher"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(stage.glob("step_*.pt"))) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("teacher still running 15 s after SIGTERM")
    assert proc.returncode == 143 and "finished work is kept" in err, err[-2000:]
    assert not (stage / "final.pt").exists()
    newest = max(int(p.stem.split("_")[1]) for p in stage.glob("step_*.pt"))
    assert 2 <= newest < 400
    cfg = tiny_config(root)
    cfg.teacher.iterations = newest + 2
    from tasks.training.teacher import run_teacher

    run_teacher(cfg, root, progress=False)  # resumes: only the last 2 steps are computed again
    steps = [r["step"] for r in history(root, "teacher")]
    assert steps[-2:] == [newest, newest + 1] and (stage / "final.pt").exists()


@pytest.mark.slow
def test_fsdp_distill_and_refine_match_one_process(project, tmp_path):
    """The distill stage (ODE init, then SiD with the student and the fake score sharded: streaming rollouts with
    a KV cache through FSDP2's gathered blocks) and the refine stage (GAN: the student sharded, the
    discriminator replicated) under FSDP2 with 2 gloo processes, micro batches of 1, end where one process
    ends (tiny_config, the same global batches)."""
    from tasks.training.refine import run_refine

    root = copy_project(project, tmp_path / "p")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    env = tool_env(root)
    env["OMP_NUM_THREADS"] = "1"
    shutil.copytree(root / "data/checkpoints/teacher", root / "data/ck_two/teacher")
    sets = [x for kv in TINY_SETS + ["train.checkpoint_dir=data/ck_two", "train.parallel=fsdp",
                                     "train.micro_batch_size=1"] for x in ("--set", kv)]  # fmt: skip
    for stage in ("distill", "refine"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flows.cli", stage, *sets]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_refine(tiny_config(root), root, progress=False)  # one process, the fixture's distilled student

    def flat(folder: str, what: str) -> torch.Tensor:
        sd = torch.load(root / folder / what, weights_only=False)["model"]
        return torch.cat([v.flatten().float() for v in sd.values()])

    # each stage's update (its weights minus those it started from), 2 processes against 1: measured relative
    # errors 1.8e-5 (ODE init), 1.2e-4 (SiD, which moves the weights by 1.7e-3 in all), 3.5e-4 (GAN)
    before = {f: flat(f, "teacher/final.pt") for f in ("data/checkpoints", "data/ck_two")}
    for what in ("distill/ode_init.pt", "distill/final.pt", "refine/final.pt"):
        after = {f: flat(f, what) for f in before}
        one, two = (after[f] - before[f] for f in before)
        assert one.norm() > 0 and (two - one).norm() / one.norm() < 2e-3, (what, ((two - one).norm() / one.norm()))
        before = after


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_exactly(project, tmp_path):
    """train.sharded_checkpoints under FSDP2 (2 gloo processes): each process writes its own shards of the step
    checkpoint (torch.distributed.checkpoint, step_<n>.dcp/) and step_<n>.pt holds only references; a run
    stopped after step 2 and resumed from the shards computes what the uninterrupted run computes, the weight
    average (train.ema_decay, its shards saved beside the model's) included: final.pt is that average."""
    root = copy_project(project, tmp_path / "p")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    env = tool_env(root)
    env["OMP_NUM_THREADS"] = "1"

    def launch(iterations: int, ckdir: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flows.cli", "teacher", "--set", "tracking.enabled=false", "--set", "vae.pretrained_path=null",
               "--set", "teacher.init_from=null", "--set", "model.num_layers=2", "--set", "model.num_heads=2",
               "--set", "model.head_dim=16", "--set", "model.ffn_dim=128", "--set", "train.window_chunks=2",
               "--set", "train.val_windows=1", "--set", "train.sample_video=false",
               "--set", f"teacher.iterations={iterations}", "--set", "teacher.batch_size=4",
               "--set", "train.checkpoint_every=2", "--set", f"train.checkpoint_dir={ckdir}",
               "--set", "train.parallel=fsdp", "--set", "train.sharded_checkpoints=true",
               "--set", "train.ema_decay=0.9"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    launch(4, "data/ck_straight")
    launch(2, "data/ck_resumed")  # "interrupted" after step 2
    stage = root / "data/ck_resumed/teacher"
    shards = sorted(p.name for p in (stage / "step_0000002.dcp").iterdir())
    assert sum(name.endswith(".distcp") for name in shards) == 2, shards  # one file per process
    ref = torch.load(stage / "step_0000002.pt", weights_only=False)
    assert ref["model"]["__dcp__"] == "step_0000002.dcp" and not any(isinstance(v, torch.Tensor) for v in ref.values())
    assert ref["ema"] == {"__dcp__": "step_0000002.dcp", "key": "ema", "updates": 2}  # the average's shards too
    launch(4, "data/ck_resumed")  # resumes from the shards at step 2
    losses = {}
    for name in ("straight", "resumed"):
        rows = [json.loads(x) for x in (root / f"data/ck_{name}/teacher/metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["loss"] for r in rows}
    assert [losses["resumed"][s] for s in (2, 3)] == [losses["straight"][s] for s in (2, 3)]
    a = torch.load(root / "data/ck_straight/teacher/final.pt", weights_only=False)["model"]
    b = torch.load(stage / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in stage.glob("step_*")) == ["step_0000002.dcp", "step_0000002.pt",
                                                            "step_0000004.dcp", "step_0000004.pt"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "dtype"), [("ddp", "float32"), ("fsdp", "float32"), ("fsdp", "bfloat16")])
def test_two_gloo_processes_with_micro_batches_match_one_process(project, tmp_path, parallel, dtype):
    """Data parallel (an explicit all-reduce) and FSDP2 (fully_shard per block, on CPU with gloo: the
    optimiser built over the sharded parameters, text K/V computed inside each block's forward, gradients
    reduced once, after the last micro batch) both compute what one process computes on the same global batch:
    teacher.batch_size 4 is 2 per process, each run as 2 micro batches of 1 (train.micro_batch_size).
    bfloat16: FSDP2's MixedPrecisionPolicy (blocks gathered in bf16, gradients reduced in fp32) against one
    process's bf16 autocast, both over float32 master weights: the same losses and update direction (not
    bit-exact: the two round different intermediates), and the checkpoint's weights are float32."""
    root = copy_project(project, tmp_path / "p")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    common = ["--set", "tracking.enabled=false", "--set", "vae.pretrained_path=null", "--set", "teacher.init_from=null",
              "--set", "model.num_layers=2", "--set", "model.num_heads=2", "--set", "model.head_dim=16",
              "--set", "model.ffn_dim=128",  # the tiny project's teacher sizes (tests/training_data.py)
              "--set", "train.window_chunks=2", "--set", "train.val_windows=1",
              "--set", "train.sample_video=false", "--set", "teacher.iterations=3",
              "--set", "train.checkpoint_every=3", "--set", f"project.dtype={dtype}"]  # fmt: skip
    if (parallel, dtype) == ("fsdp", "float32"):  # the weight average too: each rank averages its own shards
        common += ["--set", "train.ema_decay=0.9"]
    env = tool_env(root)
    env["OMP_NUM_THREADS"] = "1"

    def launch(nproc: int, batch: int, ckdir: str, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "flows.cli", "teacher", *common, "--set", f"teacher.batch_size={batch}",
               "--set", f"train.checkpoint_dir={ckdir}", "--set", f"train.parallel={parallel}",
               "--set", "train.micro_batch_size=1"]  # fmt: skip
        if nproc == 1:
            cmd = [sys.executable, "-m", "flows.cli", "teacher", *common, "--set", f"teacher.batch_size={batch}",
                   "--set", f"train.checkpoint_dir={ckdir}", *extra]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return torch.load(root / ckdir / "teacher/final.pt", weights_only=False)

    two = launch(2, 4, "data/ck_two")
    one = launch(1, 4, "data/ck_one")
    start = torch.load(root / "data/checkpoints/teacher/final.pt", weights_only=False)  # another run: differs
    assert any(not torch.allclose(start["model"][k], one["model"][k]) for k in one["model"])
    loss_two = [json.loads(x)["loss"] for x in (root / "data/ck_two/teacher/metrics.jsonl").read_text().splitlines()]
    loss_one = [json.loads(x)["loss"] for x in (root / "data/ck_one/teacher/metrics.jsonl").read_text().splitlines()]
    if dtype == "float32":
        diffs = {k: (two["model"][k] - one["model"][k]).abs().max().item() for k in one["model"]}
        assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
        assert loss_two == pytest.approx(loss_one, rel=1e-5)
    else:
        assert all(v.dtype == torch.float32 for v in two["model"].values())  # the master weights
        assert loss_two == pytest.approx(loss_one, rel=2e-2)
        init = launch(1, 4, "data/ck_init", "--set", "teacher.lr=1e-30")["model"]  # the initial weights (updates lost)
        d_one = torch.cat([(one["model"][k] - init[k]).flatten() for k in init])
        d_two = torch.cat([(two["model"][k] - init[k]).flatten() for k in init])
        assert torch.nn.functional.cosine_similarity(d_one, d_two, dim=0) > 0.95
    # the step checkpoint holds the whole optimiser state (gathered from the shards under FSDP2)
    step = torch.load(root / "data/ck_two/teacher/step_0000003.pt", weights_only=False)
    assert step["optimizer"]["state"], "no optimiser state saved"
    if "train.ema_decay=0.9" in common:  # final.pt is the average, gathered whole from the shards
        assert step["ema"]["updates"] == 3
        assert all(torch.equal(two["model"][k], step["ema"]["avg"][k]) for k in step["ema"]["avg"])
        assert any(not torch.equal(step["model"][k], step["ema"]["avg"][k]) for k in step["ema"]["avg"])


def test_long_memory_trains_in_distill_when_training_windows_evict_frames(tmp_path):
    """[10] LSVM (model.memory_slots) trained in the distill stage: with 3-chunk windows (sink 1, window 3 frames,
    chunks of 3: the last chunk sees 3 evicted frames) ODE init moves the memory's zero-start gates and its
    pooling queries, and SiD's rollouts move them further; windows too short to evict are refused at load time
    (measured: with 2-chunk windows the gates stay exactly 0)."""
    from tasks.config import ConfigError, load_config
    from tasks.training.distill import run_distill
    from tasks.training.ode_pairs import run_ode_pairs
    from tasks.training.teacher import run_teacher

    root = make_project(tmp_path / "p")
    cfg = tiny_config(root)
    cfg.model.memory_slots, cfg.train.window_chunks = 4, 3
    run_teacher(cfg, root, progress=False)
    run_ode_pairs(cfg, root, progress=False)
    run_distill(cfg, root, progress=False)

    def memory(name: str) -> dict[str, torch.Tensor]:
        blob = torch.load(root / "data/checkpoints" / name, weights_only=True)
        return {k: v.float() for k, v in blob.get("model", blob).items() if ".long_memory." in k}

    start, ode, final = memory("teacher/final.pt"), memory("distill/ode_init.pt"), memory("distill/final.pt")
    gates = [k for k in start if k.endswith(".gate")]
    queries = [k for k in start if k.endswith(".queries")]
    assert len(gates) == len(queries) == cfg.model.num_layers
    assert all(start[k].abs().sum() == 0 for k in gates)  # the teacher never uses it: the zero start
    assert all(ode[k].abs().min() > 0 for k in gates)  # ODE init (block-causal forward over evicted frames)
    assert all(not torch.equal(ode[k], start[k]) for k in queries)
    assert any(not torch.equal(final[k], ode[k]) for k in gates)  # SiD (streaming rollouts through the cache)
    with pytest.raises(ConfigError, match=r"train.window_chunks >= 3"):
        load_config([], ["model.memory_slots=4", "train.window_chunks=2"], root=REPO)


def test_a_students_memory_may_differ_from_its_teachers_closed_one(tmp_path):
    """The distill stage builds its student from the teacher's state (dit_from_state): a teacher's memory is
    never trained (bidirectional: nothing evicted, its gates at 0), so a student with another memory (slots,
    kind, read: the spatial joint LSVM) starts from every other teacher weight and its own memory init; a
    state whose memory was trained is refused with the setting named; memory_param_groups puts the memory at
    lr * train.memory_lr_scale."""
    from tasks.common.models import build_audio, build_dit
    from tasks.config import ConfigError
    from tasks.training.common import dit_from_state, memory_param_groups

    root = make_project(tmp_path / "p")
    cfg = tiny_config(root)
    cfg.model.memory_slots, cfg.train.window_chunks = 4, 3
    audio = build_audio(cfg)
    teacher = build_dit(cfg, audio.token_dim, pretrained=False)
    cfg.model.memory_slots, cfg.model.memory_kind, cfg.model.memory_read = 1, "spatial", "joint"
    own = build_dit(cfg, audio.token_dim, pretrained=False).state_dict()
    student = dit_from_state(cfg, audio, teacher.state_dict(), torch.device("cpu"))
    for k, v in student.state_dict().items():
        assert torch.equal(v, own[k] if ".long_memory." in k else teacher.state_dict()[k]), k
    trained = {k: (v + 0.1 if k.endswith(".long_memory.gate") else v) for k, v in teacher.state_dict().items()}
    with pytest.raises(ConfigError, match="memory_slots"):
        dit_from_state(cfg, audio, trained, torch.device("cpu"))
    groups = memory_param_groups(student, 1e-4, 10.0)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    assert len(groups[1]["params"]) == 2 * cfg.model.num_layers  # each layer's queries and gate


def test_step_metrics_need_no_mlflow_where_no_run_is_active(tmp_path):
    """A training loop on a machine without MLflow (a bare GPU box, tracking.enabled=false) logs its steps to the
    JSON-lines file; MLflow is used only where a run is active, i.e. already imported. With a run active, the
    same call reaches MLflow."""
    code = (
        "import sys, json; sys.modules['mlflow'] = None\n"  # importing mlflow now raises ImportError
        "from pathlib import Path\n"
        "from tasks.training.engine import Metrics\n"
        f"m = Metrics(Path({str(tmp_path / 'm.jsonl')!r}), 'stage', 1, True, fresh=True)\n"
        "m.log(0, {'loss': 1.5}); m.log(1, {'loss': 1.25})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=tool_env(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "loss": 1.5}, {"step": 1, "loss": 1.25}]
    import mlflow

    from tasks.training.engine import Metrics

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'ml.db'}")
    try:  # its own store and experiment, whatever another test left active
        exp = mlflow.create_experiment("step-metrics", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=exp) as run:
            Metrics(None, "stage", 1, True).log(3, {"loss": 0.5})
        got = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "stage/loss")
    finally:
        mlflow.set_tracking_uri(before)
    assert [(h.step, h.value) for h in got] == [(3, 0.5)]
