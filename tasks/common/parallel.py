"""Run one function over many independent jobs in spawned worker processes, with a progress bar, and hand
back each job's result or the exception it raised: one bad item never stops a batch."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm


def map_jobs(
    fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, desc: str, unit: str, progress: bool = True
) -> Iterator[tuple[Any, Any, Exception | None]]:
    """Yield (job, result, None) or (job, None, exception) as jobs finish. ``fn`` and the jobs must pickle;
    ``workers == 1`` runs in this process."""
    workers = max(1, min(workers, len(jobs)))
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                try:
                    yield job, fn(job), None
                except Exception as exc:  # noqa: BLE001 -- reported to the caller, which records it
                    yield job, None, exc
                bar.update()
            return
        ctx = multiprocessing.get_context("spawn")  # mediapipe and fork do not mix
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            futures = {pool.submit(fn, job): job for job in jobs}
            for fut in as_completed(futures):
                exc = fut.exception()
                yield futures[fut], (None if exc else fut.result()), exc
                bar.update()
        except BaseException:
            # interrupted (SIGINT/SIGTERM, an error in the caller, the generator closed): the workers stop NOW.
            # The executor's own exit would wait for every queued job, so a cancelled run went on curating.
            stop_workers(pool)
            raise
        pool.shutdown(wait=True)


def stop_workers(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """Cancel the queued jobs and end the pool's worker processes (SIGTERM, then SIGKILL after ``grace_s``).
    Finished jobs were already handed back: whatever the caller wrote for them stays."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # the executor has no public handle on them
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join(1.0)
