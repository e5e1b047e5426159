"""Flow `corpus`: the self-made demo corpus."""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage_flow


@flow(name="corpus", log_prints=True)
def corpus_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
                parent_run_id: str | None = None, force: bool = False) -> dict:
    return run_stage_flow("corpus", configs, sets, root, parent_run_id, force)
