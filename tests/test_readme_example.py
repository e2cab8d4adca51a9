"""README.md's "Use it from Python" example runs as printed."""
from __future__ import annotations

import os
import re

from conftest import REPO


def test_readme_python_example_runs():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Use it from Python", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README.md (Use it from Python)", "exec"), ns)
    assert len(ns["new_ids"]) == 16 and set(ns["grads"]) == set(ns["model"].params)
