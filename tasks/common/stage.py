"""What every stage function returns, so the CLI, Prefect and MLflow treat all stages alike."""

from __future__ import annotations

import json
import math
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


def write_json_atomic(path: Path, numbers: dict[str, float]) -> Path:
    """A metrics file DVC reads (`dvc metrics show/diff`): a flat object of finite numbers only -- text, flags and
    settings belong in the stage's full report. Written whole or not at all."""
    bad = {k: v for k, v in numbers.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}  # fmt: skip
    if bad:
        raise ValueError(f"{path}: metrics must be finite numbers, got {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({k: float(v) for k, v in numbers.items()}, indent=2, sort_keys=True))
    tmp.replace(path)
    return path
