"""Listen-ratio categories, balancing to target proportions, and the split by conversation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.curation.balance import balance, category, plan_splits, split_of


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


def test_a_small_corpus_keeps_most_clips_and_says_why():
    from tasks.curation.balance import explain_balance

    table = _table({"speaking": 11, "listening": 3, "mixed": 21}, rejected=4)
    props = {"speaking": 1, "listening": 1, "mixed": 1}
    assert balance(table, props, seed=0).sum() == 9  # strict proportions: 3 of each, 26 of 35 thrown away
    sel = balance(table, props, seed=0, min_keep=0.75)
    # the floor: ceil(0.75 * 35) = 27 clips; every listening clip, then the categories furthest below 1/3
    assert sel.sum() == 27 and _chosen(table, sel) == {"listening": 3, "speaking": 11, "mixed": 13}
    assert not sel[table["status"] != "ok"].any()
    assert sel[balance(table, props, seed=0)].all()  # the strict selection is kept, then topped up
    numbers, why = explain_balance(table, sel, props, 0.75)
    assert numbers == {"balance_candidates": 35.0, "balance_strict": 9.0, "balance_floor": 27.0,
                       "balance_kept": 27.0, "balance_dropped": 8.0, "balance_topped_up": 18.0}
    assert "strict proportions would keep 9 of 35" in why and "listening, has 3" in why
    # a corpus that already follows the proportions is left as it is
    even = _table({"speaking": 4, "listening": 4, "mixed": 4})
    assert balance(even, props, seed=0, min_keep=0.75).all()


def _corpus(conversations: int, faces: int, real: int) -> pd.DataFrame:
    """Synthetic two-sided conversations (side s of conversation i shows face 2i + s, both sides share the
    conversation's audio) and single real clips, two of which are one conversation."""
    rows = [{"clip_id": f"c{i}_{s}", "group": f"conv{i}", "identity": f"face{(2 * i + s) % faces}",
             "source": "synthetic", "status": "ok"} for i in range(conversations) for s in range(2)]  # fmt: skip
    rows += [{"clip_id": f"real{j}", "group": "dialogue" if j < 2 else f"real{j}", "identity": f"real{j}",
              "source": "local", "status": "ok" if j % 5 != 4 else "rejected"} for j in range(real)]  # fmt: skip
    return pd.DataFrame(rows)


def test_splits_share_no_conversation_hold_out_an_identity_and_keep_their_minimum():
    table = _corpus(16, 27, 14)
    plan = plan_splits(table, 0.0, 2, seed=0, unseen_identities=["face25"], unseen_min_identities=1)
    split = plan.split
    assert set(split) == {"train", "val", "unseen"}
    # a conversation (and so its shared audio) is in one split only
    assert (table.assign(split=split).groupby("group")["split"].nunique() == 1).all()
    # the unseen identity appears only in `unseen`, with its whole conversation
    assert set(split[table.identity == "face25"]) == {"unseen"} and plan.unseen_identities == ["face25"]
    assert set(table.loc[split == "unseen", "group"]) == {"conv12"}
    # each source has at least the minimum of val conversations, and training keeps some of each
    for source in ("synthetic", "local"):
        mine = (table.source == source) & (table.status == "ok")
        assert table.loc[mine & (split == "val"), "group"].nunique() >= 2
        assert (mine & (split == "train")).any()
    # the synthetic val conversations show people who are also in training conversations
    val_people = set(table.loc[(table.source == "synthetic") & (split == "val"), "identity"])
    assert val_people <= set(table.loc[split == "train", "identity"])
    assert plan_splits(table, 0.0, 2, 0, ["face25"], 1).split.equals(split)  # deterministic


def test_split_extras_forced_clips_automatic_unseen_and_a_tiny_corpus():
    table = _corpus(16, 27, 14)
    plan = plan_splits(table, 0.0, 2, seed=0, unseen_identities=["nobody"], unseen_min_identities=1,
                       val_clips=["real7", "c15_1"])  # fmt: skip
    assert any("nobody" in n for n in plan.notes) and len(plan.unseen_identities) == 1  # one chosen by hash
    person = plan.unseen_identities[0]
    assert set(plan.split[table.identity == person]) == {"unseen"}
    assert plan.split[table.clip_id == "real7"].item() == "val"
    assert set(plan.split[table.group == "conv15"]) == {"val"}  # c15_1 and its partner c15_0 are held out
    # one conversation only: it stays in training, and the notes say why nothing is held out
    tiny = _corpus(1, 2, 0)
    plan = plan_splits(tiny, 0.5, 2, seed=0, unseen_identities=["face0"], unseen_min_identities=1)
    assert set(plan.split) == {"train"} and plan.unseen_identities == []
    notes = " | ".join(plan.notes)
    assert "identity face0 not held out" in notes and "fewer than unseen_min_identities 1" in notes
    assert "0 val conversations, fewer than val_min_conversations 2" in notes
