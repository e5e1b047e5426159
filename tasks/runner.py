"""Run one stage the same way from every entry point (CLI / dvc repro, Prefect): config in, files out,
MLflow run around it, and, for orchestrated runs, DVC's record kept in step so `dvc status` stays clean."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common import locking, model_registry, tracking
from tasks.config import Config, load_config, load_yaml_text
from tasks.registry import STAGES

log = logging.getLogger("streamavatar")
# marks the log record of a stage's summary: the CLI's console leaves it out (it prints the summary itself)
SUMMARY_RECORD = "streamavatar_summary"


@dataclass
class Outcome:
    stage: str
    status: str  # "ran" | "up-to-date"
    metrics: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    summary: str = ""
    dvc: str = ""  # what happened to DVC's record


def stage_params(root: Path, stage: str) -> list[str]:
    """The config keys a stage depends on, as dvc.yaml declares them (the one place they are listed)."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return [stage]
    spec = (load_yaml_text(path.read_text()) or {}).get("stages", {}).get(stage, {})
    keys: list[str] = []
    for entry in spec.get("params", []) or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {file: [keys]}
            for v in entry.values():
                keys.extend(v or [])
    return keys or [stage]


def _section_dump(cfg: Config, keys: list[str]) -> dict:
    out = {}
    for key in keys:
        value = cfg.section(key)
        out[key] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return out


def matches_params_file(cfg: Config, root: Path, stage: str) -> bool:
    """True when the stage's parameters equal what params.yaml alone gives (what DVC tracks)."""
    keys = stage_params(root, stage)
    return _section_dump(cfg, keys) == _section_dump(load_config(root=root), keys)


@contextlib.contextmanager
def _dvc_repo(root: Path):
    """DVC's Python API on the project at ``root``, run from ``root`` as the `dvc` command is: DVC resolves a
    bare stage name, and its run cache the stage it saves for metrics outputs (``cache: false``), against the
    working directory (from another directory `commit` fails with "file path ... is outside of DVC repo").
    Stages run one after another and no other thread of a stage process resolves relative paths meanwhile
    (MLflow's URI, every data path are absolute), so the change of directory is safe for these few calls."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo


def dvc_up_to_date(root: Path, stage: str) -> bool:
    """`dvc status <stage>` is clean, asked through DVC's Python API in this process (the `dvc` command costs
    ~0.6 s of interpreter start and imports per stage; the API ~0.2 s after its first import). Anything DVC
    cannot answer (no repository, a broken dvc.yaml, an output it cannot hash) counts as not up to date: the
    stage runs."""
    if not (root / ".dvc").is_dir():
        return False
    try:
        with _dvc_repo(root) as repo:
            return repo.status(targets=[stage]) == {}
    except Exception as exc:  # noqa: BLE001 -- DVC's own errors and the file system's alike
        log.info("%s: dvc status could not tell (%s: %s); running it", stage, type(exc).__name__, exc)
        return False


def dvc_record(root: Path, stage: str) -> str:
    """Store the stage's current outputs in DVC's cache and dvc.lock, as `dvc repro` would have.

    What `dvc commit --force <stage>` does, through DVC's Python API: hash the stage's deps, params and outputs
    now, after the stage ran, and store them: what `dvc repro` does once a stage's command has finished. --force
    only skips commit's question before it replaces a changed stage's record, which a non-interactive run cannot
    answer. Only called for a run whose parameters are params.yaml's (else the record would claim settings the
    outputs were not made with). Tested: the record equals `dvc repro --force`'s for the same stage
    (tests/test_pipeline.py)."""
    if not (root / ".dvc").is_dir():
        return "no DVC repository here: nothing recorded"
    try:
        with _dvc_repo(root) as repo:
            repo.commit(stage, force=True)
    except Exception as exc:  # noqa: BLE001 -- reported with DVC's own message, the stage named
        raise RuntimeError(f"dvc commit {stage} failed: {type(exc).__name__}: {exc}") from exc
    return "recorded in dvc.lock"


def run_stage(
    name: str,
    cfg: Config,
    root: Path,
    *,
    parent_run_id: str | None = None,
    orchestrated: bool = False,
    force: bool = False,
    options: dict | None = None,
    lock: bool = True,
) -> Outcome:
    """Run stage ``name``. ``orchestrated`` (Prefect) also skips a stage DVC says is up to date and records
    the outputs in dvc.lock afterwards; from `dvc repro` (the CLI), DVC does both itself. ``options`` go to
    the stage function as keyword arguments (how a flow hands curate its cluster mapper).

    The stage holds the project's data/ lock while it runs (tasks/common/locking.py): a second run that
    wants to write data/ at the same time is refused with the holder's name (``lock=False``: a torchrun rank
    other than 0, whose rank 0 holds it)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    root = Path(root).resolve()
    if not lock:
        return _run_stage(name, cfg, root, parent_run_id, orchestrated, force, options)
    with locking.hold(root, f"stage {name}", timeout_s=cfg.orchestration.lock_timeout_s):
        return _run_stage(name, cfg, root, parent_run_id, orchestrated, force, options)


