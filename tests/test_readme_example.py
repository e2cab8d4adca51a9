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


def test_readme_lora_example_runs(tmp_path, monkeypatch):
    """The second block (LoRA + encode_chat) continues the first one's namespace."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md (Use it from Python, block {i})", "exec"), ns)
    assert set(ns["grads"]) == ns["model"].trainable and len(ns["grads"]) == 2 * 2 * 30
    assert sorted(os.listdir(tmp_path / "runs" / "my-adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
