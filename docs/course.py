"""Run the course's pages: every ```python block of a page, in order, in one namespace per page.

    python docs/course.py                  every page of docs/, in order
    python docs/course.py 05-rmsnorm       one page (with or without .md)

The test suite runs the pages the same way (tests/test_docs.py), so a page whose assertion fails fails a test.
"""
from __future__ import annotations

import glob
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
# a fence opening with exactly "python": executed. "python quote=module.function" is a quote of real code,
# shown and compared with the source, never run.
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
_QUOTE = re.compile(r"^```python quote=([\w.]+)\n(.*?)^```", flags=re.S | re.M)


def pages() -> list[str]:
    """Every page of the course, in reading order (tutorial.md, then the numbered pages)."""
    return [os.path.join(DOCS, "tutorial.md")] + sorted(glob.glob(os.path.join(DOCS, "[0-9][0-9]-*.md")))


def python_blocks(path: str) -> list[str]:
    """The executable blocks of a Markdown page, in order."""
    return _BLOCK.findall(open(path, encoding="utf-8").read())


def quotes(path: str) -> list[tuple[str, str]]:
    """(dotted name, quoted text) of each block that quotes a real function."""
    return _QUOTE.findall(open(path, encoding="utf-8").read())


def run_page(path: str) -> dict:
    """Execute a page's blocks in one fresh namespace (docs/ importable, for fd.py); returns the namespace."""
    for d in (os.path.dirname(DOCS), DOCS):          # the checkout's npllama, then docs/ (fd.py)
        if d not in sys.path:
            sys.path.insert(0, d)
    ns: dict = {"__name__": "__course__"}
    name = os.path.relpath(path, os.path.dirname(DOCS))
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{name} block {i}", "exec"), ns)
    return ns


def main(argv: list[str]) -> int:
    targets = pages() if not argv else [a if os.path.exists(a) else os.path.join(DOCS, a if a.endswith(".md") else a + ".md")
                                        for a in argv]
    for path in targets:
        if not os.path.isfile(path):
            print(f"course.py: no page {path}", file=sys.stderr)
            return 2
        print(f"==> {os.path.basename(path)}")
        run_page(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
