"""Flow `ode_pairs`. the teacher's ODE trajectories at the student's noise levels.

Multi-process training runs outside Prefect with torchrun (docs/training.md, "Several processes / GPUs"); the flow runs
the stage in its worker's process."""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage_flow


@flow(name="ode_pairs", log_prints=True)
def ode_pairs_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
             parent_run_id: str | None = None, force: bool = False) -> dict:
    return run_stage_flow("ode_pairs", configs, sets, root, parent_run_id, force)
