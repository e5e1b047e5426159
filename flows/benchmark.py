"""Flow `benchmark`: real-time speed of the streaming student (RTF, first-frame delay, DiT/VAE pipelining)."""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage_flow


@flow(name="benchmark", log_prints=True)
def benchmark_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
               parent_run_id: str | None = None, force: bool = False) -> dict:
    return run_stage_flow("benchmark", configs, sets, root, parent_run_id, force)
