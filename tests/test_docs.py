"""The documents: a README a user reads top to bottom, docs/ pages it links, links that resolve, and a
project that speaks of itself (what it does), not of how it is being made."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {(ROOT / target).resolve() for target in LINK.findall(readme)}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked]


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = [target for target in LINK.findall(page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert not broken, f"{page.name}: {broken}"


# Words of the workshop, not of the tool: a tracker's issue numbers, machines being lent, calls to them
# and their inventories, what a call carries there and brings back.
WORKSHOP = re.compile(r"\bissue \d+|\blent\b|device (call|tool)|brings? back|earlier session|session's checkout|"
                      r"KINDS\.md|\bcarry limit|device time", re.I)


def test_the_project_speaks_of_itself():
    files = [ROOT / "README.md", *DOCS, *(ROOT / "lingbot").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
             *(ROOT / "plugins").rglob("*.py"), *(ROOT / "tools").rglob("*.py"), *(ROOT / ".ci").iterdir()]
    hits = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files if f.name != "test_docs.py"
            for m in WORKSHOP.finditer(f.read_text())]
    assert not hits, hits


def test_the_generated_tables_are_current():
    """The README's summary and docs/results.md's stage and comparison tables are `tools/results.py`'s
    rendering of the committed reports: a changed measurement without regenerated pages (or a hand
    edit of a table) fails here."""
    from tools.results import rendered

    stale = [str(path.relative_to(ROOT)) for path, text in rendered().items() if path.read_text() != text]
    assert not stale, f"run `.ci/env python -m tools.results`: {stale} differ from reports/"
