"""Flow `curate`: SpeakerVid-style clips -> active-speaker masks, filters, balancing -> curated manifest."""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage_flow


@flow(name="curate", log_prints=True)
def curate_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
                parent_run_id: str | None = None, force: bool = False) -> dict:
    return run_stage_flow("curate", configs, sets, root, parent_run_id, force)
