"""Flow `re-evaluate`: the current student on the fixed evaluation set, appended to the history with a plot.

This is what a scheduled deployment runs (e.g. nightly); it reads the checkpoints the pipeline left and writes
only under evaluate.history_dir, so it never disturbs a pipeline run's outputs."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import transient
from tasks.config import load_config, project_root
from tasks.evaluation.reevaluate import run_reevaluation

reevaluate_task = task(run_reevaluation, name="re-evaluate-student", retry_condition_fn=transient)


@flow(name="re-evaluate", log_prints=True)
def reevaluate_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
                    checkpoint: str | None = None) -> dict:
    root_path = Path(root).resolve() if root else project_root()
    cfg = load_config(configs, sets, root=root_path)
    retrying = reevaluate_task.with_options(retries=cfg.orchestration.retries,
                                            retry_delay_seconds=cfg.orchestration.retry_delay_s)
    return retrying(cfg, root_path, checkpoint=checkpoint, progress=False)
