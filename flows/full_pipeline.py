"""Flow `full-pipeline`: every stage that exists, in order, under one MLflow run with a nested run per stage."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.benchmark import benchmark_flow
from flows.corpus import corpus_flow
from flows.curate import curate_flow
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.ode_pairs import ode_pairs_flow
from flows.refine import refine_flow
from flows.teacher import teacher_flow
from flows.vae import vae_flow
from tasks.common import locking, tracking
from tasks.config import load_config, project_root
from tasks.registry import ORDER

STAGE_FLOWS = {"corpus": corpus_flow, "curate": curate_flow, "vae": vae_flow, "teacher": teacher_flow, "ode_pairs": ode_pairs_flow,
               "distill": distill_flow, "refine": refine_flow, "benchmark": benchmark_flow, "evaluate": evaluate_flow}


def _prefect_tags() -> dict[str, str]:
    from prefect.runtime import deployment, flow_run

    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or "")}
    if deployment.name:
        tags["prefect.deployment"] = f"full-pipeline/{deployment.name}"
    return tags


def _who() -> str:
    from prefect.runtime import deployment, flow_run

    where = f"deployment full-pipeline/{deployment.name}" if deployment.name else "full-pipeline"
    return f"flow run {flow_run.name} ({where})"


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
                  stages: list[str] | None = None, force: bool = False) -> dict:
    logger = get_run_logger()
    root_path = Path(root).resolve() if root else project_root()
    cfg = load_config(configs, sets, root=root_path)  # fail fast on a bad config, before any stage runs
    chosen = [s for s in ORDER if not stages or s in stages]
    unknown = sorted(set(stages or []) - set(ORDER))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {ORDER}")
    missing = [s for s in chosen if s not in STAGE_FLOWS]
    if missing:
        raise RuntimeError(f"stage(s) {missing} have no flow in flows/full_pipeline.py")
    outcomes = {}
    t0 = time.perf_counter()
    name = f"full-pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
    tags = {"streamavatar.configs": ",".join(configs or []), **_prefect_tags()}
    # one writer of data/ at a time, across deployments and entry points (a second run is refused, naming us)
    with locking.hold(root_path, _who(), timeout_s=cfg.orchestration.lock_timeout_s), \
            tracking.pipeline_run(cfg, root_path, name, tags=tags) as run_id:
        for stage in chosen:
            outcome = STAGE_FLOWS[stage](configs=configs, sets=sets, root=str(root_path), parent_run_id=run_id,
                                         force=force)
            outcomes[stage] = outcome
            logger.info("%s: %s. %s %s", stage, outcome["status"], outcome["summary"], outcome["dvc"])
        if run_id is not None:
            import mlflow

            mlflow.log_metric("pipeline_seconds", time.perf_counter() - t0)
    rows = [f"| {s} | {o['status']} | {o['dvc']} | {o['summary'][:300].replace('|', '/')} |" for s, o in outcomes.items()]
    create_markdown_artifact(key="pipeline-summary", description=f"{name}: {len(outcomes)} stages", markdown="\n".join(
        [f"### {name} ({time.perf_counter() - t0:.0f} s, MLflow run {run_id})", "",
         "| stage | status | DVC | summary |", "|---|---|---|---|", *rows]))  # fmt: skip
    return {"mlflow_run_id": run_id, "stages": outcomes}
