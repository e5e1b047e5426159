"""Flow `vae`. train the demo's causal streaming autoencoder on the curated clips (skipped for Wan VAEs)."""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage_flow


@flow(name="vae", log_prints=True)
def vae_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
             parent_run_id: str | None = None, force: bool = False) -> dict:
    return run_stage_flow("vae", configs, sets, root, parent_run_id, force)
