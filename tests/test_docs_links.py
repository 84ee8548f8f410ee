"""Every relative link in README.md and docs/*.md reaches a file of the tree, and a ``#anchor`` reaches a heading
of the page it names (GitHub's slugs), so moving a section between pages cannot leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target), with an optional "title"; [label]: target definitions
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``#`` comment in a bash block is no heading, a ``[x](y)`` in
    code no link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (code, emphasis and link marks dropped), lower-cased,
    punctuation removed except ``-`` and ``_``, each space a ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated slug gets -1, -2, ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """The targets of the page's links, in order; a link's text may wrap onto the next line."""
    lines = [INLINE_CODE.sub("", line) for line in prose_lines(text)]
    found = INLINE_LINK.findall("\n".join(lines))
    return found + [m.group(1) for m in map(LINK_DEFINITION.match, lines) if m]


def dead_links(page: Path) -> list[str]:
    """The relative links of ``page`` that reach no file, or no heading of the page they name."""
    dead = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... are not checked offline
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest.read_text(encoding="utf-8")):
            dead.append(f"{target} (no heading #{anchor} in {dest.name})")
    return dead


def test_slugs_are_githubs():
    assert slug("GRPO, RLOO and REINFORCE++") == "grpo-rloo-and-reinforce"
    assert slug("Which method? `compare` and `recommend`") == "which-method-compare-and-recommend"
    assert slug("Human labeling: `alignkit label`") == "human-labeling-alignkit-label"
    assert slug("What `train_data` holds") == "what-train_data-holds"
    assert anchors("# A\n## A\n```bash\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_the_checker_finds_a_dead_file_and_a_dead_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Real section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#real-section) [self](#page) [web](https://example.com/x) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-section) ![img](images/none.png) [wrapped\n"
        "text](wrapped.md)\n"
        "```\n[in a fence](fenced.md)\n```\n"
        "[def]: also-missing.md\n"
    )
    assert dead_links(page) == [
        "missing.md (no such file)",
        "other.md#no-such-section (no heading #no-such-section in other.md)",
        "images/none.png (no such file)",
        "wrapped.md (no such file)",
        "also-missing.md (no such file)",
    ]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    total = sum(len(links(p.read_text(encoding="utf-8"))) for p in PAGES)
    assert total > 30  # the README's stage table and guide list link every page: none found would prove nothing
    assert {p.name: dead_links(p) for p in PAGES if dead_links(p)} == {}


def test_every_docs_page_is_linked_from_the_readme():
    readme_targets = {t.partition("#")[0] for t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    pages = sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if p not in readme_targets] == []