def stage_seed(seed: int, name: str) -> int:
    """The seed stage ``name`` starts the process-wide generators from: derived from ``project.seed`` and the
    stage's name, so stages draw different numbers and each draws the same ones however it is run."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def seed_stage(seed: int, name: str) -> None:
    """Seed Python's, NumPy's and torch's global generators for stage ``name``. A stage's own draws use seeded
    generators of their own; whatever still draws from the global ones (new layers' initial weights, say) would
    otherwise depend on what ran before in the process (`make demo` runs every stage in one Prefect flow)."""
    from tasks.training.engine import seed_everything

    seed_everything(stage_seed(seed, name))


_START_THREADS: list[int] = []  # torch's intra-op thread count when this process ran its first stage


def reset_threads(name: str) -> None:
    """Start stage ``name`` with the torch thread count this process had at its first stage, SET through
    ``torch.set_num_threads`` every time. Stages that set their own (evaluate: 1; ``vae_train.threads``;
    curation run in-process) would otherwise leave it to the next stage of the same process (`make demo` runs
    every stage in one Prefect flow). And calling ``set_num_threads`` at all, even with the count torch
    already uses, may change how CPU kernels split their work; the live voice detector's loader calls it.
    Setting it at every stage start puts every stage, however it is run, in the same state. (SDPA's backward gave
    other gradients in the last bits after such a call when measured; docs/training.md says why the test
    now checks the call itself.)"""
    import torch

    if not _START_THREADS:
        _START_THREADS.append(torch.get_num_threads())
    now, start = torch.get_num_threads(), _START_THREADS[0]
    if now != start:
        log.info(f"{name}: torch threads {now} (left by an earlier stage in this process) -> {start}")
    torch.set_num_threads(start)


def _run_stage(name: str, cfg: Config, root: Path, parent_run_id: str | None, orchestrated: bool, force: bool,
               options: dict | None) -> Outcome:  # fmt: skip
    params = _section_dump(cfg, stage_params(root, name))
    tracked = matches_params_file(cfg, root, name)
    if orchestrated and not force and tracked and dvc_up_to_date(root, name):
        with tracking.stage_run(cfg, root, name, tracking.flatten(params), parent_run_id) as run:
            if run is not None:
                import mlflow

                mlflow.set_tag("streamavatar.status", "up-to-date")
        msg = f"{name}: up to date (dvc status clean), skipped"
        log.info(msg)
        return Outcome(name, "up-to-date", summary=msg, dvc="unchanged")
    with tracking.stage_run(cfg, root, name, tracking.flatten(params), parent_run_id) as run:
        seed_stage(cfg.project.seed, name)
        reset_threads(name)
        result = STAGES[name].run(cfg, root, **(options or {}))
        if run is not None:
            import mlflow

            tracking.log_result(result, root)
            if result.model is not None and cfg.registry.enabled:
                reg = model_registry.register_student(cfg, root, Path(result.model), stage=name)
                result.summary += f"; registered {reg['name']} v{reg['version']} as '{model_registry.CANDIDATE}'"
            mlflow.set_tag("streamavatar.status", "ran")
    dvc_note = ""
    if orchestrated:
        if tracked:
            dvc_note = dvc_record(root, name)
        else:
            dvc_note = ("not recorded in dvc.lock: this run's parameters differ from params.yaml "
                        "(put them in params.yaml to make DVC track them)")
    # for the run's logs (Prefect's UI, a log file); the console prints the outcome's summary itself
    log.info(result.summary, extra={SUMMARY_RECORD: True})
    return Outcome(name, "ran", metrics=result.metrics, failures=result.failures, summary=result.summary, dvc=dvc_note)
