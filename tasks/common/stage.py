"""What every stage function returns, so the CLI, Prefect and MLflow treat all stages alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageResult:
    stage: str
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # files worth logging to MLflow (images, videos, json)
    outputs: list[Path] = field(default_factory=list)  # what the stage wrote for the next stage
    failures: dict[str, str] = field(default_factory=dict)  # item id -> reason (quarantined, not fatal)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # MLflow tables: artifact file -> rows
    summary: str = ""
    model: Path | None = None  # a trained student checkpoint to log and register in MLflow's model registry
