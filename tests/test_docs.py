"""The course in docs/ stays true: every page's Python blocks run, in order, in one namespace (docs/course.py),
so a failing assertion on a page fails here; shown outputs are this run's; quoted code equals the real source."""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "docs"))
import course  # noqa: E402  (docs/course.py: the one runner for every page)
import fd  # noqa: E402

PAGES = course.pages()


def test_the_course_has_its_pages():
    names = [os.path.basename(p) for p in PAGES]
    assert names[0] == "tutorial.md" and len(names) >= 13
    index = open(os.path.join(REPO, "docs", "README.md"), encoding="utf-8").read()
    for name in names:                   # the index links every page, in reading order
        assert f"({name})" in index, f"docs/README.md does not link {name}"
    assert [n for n in re.findall(r"\((\d\d-[\w-]+\.md)\)", index)] == names[1:]


@pytest.mark.parametrize("page", PAGES, ids=[os.path.basename(p) for p in PAGES])
def test_page_runs(page):
    assert len(course.python_blocks(page)) >= 2
    from npllama.io.defaults import DefaultModelMissing
    try:
        outputs = course.run_page(page, echo=False)
    except DefaultModelMissing as e:     # pages 01 and the tokenizer read the embedded SmolLM2
        pytest.skip(str(e))
    for i, shown in course.expected_outputs(page).items():     # the numbers a page shows are this run's
        assert course.same_output(shown, outputs[i]), f"block {i} printed:\n{outputs[i]}\nthe page shows:\n{shown}"


@pytest.mark.parametrize("page", PAGES, ids=[os.path.basename(p) for p in PAGES])
def test_quoted_code_is_the_real_code(page):
    for dotted, text in course.quotes(page):
        parts = dotted.split(".")
        for n in range(len(parts) - 1, 0, -1):          # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:n]))
                break
            except ImportError:
                continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        src = textwrap.dedent(inspect.getsource(obj))
        assert text == src, f"{os.path.basename(page)} quotes {dotted}, which has changed: paste it again"


def test_a_wrong_gradient_fails_the_check(capsys):
    # RMSNorm's backward without the term from rstd depending on x: the classic mistake must not pass
    from npllama.layers import rmsnorm
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((3, 8)), rng.standard_normal(8), rng.standard_normal((3, 8))
    y, cache = rmsnorm.forward(x, w, 1e-5)
    wrong = cache.rstd * (dy * w)
    numerical = fd.numerical_grad(lambda: float((rmsnorm.forward(x, w, 1e-5)[0] * dy).sum()), x)
    with pytest.raises(AssertionError, match="analytic gradient is off"):
        fd.check("rmsnorm dx (wrong)", wrong, numerical)
    fd.check("rmsnorm dx", rmsnorm.backward(dy, cache)[0], numerical)       # and the right one passes
    with pytest.raises(AssertionError, match="off by"):                     # a 1e-5 slip is caught too
        fd.check("rmsnorm dx (slightly off)", rmsnorm.backward(dy, cache)[0] * (1 + 1e-5), numerical)


def test_a_failing_page_fails(tmp_path):
    page = tmp_path / "99-broken.md"
    page.write_text("```python\nx = 1\nprint(x / 3)\n```\n\n```text output\n0.333\n```\n\n"
                    "```python quote=a.b\nnot run\n```\n\n```python\nassert x == 2\n```\n")
    assert course.python_blocks(str(page)) == ["x = 1\nprint(x / 3)\n", "assert x == 2\n"]
    assert course.expected_outputs(str(page)) == {0: "0.333\n"}
    with pytest.raises(AssertionError):
        course.run_page(str(page), echo=False)


def test_shown_output_must_match():
    assert course.same_output("p = 0.333 (3 tokens)\n", "p = 0.3333333 (3 tokens)\n".replace("0.3333333", "0.334"))
    assert not course.same_output("p = 0.333 (3 tokens)\n", "p = 0.336 (3 tokens)\n")    # a different number
    assert not course.same_output("top: ' Paris'\n", "top: ' London'\n")                # different text
    assert not course.same_output("1 2 3\n", "1 2 3 4\n")
