"""The documentation stays true: README.md is a short guide, every relative link in README.md and
docs/*.md resolves (to a file, and for ``#anchor`` links into markdown to a heading, with GitHub's
slugs), every repository path they name exists, and every program they name answers ``--help``.

The program names are parsed from the text, so a newly documented program is checked without
editing this file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
HELP_TIMEOUT_S = 180

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title"
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# a program: a file right under a top-level folder, e.g. launch/train.py, eval/bench.py
PROGRAM = re.compile(r"(?<![\w./-])([A-Za-z_][\w-]*)/([\w-]+\.(?:py|sh|sbatch))\b")
NOT_PROGRAM_DIRS = {"fourm", "tests"}
# a path inside the repository's own folders, e.g. fourm/models/grow.py, configs/train/, tests/test_x.py
REPO_PATH_ROOTS = ("fourm", "configs", "tests", "launch", "eval", "data_pipelines", "tokenizers", "docs")
REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(REPO_PATH_ROOTS) + r")/[\w./-]*[\w/])")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _split_code(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation other than
    hyphens and underscores removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub does (x, x-1, x-2)."""
    prose, _ = _split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code blocks and inline code."""
    prose, _ = _split_code(path.read_text(encoding="utf-8"))
    out = []
    for line in prose:
        line = INLINE_CODE.sub("", line)
        out += INLINE_LINK.findall(line)
        m = REFERENCE_LINK.match(line)
        if m:
            out.append(m.group(1))
    return out


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """'target: reason' for every relative link of ``path`` that does not resolve inside ``root``."""
    bad = []
    for target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if root not in (dest, *dest.parents):
            bad.append(f"{target}: points outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return bad


def named_programs(paths: list[Path] | None = None) -> list[str]:
    """Every program (``folder/name.py|sh|sbatch`` right under a top-level folder other than
    fourm/ and tests/) that the docs name, code blocks included, in order of first mention."""
    found: dict[str, None] = {}
    for path in paths or doc_files():
        for folder, name in PROGRAM.findall(path.read_text(encoding="utf-8")):
            if folder not in NOT_PROGRAM_DIRS:
                found.setdefault(f"{folder}/{name}", None)
    return list(found)


def named_repo_paths(path: Path) -> list[str]:
    return sorted(set(REPO_PATH.findall(path.read_text(encoding="utf-8"))))


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES} (the rest belongs in docs/)"
    assert "make demo" in "\n".join(lines[:10]) and "make test" in "\n".join(lines[:10]), "the two commands open the README"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    assert not broken_links(doc), f"{doc.relative_to(REPO)}: broken links:\n" + "\n".join(broken_links(doc))


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_repository_paths_exist(doc):
    missing = [p for p in named_repo_paths(doc) if not (REPO / p).exists()]
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    targets = {t.partition("#")[0] for t in links(REPO / "README.md")}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"docs/{p.name}" not in targets]
    assert not unlinked, f"docs pages the README does not point to: {unlinked}"


def test_programs_are_found():
    programs = named_programs()
    assert "launch/train.py" in programs and "eval/evaluate.py" in programs, programs


@pytest.mark.parametrize("program", named_programs())
def test_named_program_answers_help(program):
    path = REPO / program
    assert path.is_file(), f"the docs name {program}, which does not exist"
    if path.suffix == ".py":
        cmd = [sys.executable, str(path), "--help"]
    else:  # shell launchers start real jobs: check they parse
        cmd = ["bash", "-n", str(path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(cmd[1:])} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    if path.suffix == ".py":
        assert "usage" in (done.stdout + done.stderr).lower(), f"{program} --help printed no usage"


def test_the_checks_catch_breakage(tmp_path):
    """A broken link, a missing anchor and an unknown program are reported."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## Second `heading`: here\n\n"
        "[ok](#second-heading-here) [bad anchor](#nope) [bad file](missing.md) [web](https://example.com)\n\n"
        "```\n[not a link](in-code.md)\npython launch/no_such_program.py --help\n```\n",
        encoding="utf-8",
    )
    assert github_slug("Second `heading`: here") == "second-heading-here"
    assert github_slug("Levers side by side: `eval/side_by_side.py`") == "levers-side-by-side-evalside_by_sidepy"
    bad = broken_links(page, root=tmp_path)
    assert any(b.startswith("#nope") for b in bad) and any(b.startswith("missing.md") for b in bad) and len(bad) == 2, bad
    assert named_programs([page]) == ["launch/no_such_program.py"]
    assert not (REPO / "launch/no_such_program.py").exists()
