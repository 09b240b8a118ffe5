"""Navigation: each file's table of contents names exactly its sections, in order.

A file's sections are its headers, a title between two rules of dashes (`# Title` or
`# Title: what it holds`); its table of contents is the list in its docstring, one section
per line (`  Title   what it holds`). bench.py's sections are named after their modes, which
its docstring lists in the same order as MODES. docs/architecture.md's file table names
parallel.py's sections. Every link between the README and the pages of docs/ leads to a page
that exists, and to a heading of it."""
import ast
import os
import re

import pytest

import bench
from conftest import ROOT

RULE = "# " + "-" * 76


def section_titles(path):
    """The titles of a file's section headers, in order."""
    with open(os.path.join(ROOT, path)) as f:
        lines = f.read().splitlines()
    return [lines[i + 1][2:].split(":")[0] for i in range(len(lines) - 2)
            if lines[i] == RULE and lines[i + 2] == RULE]


def table_of_contents(path):
    """The titles a docstring lists: lines indented two spaces, `  Title` followed by two
    spaces or more (or by nothing); not a list's `  - item`."""
    with open(os.path.join(ROOT, path)) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    return [m[1] for m in (re.match(r"  ([^\s-].*?)(\s{2,}\S.*)?$", line) for line in doc.splitlines()) if m]


@pytest.mark.parametrize("path", ["parallel.py", "kernels.py", "flags.py", "metrics.py"])
def test_each_table_of_contents_names_exactly_the_sections(path):
    assert table_of_contents(path) == section_titles(path)


def test_bench_sections_are_its_modes_in_order():
    modes = [m for title in section_titles("bench.py") if title not in ("Shared helpers", "Command line")
             for m in title.split(", ")]
    assert modes == list(bench.MODES) == [m.split()[0] for m in table_of_contents("bench.py")
                                           if not m.startswith("python ")]


def test_readme_names_parallel_sections():
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        row = next(line for line in f if line.startswith("| `parallel.py` |"))
    assert re.findall(r"\*([A-Z][^*]*)\*", row) == section_titles("parallel.py")


def heading_anchors(text):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_links_between_pages_lead_somewhere():
    pages = ["README.md", *(os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md"))]
    linked = set()
    for page in pages:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(os.path.join(ROOT, path)), f"{page}: {target} leads nowhere"
            if anchor:
                with open(os.path.join(ROOT, path)) as f:
                    assert anchor in heading_anchors(f.read()), f"{page}: {target}: no such heading"
            linked.add(path)
    assert set(pages) - {"README.md"} <= linked, f"pages no page links: {set(pages) - linked - {'README.md'}}"
