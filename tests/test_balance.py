"""Listen-ratio categories, balancing to target proportions, and the split by conversation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.curation.balance import balance, category, split_of


def _table(counts: dict[str, int], rejected: int = 0) -> pd.DataFrame:
    rows = [{"clip_id": f"{c}_{i}", "category": c, "status": "ok"} for c, n in counts.items() for i in range(n)]
    rows += [{"clip_id": f"bad_{i}", "category": "", "status": "rejected"} for i in range(rejected)]
    return pd.DataFrame(rows)


def test_categories_follow_the_thresholds():
    assert [category(r, 0.3, 0.7) for r in (0.0, 0.3, 0.31, 0.69, 0.7, 1.0)] == [
        "speaking", "speaking", "mixed", "mixed", "listening", "listening"]  # fmt: skip
    assert category(float("nan"), 0.3, 0.7) == "unknown"  # no scored frame: never guessed


def _chosen(table, sel):
    return table[sel].groupby("category").size().to_dict()


def test_equal_proportions_take_the_smallest_category_from_each():
    table = _table({"speaking": 10, "listening": 4, "mixed": 6}, rejected=5)
    sel = balance(table, {"speaking": 1, "listening": 1, "mixed": 1}, seed=0)
    assert _chosen(table, sel) == {"speaking": 4, "listening": 4, "mixed": 4}
    assert not sel[table["status"] != "ok"].any()  # rejected clips are never selected


def test_weighted_proportions_and_zero_weight():
    table = _table({"speaking": 10, "listening": 4, "mixed": 6})
    sel = balance(table, {"speaking": 2, "listening": 1, "mixed": 0}, seed=0)
    assert _chosen(table, sel) == {"speaking": 8, "listening": 4}
    sel = balance(table, {"speaking": 1, "listening": 3, "mixed": 1}, seed=0)  # listening limits: 4 -> 1.33 each
    assert _chosen(table, sel) == {"speaking": 1, "listening": 4, "mixed": 1}


def test_an_absent_category_does_not_limit_the_others():
    table = _table({"listening": 2, "mixed": 14})
    sel = balance(table, {"speaking": 1, "listening": 1, "mixed": 1}, seed=0)
    assert _chosen(table, sel) == {"listening": 2, "mixed": 2}


def test_selection_is_deterministic_per_seed():
    table = _table({"speaking": 20, "listening": 5, "mixed": 20})
    props = {"speaking": 1, "listening": 1, "mixed": 1}
    a, b, c = balance(table, props, 0), balance(table, props, 0), balance(table, props, 1)
    assert a.equals(b) and not a.equals(c) and a.sum() == c.sum() == 15


def test_split_keeps_a_conversation_together_and_hits_the_fraction():
    groups = [f"yt{i:09d}" for i in range(4000)]
    splits = [split_of(g, 0.1, seed=0) for g in groups]
    assert splits == [split_of(g, 0.1, seed=0) for g in groups]  # partners (same group) share the split
    assert np.mean([s == "val" for s in splits]) == pytest.approx(0.1, abs=0.02)
    assert all(split_of(g, 0.0, 0) == "train" for g in groups[:200])
