"""Re-evaluation (what the scheduled job runs): the current student on the fixed evaluation set, one row
appended to a history (parquet) per run, and a plot of every metric over the runs.

The student is ``--checkpoint`` when given, else ``evaluate.checkpoint`` ("auto": the refined student, else
the distilled one). The set is the evaluate stage's (tasks/evaluation/evaluate.py): each row carries the set's
digest and the checkpoint's sha256, so rows made on another set or the same weights are told apart.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common import locking, model_registry, tracking
from tasks.common.model_registry import file_sha256
from tasks.config import Config, resolve_path
from tasks.evaluation.evaluate import SCALARS, evaluate_systems

log = logging.getLogger(__name__)

HISTORY, PLOT = "history.parquet", "history.png"
PLOTTED = ("lip_corr", "identity_dist", "flicker", "hkv", "lbkv", "lfkv", "sync_c", "fid", "fvd")


def history_row(report: dict, root: Path) -> dict[str, Any]:
    student = report["student"]
    path = Path(student) if Path(student).is_absolute() else root / student
    row: dict[str, Any] = {
        "evaluated_at": pd.Timestamp.now(tz="UTC").floor("s"), "checkpoint": student,
        "checkpoint_sha256": file_sha256(path)[:16] if path.is_file() else "none",
        "eval_set_digest": report["eval_set"]["digest"], "windows": len(report["eval_set"]["items"]),
    }  # fmt: skip
    for system in ("student", "ground_truth"):
        entry = report["systems"].get(system, {})
        agg = entry.get("aggregate", {})
        prefix = "" if system == "student" else "gt_"
        for k in SCALARS:
            v = agg.get(k)
            row[prefix + k] = math.nan if v is None else float(v)
        if system == "student":
            for k in ("fid", "fvd"):
                r = entry.get(k, {})
                row[k] = float(r["value"]) if r.get("status") == "ok" else math.nan
                row[f"{k}_status"] = r.get("status", "missing")
    return row


def append_history(path: Path, row: dict[str, Any]) -> pd.DataFrame:
    """Append one row (atomic rewrite: a crash leaves the old history, never half a file)."""
    new = pd.DataFrame([row])
    if path.is_file():
        old = pd.read_parquet(path)
        history = pd.concat([old, new], ignore_index=True)
    else:
        history = new
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    history.to_parquet(tmp, index=False)
    tmp.replace(path)
    history_csv(history, path.with_suffix(".csv"))
    return history


def history_csv(history: pd.DataFrame, out: Path) -> Path:
    """The history's figures as a CSV, one row per evaluation (``run`` 1, 2, ...; the checkpoint's digest and
    alias beside them): what dvc.yaml's re-evaluation plot draws."""
    cols = [c for c in ("checkpoint_sha256", "alias") if c in history]
    cols += [c for c in PLOTTED if c in history] + [f"gt_{c}" for c in PLOTTED if f"gt_{c}" in history]
    table = history[cols].copy()
    table.insert(0, "run", range(1, len(table) + 1))
    tmp = out.with_suffix(".partial")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    return out


