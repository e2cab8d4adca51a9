"""Run the course's pages: every ```python block of a page, in order, in one namespace per page.

    python docs/course.py                  every page of docs/, in order
    python docs/course.py 05-rmsnorm       one page (with or without .md)

Three kinds of fenced block take part:
    ```python                    run
    ```python quote=mod.func     a quote of real code: shown, compared with the source by the tests, never run
    ```text output               what the python block before it prints: compared with a fresh run by the tests
The test suite runs the pages the same way (tests/test_docs.py), so a page whose assertion fails fails a test.
"""
from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", flags=re.S | re.M)
_NUMBER = re.compile(r"[-+]?\d+(?:\.(\d+))?(?:e[-+]?\d+)?")


def pages() -> list[str]:
    """Every page of the course, in reading order (tutorial.md, then the numbered pages)."""
    return [os.path.join(DOCS, "tutorial.md")] + sorted(glob.glob(os.path.join(DOCS, "[0-9][0-9]-*.md")))


def fences(path: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of a Markdown page, in order."""
    return [(info.strip(), body) for info, body in _FENCE.findall(open(path, encoding="utf-8").read())]


def python_blocks(path: str) -> list[str]:
    """The executable blocks of a page, in order."""
    return [body for info, body in fences(path) if info == "python"]


def quotes(path: str) -> list[tuple[str, str]]:
    """(dotted name, quoted text) of each block that quotes a real function."""
    return [(info.split("quote=", 1)[1], body) for info, body in fences(path) if info.startswith("python quote=")]


def expected_outputs(path: str) -> dict[int, str]:
    """python block index -> the output the page shows for it."""
    out, i = {}, -1
    for info, body in fences(path):
        if info == "python":
            i += 1
        elif info == "text output":
            if i < 0 or i in out:
                raise ValueError(f"{path}: a 'text output' block must follow its own python block")
            out[i] = body
    return out


class _Tee(io.StringIO):
    def __init__(self, echo: bool) -> None:
        super().__init__()
        self.echo = sys.stdout if echo else None

    def write(self, s: str) -> int:
        if self.echo is not None:
            self.echo.write(s)
        return super().write(s)


def run_page(path: str, echo: bool = True) -> list[str]:
    """Execute a page's blocks in one fresh namespace (docs/ importable, for fd.py); -> each block's printed output."""
    for d in (os.path.dirname(DOCS), DOCS):          # the checkout's npllama, then docs/ (fd.py)
        if d not in sys.path:
            sys.path.insert(0, d)
    ns: dict = {"__name__": "__course__"}
    name = os.path.relpath(path, os.path.dirname(DOCS))
    outputs = []
    for i, block in enumerate(python_blocks(path)):
        tee = _Tee(echo)
        with contextlib.redirect_stdout(tee):
            exec(compile(block, f"{name} block {i}", "exec"), ns)
        outputs.append(tee.getvalue())
    return outputs


def same_output(shown: str, got: str) -> bool:
    """True when `got` reads as `shown`: the same text, each number within 1.5 units of the last digit shown
    (float32 sums differ in their last bits between BLAS builds; the printed digits may round either way)."""
    if _NUMBER.sub("#", shown).rstrip() != _NUMBER.sub("#", got).rstrip():
        return False
    for a, b in zip(_NUMBER.finditer(shown), _NUMBER.finditer(got)):
        decimals = len(a.group(1) or "")
        if not math.isclose(float(a.group()), float(b.group()), rel_tol=1e-3, abs_tol=1.5 * 10.0 ** -decimals):
            return False
    return True


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
