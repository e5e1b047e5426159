"""Flow `curate`: SpeakerVid-style clips -> active-speaker masks, filters, balancing -> curated manifest.

``curate.runner`` picks where the per-clip work runs:

* ``local`` (default): the stage's own process pool (``curate.workers`` processes), inside one Prefect task;
* ``dask``: each clip is a Prefect task (``curate-clip``) submitted to prefect-dask's DaskTaskRunner -- a local
  Dask cluster of ``curate.workers`` single-threaded worker processes, or the scheduler at
  ``curate.runner_address`` (its workers need this project installed and the same paths);
* ``ray``: the same tasks on prefect-ray's RayTaskRunner (``pip install -e '.[ray]'``), local Ray or the
  cluster at ``curate.runner_address``.

Listing, resume, balancing and the manifest stay in the flow's process (tasks/curation/build.py); only the
clips travel. A clip task that raises is retried once, then recorded as a failed row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm import tqdm

from flows.common import run_stage_flow
from tasks.config import ConfigError, CurateConfig, load_config, project_root
from tasks.runner import run_stage


@task(name="curate-clip", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def curate_clip_task(fn: Callable[[Any], Any], job: Any) -> Any:
    return fn(job)


def prefect_mapper(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, desc: str, unit: str,
                   progress: bool = True) -> Iterator[tuple[Any, Any, Exception | None]]:  # fmt: skip
    """tasks.common.parallel.map_jobs's contract on the current flow's task runner: one Prefect task per job."""
    futures = {}
    for job in jobs:
        name = f"curate-{getattr(job, 'clip_id', len(futures))}"
        futures[curate_clip_task.with_options(task_run_name=name).submit(fn, job)] = job
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        for fut in as_completed(list(futures)):
            try:
                yield futures[fut], fut.result(), None
            except Exception as exc:  # noqa: BLE001 -- the caller records it as the clip's failed row
                yield futures[fut], None, exc
            bar.update()


def build_task_runner(c: CurateConfig):
    """The Prefect task runner ``curate.runner`` names (None for ``local``)."""
    if c.runner == "local":
        return None
    if c.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if c.runner_address:
            return DaskTaskRunner(address=c.runner_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": c.workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})  # fmt: skip
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ConfigError("curate.runner=ray needs prefect-ray: pip install -e '.[ray]'") from None
    return RayTaskRunner(address=c.runner_address) if c.runner_address else RayTaskRunner()


@flow(name="curate-clips", log_prints=True)
def curate_on_cluster(configs: list[str] | None, sets: list[str] | None, root: str, parent_run_id: str | None,
                      force: bool) -> dict:  # fmt: skip
    cfg = load_config(configs, sets, root=Path(root))
    outcome = run_stage("curate", cfg, Path(root), parent_run_id=parent_run_id, orchestrated=True, force=force,
                        options={"mapper": prefect_mapper})  # fmt: skip
    return outcome.__dict__


@flow(name="curate", log_prints=True)
def curate_flow(configs: list[str] | None = None, sets: list[str] | None = None, root: str | None = None,
                parent_run_id: str | None = None, force: bool = False) -> dict:
    root_path = Path(root).resolve() if root else project_root()
    cfg = load_config(configs, sets, root=root_path)
    runner = build_task_runner(cfg.curate)
    if runner is None:
        return run_stage_flow("curate", configs, sets, str(root_path), parent_run_id, force)
    return curate_on_cluster.with_options(task_runner=runner)(configs, sets, str(root_path), parent_run_id, force)
