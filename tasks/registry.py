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


STAGES: dict[str, Stage] = {
    "corpus": Stage("corpus", _corpus, "generate the demo corpus of two-person conversations (SpeakerVid layout)"),
    "curate": Stage("curate", _curate, "active-speaker masks, pose/quality filters, listen-ratio balancing -> "
                    "data/manifests/curated.parquet"),
}
ORDER = list(STAGES)
