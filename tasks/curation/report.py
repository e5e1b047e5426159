"""The curation report: counts per outcome and reason, histograms, and a sheet of frames the active speaker
detector called speaking and listening."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.curation.balance import CATEGORIES

_REASON_KINDS = [
    ("too short", "too_short"), ("pose limits", "pose"), ("face found in", "no_face"), ("luminance", "luminance"),
    ("blurred", "blur"),
]  # fmt: skip


def reason_kinds(reason: str) -> list[str]:
    kinds = [kind for key, kind in _REASON_KINDS if key in reason]
    return kinds or ["other"]


def write_report(table: pd.DataFrame, report_dir: Path, root: Path) -> tuple[dict[str, float], list[Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    ok = table[table["status"] == "ok"]
    metrics: dict[str, float] = {
        "clips_total": float(len(table)),
        "clips_ok": float(len(ok)),
        "clips_rejected": float((table["status"] == "rejected").sum()),
        "clips_failed": float((table["status"] == "failed").sum()),
        "clips_selected": float(table["selected"].sum()),
        "hours_ok": float(ok["duration_s"].astype(float).sum() / 3600.0) if len(ok) else 0.0,
    }
    for cat in CATEGORIES:
        metrics[f"category_{cat}"] = float((ok["category"] == cat).sum())
        metrics[f"selected_{cat}"] = float(((ok["category"] == cat) & ok["selected"]).sum())
    for reason in table.loc[table["status"] != "ok", "reason"].fillna(""):
        for kind in reason_kinds(reason):
            metrics[f"reason_{kind}"] = metrics.get(f"reason_{kind}", 0.0) + 1.0
    if len(ok):
        metrics["listen_ratio_mean"] = float(ok["listen_ratio"].astype(float).mean())

    artifacts = []
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    panels = [("listen_ratio", "listening ratio (ASD)"), ("pose_mean_abs_yaw", "mean |yaw| (deg)"),
              ("luminance", "median luminance"), ("face_sharpness", "face sharpness")]  # fmt: skip
    for ax, (col, title) in zip(axes, panels, strict=True):
        for status, colour in (("ok", "tab:green"), ("rejected", "tab:red")):
            values = pd.to_numeric(table.loc[table["status"] == status, col], errors="coerce").dropna()
            if len(values):
                ax.hist(values, bins=20, alpha=0.6, color=colour, label=f"{status} ({len(values)})")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    hist = report_dir / "histograms.png"
    fig.savefig(hist, dpi=90)
    plt.close(fig)
    artifacts.append(hist)

    per_clip = report_dir / "clips.csv"  # what each clip got: status, reason, speaking ratio, pose
    table[CLIP_COLUMNS].to_csv(per_clip, index=False, float_format="%.4g")
    artifacts.append(per_clip)

    sheet = asd_sheet(table, root, report_dir / "asd_frames.png")
    if sheet is not None:
        artifacts.append(sheet)
    artifacts.append(curated_sheet(table, root, report_dir / "curated_frames.png"))
    return metrics, artifacts


def curated_sheet(table: pd.DataFrame, root: Path, out: Path, columns: int = 10) -> Path:
    """The first frame of every ok clip as the models see it (after the crop), titled with its split: does the
    face fill the frame, which people are held out."""
    import matplotlib.pyplot as plt

    from tasks.common.media import MediaError, read_frames

    rows = table[(table["status"] == "ok") & table["video_path"].notna()]
    n = max(1, len(rows))
    cols = min(columns, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(1.3 * cols, 1.5 * -(-n // cols)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows.itertuples(), strict=False):
        try:
            ax.imshow(read_frames(_abs(row.video_path, root), duration=0.2)[0])
        except MediaError:
            continue
        ax.set_title(f"{row.split}: {_short(str(row.identity or row.clip_id))[:14]}", fontsize=5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


CLIP_COLUMNS = ["clip_id", "source", "group", "identity", "status", "category", "selected", "split", "duration_s",
                "speaking_ratio", "listen_ratio", "unknown_ratio", "asd_threshold", "pose_mean_abs_yaw",
                "pose_max_abs_yaw", "pose_beyond_fraction", "luminance", "face_sharpness", "crop_box",
                "reason"]  # fmt: skip


def asd_sheet(table: pd.DataFrame, root: Path, out: Path, max_clips: int = 16) -> Path | None:
    """For each clip with a mask: a frame the detector called speaking and one it called listening, titled
    with the clip's speaking ratio."""
    import matplotlib.pyplot as plt

    from tasks.common.media import read_frames

    rows = table[table["mask_path"].notna()]
    if "source" in rows:  # the same number of clips from each source, in turn
        turn = rows.groupby(rows["source"].fillna("")).cumcount()
        rows = rows.assign(_turn=turn).sort_values("_turn", kind="stable")
    rows = rows.head(max_clips)
    if not len(rows):
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(4.4, 2.3 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows.itertuples(), strict=True):
        mask = np.load(_abs(row.mask_path, root))
        frames = read_frames(_abs(row.source_path, root), width=200, fps=25, duration=len(mask) / 25 + 0.1)
        for ax, (label, value) in zip(ax_row, (("speaking", 1), ("listening", 0)), strict=True):
            ax.axis("off")
            idx = np.flatnonzero(mask[: len(frames)] == value)
            if len(idx):
                i = int(idx[len(idx) // 2])
                ax.imshow(frames[i])
                ratio = f" (speaks {row.speaking_ratio:.0%})" if value == 1 else f" ({row.status})"
                ax.set_title(f"{_short(row.clip_id)} f{i}: {label}{ratio}", fontsize=7)
            else:
                ax.set_title(f"{_short(row.clip_id)}: no {label} frame", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _abs(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def _short(clip_id: str) -> str:
    return re.sub(r"_\d+x\d+_full_video_", "_", clip_id)[:28]
