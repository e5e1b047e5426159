"""Listen-ratio balancing (paper 4.1): categories by the share of listening frames, then sampling so that the
selected set holds the categories in target proportions; deterministic for a seed."""

from __future__ import annotations

import hashlib

import pandas as pd

CATEGORIES = ("speaking", "listening", "mixed")


def category(listen_ratio: float, speaking_max: float, listening_min: float) -> str:
    """speaking: listen ratio <= speaking_max; listening: >= listening_min; mixed: in between."""
    if listen_ratio != listen_ratio:  # NaN: no frame was scored
        return "unknown"
    if listen_ratio <= speaking_max:
        return "speaking"
    if listen_ratio >= listening_min:
        return "listening"
    return "mixed"


def _order(key: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}/{key}".encode()).hexdigest()


def balance(table: pd.DataFrame, proportions: dict[str, float], seed: int) -> pd.Series:
    """Boolean 'selected' per row of the ok clips: the largest set whose category counts follow ``proportions``
    (categories with proportion 0 are left out; a category with too few clips limits the total)."""
    wanted = {c: p for c, p in proportions.items() if p > 0}
    selected = pd.Series(False, index=table.index)
    ok = table[table["status"] == "ok"]
    counts = {c: int((ok["category"] == c).sum()) for c in wanted}
    wanted = {c: p for c, p in wanted.items() if counts[c] > 0}  # an absent category cannot limit the others
    total_p = sum(wanted.values())
    if not wanted:
        return selected
    size = min(counts[c] * total_p / p for c, p in wanted.items())
    for c, p in wanted.items():
        take = int(size * p / total_p + 1e-9)
        rows = ok[ok["category"] == c]
        chosen = sorted(rows.index, key=lambda i: _order(str(rows.at[i, "clip_id"]), seed))[:take]
        selected.loc[chosen] = True
    return selected


def split_of(group: str, val_fraction: float, seed: int) -> str:
    """'val' or 'train' by a hash of the conversation group, so partners never straddle the split."""
    h = int(_order(group, seed)[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"
