"""The stages the project has, in pipeline order. Adding a stage: its function module in tasks/, one line here
(which gives it a CLI command), one flow in flows/, one stage in dvc.yaml."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.common.stage import StageResult
from tasks.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageResult]  # (cfg, root, **options) -> StageResult
    help: str


def _corpus(cfg: Config, root: Path) -> StageResult:
    from tasks.corpus.build import run_corpus

    return run_corpus(cfg, root)


def _curate(cfg: Config, root: Path, **options) -> StageResult:
    from tasks.curation.build import run_curate

    return run_curate(cfg, root, **options)


def _vae(cfg: Config, root: Path) -> StageResult:
    from tasks.training.vae import run_vae

    return run_vae(cfg, root)


def _teacher(cfg: Config, root: Path) -> StageResult:
    from tasks.training.teacher import run_teacher

    return run_teacher(cfg, root)


def _ode_pairs(cfg: Config, root: Path) -> StageResult:
    from tasks.training.ode_pairs import run_ode_pairs

    return run_ode_pairs(cfg, root)


def _distill(cfg: Config, root: Path) -> StageResult:
    from tasks.training.distill import run_distill

    return run_distill(cfg, root)


def _refine(cfg: Config, root: Path) -> StageResult:
    from tasks.training.refine import run_refine

    return run_refine(cfg, root)


def _benchmark(cfg: Config, root: Path) -> StageResult:
    from tasks.evaluation.benchmark import run_benchmark_stage

    return run_benchmark_stage(cfg, root)


def _evaluate(cfg: Config, root: Path) -> StageResult:
    from tasks.evaluation.evaluate import run_evaluate

    return run_evaluate(cfg, root)


STAGES: dict[str, Stage] = {
    "corpus": Stage("corpus", _corpus, "generate the demo corpus of two-person conversations (SpeakerVid layout)"),
    "curate": Stage("curate", _curate, "active-speaker masks, pose/quality filters, listen-ratio balancing -> "
                    "data/manifests/curated.parquet"),
    "vae": Stage("vae", _vae, "train the demo's causal streaming autoencoder on the curated clips (from the "
                 "committed pretrained weights); held-out PSNR/SSIM vs bicubic; skipped for Wan VAEs"),
    "teacher": Stage("teacher", _teacher, "encode training windows; fine-tune the bidirectional teacher "
                     "(flow matching, masked talk/listen audio, audio dropout for CFG)"),
    "ode_pairs": Stage("ode_pairs", _ode_pairs, "teacher ODE trajectories kept at the student's noise levels"),
    "distill": Stage("distill", _distill, "ODE initialisation of the causal student, then SiD with student forcing"),
    "refine": Stage("refine", _refine, "adversarial refinement on real clips with the consistency-aware "
                    "discriminator"),
    "benchmark": Stage("benchmark", _benchmark, "real-time speed of the streaming student: RTF and first-frame "
                       "delay of DiT and VAE, sequential vs pipelined (VAE of chunk k overlaps DiT of k+1)"),
    "evaluate": Stage("evaluate", _evaluate, "metrics of teacher, student and ground truth on held-out clips: "
                      "keypoint variances, lip sync, FID/FVD, identity over time, flicker"),
}
ORDER = list(STAGES)
