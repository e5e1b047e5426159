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

PROJECT_LOGGERS = ("streamavatar", "tasks", "model", "flows", "live")


def route_stage_logs() -> None:
    """The stages' own loggers (tasks.*, model.*, ...) into the Prefect run's logs (the UI's Logs tab), at INFO:
    what $PREFECT_LOGGING_EXTRA_LOGGERS does (flows/__init__.py sets it) when Prefect is imported after it, done
    here too for a process that imported Prefect first. Outside a run the API handler drops the records."""
    import logging

    api = logging.getLogger("prefect.extra").handlers
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        for handler in api:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


route_stage_logs()


def run_stage_flow(name: str, configs: list[str] | None, sets: list[str] | None, root: str | None,
                   parent_run_id: str | None, force: bool) -> dict:
    root_path = Path(root).resolve() if root else project_root()
    cfg = load_config(configs, sets, root=root_path)
    retrying = stage_task.with_options(retries=cfg.orchestration.retries,
                                       retry_delay_seconds=cfg.orchestration.retry_delay_s)
    outcome: Outcome = retrying(name, cfg, root_path, parent_run_id=parent_run_id, orchestrated=True, force=force)
    publish_artifacts(name, outcome, cfg, root_path)
    return outcome.__dict__


def artifact_key(name: str) -> str:
    return name.replace("_", "-").lower()  # Prefect keys: lowercase letters, digits and dashes


def result_markdown(name: str, outcome: Outcome) -> str:
    """A stage's outcome as markdown: what happened, its summary, and its metrics as a table."""
    lines = [f"### {name}: {outcome.status}", "", outcome.summary or "", ""]
    if outcome.dvc:
        lines += [f"DVC: {outcome.dvc}", ""]
    if outcome.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(outcome.metrics.items())]
    if outcome.failures:
        lines += ["", f"{len(outcome.failures)} item(s) failed:", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(outcome.failures.items())[:50]]
    return "\n".join(lines)


def publish_artifacts(name: str, outcome: Outcome, cfg, root: Path) -> None:
    """Prefect artifacts of a stage run (the flow run's Artifacts tab; the latest under each key): the stage's
    result as markdown, and for `evaluate` the evaluation table itself."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=f"{artifact_key(name)}-result", markdown=result_markdown(name, outcome),
                             description=f"stage {name}: {outcome.status}")  # fmt: skip
    if name == "evaluate" and outcome.status == "ran":
        from tasks.config import resolve_path

        table = resolve_path(cfg.evaluate.out_dir, root) / "table.md"
        if table.is_file():
            create_markdown_artifact(key="evaluation-table", markdown=table.read_text(),
                                     description="ground truth vs teacher vs student on the held-out clips")  # fmt: skip
