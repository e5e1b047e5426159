"""The Prefect task every stage flow uses: a one-line wrapper around tasks.runner.run_stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.config import ConfigError, load_config, project_root
from tasks.runner import Outcome, run_stage

# retries (orchestration.retries / retry_delay_s) cover transient failures (a file system hiccup, a tracking
# server restarting); stages are resumable, so a retry continues where the failed attempt stopped


def transient(task, task_run, state) -> bool:
    """Retry condition: anything but a ConfigError (a bad setting, a missing input file, data/ locked by
    another run), which would only fail again."""
    return not isinstance(state.data, ConfigError)


stage_task = task(run_stage, name="run-stage", retry_condition_fn=transient)


def run_stage_flow(name: str, configs: list[str] | None, sets: list[str] | None, root: str | None,
                   parent_run_id: str | None, force: bool) -> dict:
    root_path = Path(root).resolve() if root else project_root()
    cfg = load_config(configs, sets, root=root_path)
    retrying = stage_task.with_options(retries=cfg.orchestration.retries,
                                       retry_delay_seconds=cfg.orchestration.retry_delay_s)
    outcome: Outcome = retrying(name, cfg, root_path, parent_run_id=parent_run_id, orchestrated=True, force=force)
    return outcome.__dict__
