"""MLflow bookkeeping: one run per pipeline run, a nested run per stage, all state under the project root."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tasks.common.stage import StageResult
from tasks.config import Config, flatten

PARENT_ENV = "STREAMAVATAR_MLFLOW_PARENT_RUN"  # set by a pipeline run so stage processes nest under it
URI_ENV = "STREAMAVATAR_TRACKING_URI"  # overrides tracking.tracking_uri (the served worker's MLflow server)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(cfg: Config, root: Path) -> str:
    """$STREAMAVATAR_TRACKING_URI when set (`make serve` sets it for the worker, so deployment runs log through
    the MLflow server), else tracking.tracking_uri with a relative SQLite path made absolute under ``root``.

    Not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri writes that variable itself, so it would pin every later
    project of the same process to the first one's store."""
    uri = os.environ.get(URI_ENV) or cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path(root) / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def setup(cfg: Config, root: Path) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; returns its id."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    # "Started / Stopping / Successfully terminated system metrics monitoring", "Skip logging GPU metrics": four
    # lines per stage run
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        artifacts = (Path(root) / cfg.tracking.artifact_dir).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts.as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def pipeline_run(cfg: Config, root: Path, name: str, tags: dict | None = None) -> Iterator[str | None]:
    """The parent run of one pipeline run; yields its id (None when tracking is off)."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    setup(cfg, root)
    tags = {"streamavatar.kind": "pipeline", "streamavatar.tracking_uri": mlflow.get_tracking_uri(), **(tags or {})}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params(_params(flatten(cfg.model_dump(mode="json"))))
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(cfg: Config, root: Path, stage: str, params: dict, parent_run_id: str | None = None
              ) -> Iterator[object | None]:
    """A run for one stage, nested under ``parent_run_id`` (or $STREAMAVATAR_MLFLOW_PARENT_RUN) when given."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    setup(cfg, root)
    parent = parent_run_id or os.environ.get(PARENT_ENV)
    tags = {"streamavatar.kind": "stage", "streamavatar.stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if cfg.tracking.system_metrics:
        mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
    with mlflow.start_run(run_name=stage, tags=tags, nested=mlflow.active_run() is not None,
                          log_system_metrics=cfg.tracking.system_metrics) as run:  # fmt: skip
        mlflow.log_params(_params(params))
        log_inputs(cfg, root, stage)
        yield run


# the data each stage reads, logged as MLflow dataset inputs (name, digest, source, schema, context)
TRAINING = ("vae", "teacher", "ode_pairs", "distill", "refine")


def stage_inputs(cfg: Config, root: Path, stage: str) -> list[tuple[str, Path, str]]:
    """(dataset name, file, context) of what ``stage`` reads: curate the corpus table, every later stage the
    curated manifest (its rows name the clips, their split and selection)."""
    root = Path(root)
    if stage == "curate":
        return [("corpus", root / cfg.corpus.out_dir / "corpus.parquet", "curation")]
    if stage in TRAINING:
        return [("curated-manifest", root / cfg.curate.manifest, "training")]
    if stage in ("benchmark", "evaluate"):
        return [("curated-manifest", root / cfg.curate.manifest, "evaluation")]
    return []


def log_inputs(cfg: Config, root: Path, stage: str) -> None:
    """``mlflow.log_input`` for each of :func:`stage_inputs` that exists (a stage that makes its own input, or
    runs before it exists, logs none); the digest is MLflow's hash of the table's contents."""
    import warnings

    import mlflow
    import pandas as pd

    for name, path, context in stage_inputs(cfg, root, stage):
        if not path.is_file():
            continue
        table = pd.read_parquet(path)
        with warnings.catch_warnings():  # MLflow's hints on resolving a local source and on integer columns
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=str(path.resolve()), name=name)
            mlflow.log_input(dataset, context=context)


def log_result(result: StageResult, root: Path) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    if result.metrics:
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
    for path in result.artifacts:
        path = Path(path)
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=result.stage)
    for name, rows in result.tables.items():
        if rows:
            import pandas as pd

            mlflow.log_table(data=pd.DataFrame(rows), artifact_file=f"{result.stage}/{name}")
    if result.failures:
        mlflow.log_dict(result.failures, f"{result.stage}/failures.json")
    mlflow.set_tag("streamavatar.summary", result.summary[:5000])


def _params(flat: dict) -> dict:
    # MLflow params are strings of at most 6000 characters
    return {k: (str(v)[:6000] if v is not None else "null") for k, v in flat.items()}
