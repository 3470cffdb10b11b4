"""The documents' links stay inside the repository and lead somewhere.

Every link in README.md, docs/*.md and each top-level folder's README.md must be relative,
resolve inside the repository to a file or folder that exists, and, when it names a
heading (#anchor) of a Markdown file, to a heading that exists. A link out of the tree
(`../shared/...`, an absolute path, file://) fails: a user who clones ztgate must be able to
read every document it points to. Web links (http, https) are allowed. Links inside code
(fenced blocks and `spans`) are not links.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
WEB = ("http://", "https://")


def documents(root: Path = ROOT) -> list[Path]:
    found = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    found += sorted(p for p in root.glob("*/README.md") if not p.parent.name.startswith("."))
    return [p for p in found if p.is_file()]


def _prose(text: str) -> str:
    """The text without code: fenced blocks and inline code spans."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)      # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def problems(doc: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the links of one document (empty: nothing)."""
    out = []
    for target in links(doc.read_text()):
        if target.startswith(WEB):
            continue
        where = f"{doc.relative_to(root)}: link {target!r}"
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            out.append(f"{where} is not a path in the repository")
            continue
        if target.startswith("/"):
            out.append(f"{where} is an absolute path: link relative to the document")
            continue
        path_part, _, fragment = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if dest != root and root not in dest.parents:
            out.append(f"{where} leaves the repository")
            continue
        if not dest.exists():
            out.append(f"{where}: {dest.relative_to(root)} does not exist")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            out.append(f"{where}: {dest.relative_to(root)} has no heading #{fragment}")
    return out


def test_the_documents_are_there():
    names = {p.relative_to(ROOT).as_posix() for p in documents()}
    for expected in ("README.md", "docs/policy.md", "docs/cli.md", "docs/lab.md", "docs/architecture.md",
                     "ebpf/README.md"):
        assert expected in names


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_stays_inside_and_resolves(doc):
    assert problems(doc) == []


def test_the_check_catches_each_kind_of_bad_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[fine](docs/a.md) [fine too](docs/a.md#its-part) [web](https://example.com/x) [self](#top)\n"
        "# Top\n"
        "`[in code](../nowhere.md)`\n"
        "```\n[in a block](/etc/passwd)\n```\n"
        "[out](../shared/spec/POLICY.md) [abs](/work/shared/spec/LAB.md) [file](file:///etc/hosts)\n"
        "[missing](docs/b.md) [no heading](docs/a.md#nope)\n"
        "[ref]: ../outside.md\n")
    found = problems(readme, root=tmp_path)
    assert len(found) == 6, found
    for bad in ("../shared/spec/POLICY.md", "/work/shared/spec/LAB.md", "file:///etc/hosts", "docs/b.md",
                "docs/a.md#nope", "../outside.md"):
        assert any(repr(bad) in p for p in found), (bad, found)