def plot_history(history: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in PLOTTED if c in history and history[c].notna().any()]
    n = max(1, len(cols))
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n + 0.6), sharex=True, squeeze=False)
    x = range(1, len(history) + 1)
    alias = history["alias"].fillna("") if "alias" in history else pd.Series([""] * len(history))
    styles = {"": ("o", "C0", "student"), "champion": ("o", "C0", "champion"), "candidate": ("s", "C1", "candidate")}
    for ax, col in zip(axes[:, 0], cols, strict=False):
        for key, (marker, colour, label) in styles.items():
            sel = (alias == key).to_numpy()
            if sel.any():
                xs = [i for i, keep in zip(x, sel, strict=True) if keep]
                ax.plot(xs, history[col][sel], marker=marker, color=colour, label=label,
                        linestyle="-" if key != "candidate" else "none")  # fmt: skip
        gt = f"gt_{col}"
        if gt in history and history[gt].notna().any():
            ax.plot(list(x), history[gt], linestyle="--", marker="x", color="grey", label="ground truth")
        ax.legend(loc="best", fontsize=7)
        ax.set_ylabel(col, fontsize=8)
        ax.grid(alpha=0.3)
    if not cols:
        axes[0, 0].text(0.5, 0.5, "no metric has a value yet", ha="center", va="center")
    axes[-1, 0].set_xlabel("history row (oldest first): one per student evaluated")
    axes[-1, 0].set_xticks(list(x))
    labels = [f"{i}: {t:%Y-%m-%d %H:%M} {c}" for i, (t, c) in enumerate(zip(history.evaluated_at,
                                                                            history.checkpoint_sha256, strict=False), 1)]
    fig.suptitle("student on the fixed evaluation set", fontsize=10)
    fig.text(0.01, 0.005, "; ".join(labels[-4:]), fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plain_row(report: dict, root: Path) -> dict[str, Any]:
    return {**history_row(report, root), "model_version": "", "alias": "", "decision": "", "decision_reason": ""}


def _registry_rows(cfg: Config, root: Path, progress: bool) -> tuple[list[dict], dict | None] | None:
    """Champion and candidate of the registry on the fixed set; the candidate promoted when it is better.

    Returns (history rows, decision or None), or None when the registry holds no version of the model yet."""
    import tempfile

    from mlflow import MlflowClient

    name = cfg.registry.model_name
    tracking.setup(cfg, root)
    client = MlflowClient()
    champion = model_registry.version_by_alias(client, name, model_registry.CHAMPION)
    candidate = model_registry.version_by_alias(client, name, model_registry.CANDIDATE)
    if champion is None and candidate is None:
        return None
    rows: list[dict] = []
    decision: dict | None = None
    with tempfile.TemporaryDirectory(prefix="reevaluate-") as tmp:

        def measure(version, alias: str, systems: tuple[str, ...]) -> dict[str, Any]:
            ckpt = model_registry.download_checkpoint(name, version.version, Path(tmp) / f"v{version.version}")
            report = evaluate_systems(cfg, root, systems=systems, checkpoint=str(ckpt), progress=progress)
            row = history_row(report, root)
            row.update(checkpoint=f"models:/{name}/{version.version}", model_version=str(version.version),
                       alias=alias, decision="", decision_reason="")  # fmt: skip
            return row

        champ_row = None
        if champion is not None:  # the champion, every run: how the model in use does on the fixed set
            champ_row = measure(champion, model_registry.CHAMPION, ("ground_truth", "student"))
            rows.append(champ_row)
        if candidate is not None and (champion is None or str(candidate.version) != str(champion.version)):
            tags = candidate.tags or {}
            compared = f"v{champion.version}" if champion is not None else "none"
            digest = champ_row["eval_set_digest"] if champ_row else None
            if (tags.get(model_registry.TAG + "compared_to") == compared and champ_row is not None
                    and tags.get(model_registry.TAG + "eval_set_digest") == digest):
                log.info("re-evaluation: candidate v%s was already compared with champion %s on this set (%s); "
                         "not again", candidate.version, compared, tags.get(model_registry.TAG + "decision"))
            else:
                systems = ("student",) if champ_row else ("ground_truth", "student")
                cand_row = measure(candidate, model_registry.CANDIDATE, systems)
                if champ_row:  # the ground truth is the same windows: carry its values over for the plot
                    cand_row.update({k: v for k, v in champ_row.items() if k.startswith("gt_")})
                label = f"champion v{champion.version}" if champion is not None else "the champion"
                d = model_registry.decide(cand_row, champ_row, cfg.registry.compare, cfg.registry.tolerance, label)
                model_registry.record_decision(client, name, candidate.version, d,
                                               champion.version if champion is not None else None,
                                               cand_row["eval_set_digest"])  # fmt: skip
                cand_row.update(decision="promoted" if d.promote else "kept-champion", decision_reason=d.reason)
                rows.append(cand_row)
                decision = {"candidate": str(candidate.version),
                            "champion": str(champion.version) if champion is not None else None, **d.as_dict()}
                log.info("re-evaluation: candidate v%s: %s", candidate.version, d.reason)
    return rows, decision


def run_reevaluation(cfg: Config, root: Path, checkpoint: str | None = None, progress: bool = True,
                     parent_run_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate on the fixed set (with the ground truth, for reference); append to the history and plot.

    Which student: ``checkpoint`` when given; else, with the model registry on (registry.enabled and
    tracking.enabled) and a registered version, the `champion` and the `candidate` (the candidate promoted to
    champion only when it beats it: tasks/common/model_registry.decide); else evaluate.checkpoint."""
    t0 = time.perf_counter()
    root = Path(root)
    # the pipeline's own lock: the evaluation reads data/ (latents, curated clips, checkpoints), which a running
    # pipeline may be rewriting; the nightly job waits for it (orchestration.lock_timeout_s) or is refused
    with locking.hold(root, "re-evaluation", timeout_s=cfg.orchestration.lock_timeout_s):
        found = None
        if checkpoint is None and cfg.registry.enabled and cfg.tracking.enabled:
            found = _registry_rows(cfg, root, progress)
            if found is None:
                log.info("re-evaluation: no version of %s in the model registry yet: evaluating %s",
                         cfg.registry.model_name, cfg.evaluate.checkpoint)  # fmt: skip
        if found is None:
            report = evaluate_systems(cfg, root, systems=("ground_truth", "student"), checkpoint=checkpoint,
                                      progress=progress)  # fmt: skip
            rows, decision = [_plain_row(report, root)], None
        else:
            rows, decision = found
        folder = resolve_path(cfg.evaluate.history_dir, root)
        history = None
        for row in rows:
            history = append_history(folder / HISTORY, row)
        plot = plot_history(history, folder / PLOT)
    with tracking.stage_run(cfg, root, "re-evaluate", {"checkpoints": ",".join(r["checkpoint"] for r in rows),
                                                       "eval_set_digest": rows[0]["eval_set_digest"]},
                            parent_run_id) as run:  # fmt: skip
        if run is not None:
            import mlflow

            mlflow.set_tag("streamavatar.kind", "reevaluation")
            for row in rows:
                prefix = f"{row['alias']}/" if row["alias"] else ""
                mlflow.log_metrics({prefix + k: v for k, v in row.items()
                                    if isinstance(v, float) and not math.isnan(v)})  # fmt: skip
            if decision is not None:
                mlflow.set_tag("streamavatar.decision", "promoted" if decision["promote"] else "kept-champion")
                mlflow.set_tag("streamavatar.decision_reason", decision["reason"][:5000])
                mlflow.log_dict(decision, "re-evaluate/decision.json")
            mlflow.log_artifact(str(plot), artifact_path="re-evaluate")
            mlflow.log_artifact(str(folder / HISTORY), artifact_path="re-evaluate")
    for row in rows:
        log.info("re-evaluation: %s on %d windows -> %s", row["checkpoint"], row["windows"], folder / HISTORY)
    return {"row": {k: (str(v) if isinstance(v, pd.Timestamp) else v) for k, v in rows[-1].items()},
            "rows_added": [{k: (str(v) if isinstance(v, pd.Timestamp) else v) for k, v in r.items()} for r in rows],
            "decision": decision, "history": str(folder / HISTORY), "plot": str(plot), "rows": len(history),
            "seconds": time.perf_counter() - t0}  # fmt: skip
