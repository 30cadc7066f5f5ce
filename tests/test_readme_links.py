"""The README's links lead somewhere: every #anchor names one of its headings (as GitHub spells them), and every
relative link names a file in the repository. Headings get renamed; links to them break silently."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
LINK_TARGETS = re.findall(r"\]\(([^)\s]+)\)", README)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_slug_matches_githubs_spelling():
    assert github_slug("The study (`run_study.py`)") == "the-study-run_studypy"
    assert github_slug("A higher working resolution with windows (CPU): issue 13's recipe") == \
        "a-higher-working-resolution-with-windows-cpu-issue-13s-recipe"


def test_every_anchor_names_a_heading():
    prose = re.sub(r"^```.*?^```", "", README, flags=re.MULTILINE | re.DOTALL)  # a "# comment" in code is no heading
    headings = {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.MULTILINE)}
    anchors = [t[1:] for t in LINK_TARGETS if t.startswith("#")]
    assert anchors, "the README has no in-page links: the pattern no longer finds them"
    assert [a for a in anchors if a not in headings] == []


def test_every_relative_link_names_a_file():
    relative = [t for t in LINK_TARGETS if not t.startswith(("#", "http://", "https://"))]
    assert relative, "the README has no relative links: the pattern no longer finds them"
    assert [t for t in relative if not (REPO / t.split("#")[0]).is_file()] == []
