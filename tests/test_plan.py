"""`streamavatar plan`: the capacity planner's figures against torch's own counters on a small CPU model (a
shape other than the ones its coefficients were measured on), and its command line."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tasks.common.models import build_dit
from tasks.config import ConfigError, load_config
from tasks.planning import activation_bytes, audio_dim, forward_flops, shapes, stage_plans
from tasks.training.teacher import teacher_loss
from tests.conftest import REPO

SMALL = ["model.num_layers=2", "model.num_heads=3", "model.head_dim=32", "model.ffn_dim=384", "video.width=96",
         "video.height=64", "train.window_chunks=1", "tracking.enabled=false"]  # fmt: skip


def _teacher_step(cfg, amp: bool):
    """One sample's teacher loss (forward) -> (bytes autograd keeps, FLOPs of forward + backward, the model)."""
    s = shapes(cfg)
    torch.manual_seed(0)
    model = build_dit(cfg, audio_dim(cfg), pretrained=False, dtype=torch.float32)
    z, f = cfg.vae.z_dim, s.latent_frames
    h, w = cfg.video.height // cfg.vae.spatial_compression, cfg.video.width // cfg.vae.spatial_compression
    x0, noise = torch.randn(1, z, f, h, w), torch.randn(1, z, f, h, w)
    audio = torch.randn(1, f, s.audio_tokens, audio_dim(cfg))
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            return teacher_loss(model, x0, torch.full((1,), 0.5), noise, text, audio, audio)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the default (flash) attention kernel
        loss()
    # the math SDPA kernel: its matmuls are what FlopCounterMode counts (it has no formula for the CPU flash one)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        loss().backward()
    return sum(seen.values()), counter.get_total_flops(), model


