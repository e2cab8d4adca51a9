"""npllama.io.atomic: files replaced whole or not at all, with an ordinary file's mode."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from npllama.io.atomic import atomic_path
from npllama.io.safetensors import save_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_success_replaces_the_target_with_an_ordinary_files_mode(tmp_path, umask_022):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with atomic_path(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"                 # nothing visible until the block ends
    assert target.read_text() == "new" and _mode(target) == umask_022
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_an_error_leaves_the_target_and_no_temp_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(str(target), fsync=True) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_saved_weights_are_not_private_files(tmp_path, umask_022):
    save_file({"w": np.ones((2, 3), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    assert _mode(tmp_path / "model.safetensors") == umask_022      # mkstemp alone would give 0600
