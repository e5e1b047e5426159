"""Re-evaluation (what the scheduled job runs): the current student on the fixed evaluation set, one row
appended to a history (parquet) per run, and a plot of every metric over the runs.

The student is ``--checkpoint`` when given, else ``evaluate.checkpoint`` ("auto": the refined student, else
the distilled one). The set is the evaluate stage's (tasks/evaluation/evaluate.py): each row carries the set's
digest and the checkpoint's sha256, so rows made on another set or the same weights are told apart.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common import tracking
from tasks.config import Config, resolve_path
from tasks.evaluation.evaluate import SCALARS, evaluate_systems

log = logging.getLogger(__name__)

HISTORY, PLOT = "history.parquet", "history.png"
PLOTTED = ("lip_corr", "identity_dist", "flicker", "hkv", "lbkv", "lfkv", "sync_c", "fid", "fvd")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    return history


def plot_history(history: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in PLOTTED if c in history and history[c].notna().any()]
    n = max(1, len(cols))
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n + 0.6), sharex=True, squeeze=False)
    x = range(1, len(history) + 1)
    for ax, col in zip(axes[:, 0], cols, strict=False):
        ax.plot(list(x), history[col], marker="o")
        gt = f"gt_{col}"
        if gt in history and history[gt].notna().any():
            ax.plot(list(x), history[gt], linestyle="--", marker="x", color="grey", label="ground truth")
            ax.legend(loc="best", fontsize=7)
        ax.set_ylabel(col, fontsize=8)
        ax.grid(alpha=0.3)
    if not cols:
        axes[0, 0].text(0.5, 0.5, "no metric has a value yet", ha="center", va="center")
    axes[-1, 0].set_xlabel("evaluation run (oldest first)")
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


def run_reevaluation(cfg: Config, root: Path, checkpoint: str | None = None, progress: bool = True,
                     parent_run_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate the student (and the ground truth, for reference) on the fixed set; append and plot."""
    t0 = time.perf_counter()
    report = evaluate_systems(cfg, root, systems=("ground_truth", "student"), checkpoint=checkpoint,
                              progress=progress)  # fmt: skip
    row = history_row(report, root)
    folder = resolve_path(cfg.evaluate.history_dir, root)
    history = append_history(folder / HISTORY, row)
    plot = plot_history(history, folder / PLOT)
    numeric = {k: v for k, v in row.items() if isinstance(v, float) and not math.isnan(v)}
    with tracking.stage_run(cfg, root, "re-evaluate", {"checkpoint": row["checkpoint"],
                                                       "eval_set_digest": row["eval_set_digest"]},
                            parent_run_id) as run:  # fmt: skip
        if run is not None:
            import mlflow

            mlflow.set_tag("streamavatar.kind", "reevaluation")
            mlflow.log_metrics(numeric)
            mlflow.log_artifact(str(plot), artifact_path="re-evaluate")
            mlflow.log_artifact(str(folder / HISTORY), artifact_path="re-evaluate")
    log.info("re-evaluation: %s on %d windows -> %s (%d rows)", row["checkpoint"], row["windows"],
             folder / HISTORY, len(history))  # fmt: skip
    return {"row": {k: (str(v) if isinstance(v, pd.Timestamp) else v) for k, v in row.items()},
            "history": str(folder / HISTORY), "plot": str(plot), "rows": len(history),
            "seconds": time.perf_counter() - t0}  # fmt: skip
