"""Flow `evaluate`: teacher, student and ground truth on the held-out clips, every metric in one table."""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage_flow


@flow(name="evaluate", log_prints=True)
def evaluate_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
               parent_run_id: str | None = None, force: bool = False) -> dict:
    return run_stage_flow("evaluate", configs, sets, root, parent_run_id, force)
