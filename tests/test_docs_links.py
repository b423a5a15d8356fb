"""The README stays a newcomer's length, and every relative link in it and in docs/ resolves.

A link is `[text](target)`; a target with a scheme (`http:`, `mailto:`) or only an anchor is not
checked. A `#anchor` after a file must name one of that page's headings (GitHub's slugs). A target
outside the repository (`../shared/DESIGN.md`) is checked only where that folder sits beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_CODE = re.compile(r"`[^`\n]*`")


def links(page: Path) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", page.read_text()))
    return [m.group(1) for m in _LINK.finditer(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", m.group(1)) and not m.group(1).startswith("#")]


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_the_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / target.split("#")[0]).resolve() for target in links(REPO / "README.md")}
    missing = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        outside = REPO not in path.parents and path != REPO
        if outside and not (REPO.parent / path.relative_to(REPO.parent).parts[0]).exists():
            continue                # a sibling folder this checkout does not have
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links that do not resolve: {broken}"


def test_the_link_parser_finds_links_outside_code() -> None:
    page = REPO / "README.md"
    assert "docs/architecture.md" in links(page)
    assert slug("Restarts and start-up failures (`pagedserve serve`)") == (
        "restarts-and-start-up-failures-pagedserve-serve")


_CODE_REF = re.compile(r"`([\w/]+\.py):(\w+)(?:\.(\w+))?`")


def test_every_file_function_reference_names_a_definition() -> None:
    """`path.py:name` and `path.py:Class.method` in docs/architecture.md name what that file defines."""
    text = (REPO / "docs" / "architecture.md").read_text()
    refs = _CODE_REF.findall(text)
    assert len(refs) > 20
    missing = []
    for path, name, attr in refs:
        source = (REPO / path).read_text() if (REPO / path).exists() else ""
        for defined in filter(None, (name, attr)):
            if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{defined}\b", source, re.MULTILINE):
                missing.append(f"{path}:{defined}")
    assert not missing, f"names docs/architecture.md gives that their files do not define: {missing}"