@pytest.mark.parametrize("amp", [False, True])
def test_planner_matches_torchs_counters_on_a_small_model(amp):
    cfg = load_config([], SMALL, root=REPO)
    s = shapes(cfg)
    saved, flops, model = _teacher_step(cfg, amp)
    assert s.dit_params == sum(p.numel() for p in model.parameters())  # counted on the real class
    assert s.tokens == 4 * (64 // 8) * (96 // 8)  # 1 + 3 latent frames of (64/4/2) x (96/4/2) tokens
    predicted = activation_bytes(s, s.tokens, "bfloat16" if amp else "float32", checkpointing=False)
    assert predicted == pytest.approx(saved, rel=0.15), (predicted, saved)
    # the teacher stage's per-sample figure: forward + backward = 3 forwards
    assert 3 * forward_flops(s, s.tokens, s.tokens) == pytest.approx(flops, rel=0.15), flops


def test_plan_of_the_paper_profile_on_8_gpus_says_what_fits():
    cfg = load_config([str(REPO / "configs/paper.yaml")], ["model.pretrained_path=null"], root=REPO)
    s, plans = stage_plans(cfg, 8, 80.0, 0.35, 989.0)
    assert s.tokens == 31 * (704 // 32) * (928 // 32)  # 1 + 10 x 3 latent frames of 22 x 29 tokens
    by = {p.stage: p for p in plans}
    t = by["teacher"]
    assert t.per_gpu_batch == 4 and t.activations_gib_per_sample > 80  # a whole sample's activations never fit
    assert t.chosen is not None and t.chosen["activation_checkpointing"]  # ... checkpointed, they do
    assert t.step_seconds and t.step_seconds > 0
    # fewer GPUs shard the state thicker; the activations per sample do not change
    _, narrow = stage_plans(cfg, 4, 80.0, 0.35, 989.0)
    assert narrow[0].state_gib > 1.9 * t.state_gib - 1
    assert narrow[0].activations_gib_per_sample == t.activations_gib_per_sample
    # the weight average (train.ema_decay): 4 bytes per parameter of the trained DiT, sharded over the 8 GPUs
    cfg.train.ema_decay = 0.99
    _, averaged = stage_plans(cfg, 8, 80.0, 0.35, 989.0)
    for before, after in zip(plans, averaged, strict=True):
        assert after.state_gib - before.state_gib == pytest.approx(4 * s.dit_params / 8 / 2**30, rel=1e-9)
    cfg.train.ema_decay = 0.0
    with pytest.raises(ConfigError, match="teacher.batch_size 32 does not split evenly over 5 GPUs"):
        stage_plans(cfg, 5, 80.0, 0.35, 989.0)
    with pytest.raises(ConfigError, match="--gpus"):
        stage_plans(cfg, 0, 80.0, 0.35, 989.0)


def test_plan_command_prints_a_table_and_json():
    cmd = [sys.executable, "-m", "flows.cli", "plan", "--config", "configs/paper.yaml", "--gpus", "8",
           "--gpu-memory-gib", "80"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "teacher" in out.stdout and "micro" in out.stdout and "19778 tokens" in out.stdout
    js = subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    data = json.loads(js.stdout)
    assert [st["stage"] for st in data["stages"]] == ["teacher", "ode_init", "distill", "refine"]
    bad = subprocess.run(cmd[:-4] + ["--gpus", "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not split evenly over 3 GPUs" in bad.stderr


@pytest.mark.slow
def test_gpu_check_script_runs_its_commands_on_cpu(tmp_path):
    """scripts/gpu_check.sh at the demo's shapes on CPU (GPU_CHECK_ON_CPU=1): every command runs and writes its
    JSON (eager and compiled benchmark, the training step with its MFU, the LSVM cost, the plan); without the
    variable and without a GPU it refuses with a clear message."""
    import os

    env = {**os.environ, "STREAMAVATAR": str(REPO / ".venv/bin/streamavatar"), "PYTHON": sys.executable,
           "GPU_CHECK_ON_CPU": "1"}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1500)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    eager = json.loads((tmp_path / "benchmark_eager.json").read_text())
    compiled = json.loads((tmp_path / "benchmark_compiled.json").read_text())
    assert not eager["compiled"] and compiled["compiled"] and compiled["compile_backend"] == "aot_eager"
    assert eager["pipelined"]["rtf"] > 0 and compiled["pipelined"]["rtf"] > 0 and "paper_table5" in eager
    step = json.loads((tmp_path / "train_step.json").read_text())
    assert step["profile"]["activation_checkpointing"] and 0 < step["mfu"] < 1
    assert json.loads((tmp_path / "plan.json").read_text())["stages"][0]["stage"] == "teacher"
    lsvm = json.loads((tmp_path / "lsvm_cost.json").read_text())
    assert lsvm["chunks"] == 4 and lsvm["max_abs_latent_diff"] == 0.0 and lsvm["ratio_median"] > 0
    env.pop("GPU_CHECK_ON_CPU")
    env["CUDA_VISIBLE_DEVICES"] = ""
    refused = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "no CUDA GPU visible" in refused.stderr


@pytest.mark.slow
def test_train_step_bench_under_torchrun_with_fsdp2(tmp_path):
    """`bench --train-step` under torchrun with 2 gloo processes and train.parallel=fsdp: the model is really
    sharded (FSDP2's DTensor parameters), the first process writes one report, and the planner's per-process
    memory counts the sharded weights (half of the replicated run's) plus the gathered blocks."""
    import os

    def run(parallel: str, out) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flows.cli", "bench", "--train-step", *[x for kv in SMALL for x in ("--set", kv)],
               "--set", f"train.parallel={parallel}", "--set", "project.device=cpu", "--steps", "2",
               "--json", "--out", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert done.stdout.count('"processes": 2') == 1  # one report, from the first process
        return json.loads(out.read_text())

    fsdp, ddp = run("fsdp", tmp_path / "fsdp.json"), run("ddp", tmp_path / "ddp.json")
    assert fsdp["profile"]["parallel"] == "fsdp" and ddp["profile"]["parallel"] == "ddp"
    assert fsdp["profile"]["processes"] == ddp["profile"]["processes"] == 2
    assert 0 < fsdp["mfu"] < 1 and len(fsdp["step_s"]["all"]) == 2
    s = shapes(load_config([], SMALL))
    act = activation_bytes(s, s.tokens, "float32", False)
    assert ddp["memory"]["planner_gib"] * 2**30 == pytest.approx(8 * s.dit_params + act)
    assert fsdp["memory"]["planner_gib"] * 2**30 == pytest.approx(4 * s.dit_params + 8 * s.block_params + act)
