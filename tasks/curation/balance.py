"""Listen-ratio balancing (paper 4.1) and the honest train / val / unseen split.

Balancing: categories by the share of listening frames, then sampling so that the selected set holds the
categories in target proportions; on a small corpus strict proportions would throw most of it away (the rarest
category limits every other), so a floor (``min_keep``) keeps a share of the clips, filled from the categories
furthest below their target share. Deterministic for a seed.

Splits are by conversation (``group``): the two sides of a conversation, and every clip of its audio, always
share one. ``unseen``: every conversation of the held-out identities; ``val``: conversations by hash, at least a
minimum; ``train``: the rest, never empty.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import pandas as pd

CATEGORIES = ("speaking", "listening", "mixed")
SPLITS = ("train", "val", "unseen")


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


# ------------------------------------------------------------------------------------------------ balancing
def balance(table: pd.DataFrame, proportions: dict[str, float], seed: int, min_keep: float = 0.0) -> pd.Series:
    """Boolean 'selected' per row of the ok clips: the largest set whose category counts follow ``proportions``
    (categories with proportion 0 are left out; a category with too few clips limits the total), then, while
    fewer than ``min_keep`` of the ok clips in weighted categories are selected, one more clip of the category
    furthest below its target share (clips with unknown category are never selected)."""
    selected = pd.Series(False, index=table.index)
    wanted = {c: p for c, p in proportions.items() if p > 0}
    ok = table[table["status"] == "ok"]
    pools = {c: sorted(ok.index[ok["category"] == c], key=lambda i: _order(str(ok.at[i, "clip_id"]), seed))
             for c in wanted}  # fmt: skip
    wanted = {c: p for c, p in wanted.items() if pools[c]}  # an absent category cannot limit the others
    if not wanted:
        return selected
    total_p = sum(wanted.values())
    size = min(len(pools[c]) * total_p / p for c, p in wanted.items())
    taken = {c: int(size * p / total_p + 1e-9) for c, p in wanted.items()}
    floor = math.ceil(min_keep * sum(len(pools[c]) for c in wanted) - 1e-9)
    while sum(taken.values()) < floor:
        open_ = [c for c in wanted if taken[c] < len(pools[c])]
        if not open_:
            break
        n = sum(taken.values()) + 1  # the share each category would have after one more clip
        c = max(open_, key=lambda c: (wanted[c] / total_p - taken[c] / n, -CATEGORIES.index(c)
                                      if c in CATEGORIES else 0))  # fmt: skip
        taken[c] += 1
    for c in wanted:
        selected.loc[pools[c][: taken[c]]] = True
    return selected


def explain_balance(table: pd.DataFrame, selected: pd.Series, proportions: dict[str, float],
                    min_keep: float) -> tuple[dict[str, float], str]:  # fmt: skip
    """(numbers for metrics.json, one sentence for the report) about what balancing kept and why."""
    ok = table[table["status"] == "ok"]
    wanted = {c: p for c, p in proportions.items() if p > 0 and (ok["category"] == c).any()}
    counts = {c: int((ok["category"] == c).sum()) for c in CATEGORIES}
    strict = 0
    limiting = ""
    if wanted:
        total_p = sum(wanted.values())
        limiting = min(wanted, key=lambda c: counts[c] * total_p / wanted[c])
        size = counts[limiting] * total_p / wanted[limiting]
        strict = sum(int(size * p / total_p + 1e-9) for p in wanted.values())
    candidates = sum(counts[c] for c in wanted)
    kept = int(selected[ok.index].sum()) if len(ok) else 0
    floor = math.ceil(min_keep * candidates - 1e-9)
    numbers = {"balance_candidates": float(len(ok)), "balance_strict": float(strict),
               "balance_floor": float(floor), "balance_kept": float(kept),
               "balance_dropped": float(len(ok) - kept), "balance_topped_up": float(max(0, kept - strict))}  # fmt: skip
    per_cat = ", ".join(f"{int((selected[ok.index] & (ok['category'] == c)).sum())} {c}" for c in CATEGORIES)
    if not wanted:
        why = "no ok training clip in a weighted category: nothing selected"
    elif kept > strict:
        why = (f"strict proportions would keep {strict} of {len(ok)} ok training clips (the rarest category, "
               f"{limiting}, has {counts[limiting]}); balance_min_keep {min_keep:g} keeps {kept} ({per_cat}), "
               f"topped up from the categories furthest below their target share")
    else:
        why = (f"proportions {wanted} keep {kept} of {len(ok)} ok training clips ({per_cat}); the rarest "
               f"category, {limiting}, has {counts[limiting]}")
    left = len(ok) - candidates
    if left:
        why += f"; {left} clip(s) of unweighted or unknown category never selected"
    return numbers, why


# ---------------------------------------------------------------------------------------------------- splits
def split_of(group: str, val_fraction: float, seed: int) -> str:
    """'val' or 'train' by a hash of the conversation group, so partners never straddle the split."""
    h = int(_order(group, seed)[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


@dataclass
class SplitPlan:
    split: pd.Series  # per row: train | val | unseen
    unseen_identities: list[str] = field(default_factory=list)
    val_groups: list[str] = field(default_factory=list)
    unseen_groups: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_splits(table: pd.DataFrame, val_fraction: float, val_min_conversations: int, seed: int,
                unseen_identities: list[str] | tuple[str, ...] = (), unseen_min_identities: int = 0,
                val_clips: list[str] | tuple[str, ...] = ()) -> SplitPlan:  # fmt: skip
    """Split every row by its conversation (``group``); ``identity`` (the person; missing: the clip itself) and
    ``source`` columns are used when present. Only conversations with an ok clip count:

    1. unseen: every conversation with a clip of one of ``unseen_identities`` (those present among ok clips),
       then more identities by hash until ``unseen_min_identities`` are held out;
    2. val: the conversations of ``val_clips``, those whose hash falls under ``val_fraction``, then more until
       each source has ``val_min_conversations``, preferring conversations whose people all appear in a
       training conversation (held out by conversation, not by person), then by hash;
    3. train: the rest. A step that would leave training without a conversation (for the minimum: without one
       of the source) is not taken, and said in notes.
    """
    groups = table["group"].astype(str)
    ident = (table["identity"] if "identity" in table else pd.Series(None, index=table.index, dtype=object))
    ident = ident.where(ident.notna() & (ident.astype(str) != ""), table["clip_id"]).astype(str)
    source = (table["source"] if "source" in table else pd.Series("", index=table.index)).fillna("").astype(str)
    ok = table["status"] == "ok"
    ok_groups = sorted(set(groups[ok]), key=lambda g: _order(g, seed))
    people = {g: set(ident[ok & (groups == g)]) for g in ok_groups}
    anyone = {g: set(ident[groups == g]) for g in set(groups)}  # with clips that are not ok
    where = {g: source[ok & (groups == g)].iloc[0] for g in ok_groups}
    # conversations without an ok clip do not count; they take the hash split (nothing trains on them)
    split = {g: split_of(g, val_fraction, seed) for g in anyone}
    split.update({g: "train" for g in ok_groups})
    plan = SplitPlan(split=pd.Series("train", index=table.index, dtype=object))

    def train_groups() -> list[str]:
        return [g for g in ok_groups if split[g] == "train"]

    # 1. unseen identities
    present = set(ident[ok])
    chosen = [i for i in dict.fromkeys(unseen_identities) if i in present]
    missing = [i for i in unseen_identities if i not in present]
    if missing:
        plan.notes.append(f"unseen_identities {missing} have no ok clip")
    extra = sorted(present - set(chosen), key=lambda i: _order(f"unseen/{i}", seed))
    for person in chosen + extra:
        if len(plan.unseen_identities) >= max(unseen_min_identities, len(chosen)):
            break
        held = {g for g in anyone if person in anyone[g]}
        if not set(train_groups()) - held:
            plan.notes.append(f"identity {person} not held out: training would have no conversation left")
            continue
        for g in held:
            split[g] = "unseen"
        plan.unseen_identities.append(person)
    if len(plan.unseen_identities) < unseen_min_identities:
        plan.notes.append(f"{len(plan.unseen_identities)} unseen identities, fewer than unseen_min_identities "
                          f"{unseen_min_identities}")  # fmt: skip

    # 2. val: forced clips, the hash fraction, then the minimum
    def to_val(g: str, why: str) -> bool:
        if split[g] != "train":
            return False
        if len(train_groups()) <= 1:
            plan.notes.append(f"conversation {g} ({why}) stays in train: it is the last training conversation")
            return False
        split[g] = "val"
        return True

    for g in sorted(set(groups[table["clip_id"].astype(str).isin(list(val_clips))])):
        if g not in ok_groups and split[g] != "unseen":
            split[g] = "val"
        else:
            to_val(g, "val_clips")
    for g in ok_groups:
        if split[g] == "train" and split_of(g, val_fraction, seed) == "val":
            to_val(g, "val_fraction")
    for src in sorted(set(where.values())):  # the minimum holds for each source (synthetic, local, ...)
        mine = [g for g in ok_groups if where[g] == src]
        while sum(split[g] == "val" for g in mine) < val_min_conversations:
            train = train_groups()
            left = [g for g in train if where[g] == src]
            if len(left) <= 1 or len(train) <= 1:  # training keeps a conversation of each source
                plan.notes.append(f"{src}: {sum(split[g] == 'val' for g in mine)} val conversations, fewer than "
                                  f"val_min_conversations {val_min_conversations}: training keeps its last one")
                break

            def seen_elsewhere(g: str, train: list[str] = train) -> bool:
                return people[g] <= set().union(*(people[o] for o in train if o != g))

            to_val(min(left, key=lambda g: (not seen_elsewhere(g), _order(g, seed))), "val_min_conversations")

    plan.split = groups.map(split).astype(object)
    plan.val_groups = [g for g in ok_groups if split[g] == "val"]
    plan.unseen_groups = [g for g in ok_groups if split[g] == "unseen"]
    return plan
