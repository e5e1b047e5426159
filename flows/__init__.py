"""Prefect flows: thin wiring over tasks/. Importing this package points Prefect's and MLflow's state at the
project (PREFECT_HOME under the repo) and turns every tool's telemetry off, before prefect is imported."""

from __future__ import annotations

import os

from tasks.config import project_root


def _configure_environment() -> None:
    root = project_root()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # the stages' own loggers reach the Prefect UI's run logs (not only the console); outside a run they stay
    # console-only, silently
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "streamavatar,tasks,model,flows,live")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


_configure_environment()
