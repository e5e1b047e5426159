"""The README and docs/ pages link to each other by relative paths and section anchors: every one resolves."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    found, fence = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        heading = None if fence else re.match(r"^#+ (.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def broken_links(page: Path) -> list[str]:
    bad = []
    for link in LINK.findall(page.read_text()):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path) if path else page
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target.read_text()):
            bad.append(f"{link}: no such section")
    return bad


def test_every_relative_link_and_anchor_resolves(tmp_path):
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 10
    found = {p.name: broken_links(p) for p in pages}
    assert {name: bad for name, bad in found.items() if bad} == {}
    # the checker itself: a page with a missing file and a missing section is caught, a good link is not
    (tmp_path / "a.md").write_text("# Title one\n\n[ok](#title-one) [gone](b.md) [no section](a.md#nope)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md: no such file", "a.md#nope: no such section"]
