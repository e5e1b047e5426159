"""The corpus contact sheet: per clip, frames where the person speaks, listens, turns furthest and blinks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from tasks.common.media import read_frames


def _pick_frames(gt: dict) -> list[tuple[str, int]]:
    speaking = np.array(gt["speaking"])
    partner = np.array(gt["partner_speaking"])
    mouth = np.array(gt["mouth_open"])
    yaw = np.abs(np.array(gt["yaw"]))
    listening = np.flatnonzero((partner > 0) & (speaking == 0))
    picks = [("talking", int(np.argmax(mouth)) if speaking.any() else 0)]
    picks.append(("listening", int(listening[len(listening) // 2]) if listening.size else 0))
    picks.append((f"yaw {gt['yaw'][int(np.argmax(yaw))]:+.0f}", int(np.argmax(yaw))))
    picks.append(("blink", int(np.argmax(gt["blink"]))))
    return picks


def contact_sheet(table: pd.DataFrame, root: Path, path: Path, max_clips: int = 16, thumb_w: int = 128) -> None:
    tiles = []
    for row in table.head(max_clips).itertuples():
        gt = json.loads((root / row.gt_path).read_text())
        frames = read_frames(root / row.video_path)
        row_imgs = []
        for label, idx in _pick_frames(gt):
            img = Image.fromarray(frames[min(idx, len(frames) - 1)])
            img = img.resize((thumb_w, int(round(img.height * thumb_w / img.width))))
            draw = ImageDraw.Draw(img)
            draw.rectangle([0, 0, thumb_w, 12], fill=(0, 0, 0))
            draw.text((2, 0), f"{row.side} {label} f{idx}", fill=(255, 255, 255))
            row_imgs.append(np.asarray(img))
        tiles.append(np.concatenate(row_imgs, axis=1))
    sheet = np.concatenate(tiles, axis=0)
    Image.fromarray(sheet).save(path)
