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
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(fn, job): job for job in jobs}
            for fut in as_completed(futures):
                exc = fut.exception()
                yield futures[fut], (None if exc else fut.result()), exc
                bar.update()
